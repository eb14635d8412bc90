import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException

from common.config import config_from_run, select_device

REPO = Path(__file__).resolve().parent.parent


def test_run_config_overrides_reach_every_group(monkeypatch):
    monkeypatch.delenv("FEDCLIP_CACHE", raising=False)
    cfg = config_from_run({"overrides": "training.lr=0.5 dataset.held_out=photo strategy.weighting=examples model.prompt='a photo of a {}'"})
    assert cfg.training.lr == 0.5 and cfg.dataset.held_out == "photo" and cfg.strategy.weighting == "examples"
    assert cfg.model.prompt == "a photo of a {}"
    assert cfg.training.weight_decay == 0.2  # untouched values keep the paper's


def test_empty_run_config_is_the_demo():
    cfg = config_from_run({})
    assert cfg.dataset.root == "demo" and cfg.model.name_or_path == "demo" and cfg.training.loss == "cross_entropy"


def test_training_paper_restores_the_paper_optimiser():
    cfg = config_from_run({"overrides": "training=paper"})
    assert (cfg.training.lr, cfg.training.rounds, list(cfg.training.betas)) == (5e-5, 200, [0.9, 0.98])


def test_env_moves_cache_and_outputs(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDCLIP_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("FEDCLIP_OUTPUTS", str(tmp_path / "o"))
    cfg = config_from_run({})
    assert cfg.cache_dir == str(tmp_path / "c") and cfg.demo.cache_dir == str(tmp_path / "c")
    assert cfg.output_dir == str(tmp_path / "o")


def test_unknown_option_is_an_error():
    with pytest.raises(HydraException):
        config_from_run({"overrides": "training.learning_rate=1"})


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert select_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="device=cpu or device=auto"):
        select_device("cuda:0")


def test_logging_shows_app_lines_once_and_no_flower_debug():
    """A normal run prints the app's INFO lines and Flower's own INFO and up, each once; errors in full."""
    code = """
import logging
import flwr.common.logger  # Flower's logger, with its own console handler
from common.config import setup_logging
setup_logging()
flower, app = logging.getLogger("flwr"), logging.getLogger("common.x")
flower.debug("flower debug line")
flower.error("flower error line")
app.info("app info line")
app.debug("app debug line")
try:
    raise ValueError("boom")
except ValueError:
    app.exception("app failure")
"""
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stderr
    assert "debug line" not in err
    assert err.count("flower error line") == 1 and err.count("app info line") == 1
    assert "app failure" in err and "Traceback (most recent call last)" in err and "ValueError: boom" in err
