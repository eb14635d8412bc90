import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException

from common.config import ConfigError, load_config, select_device

REPO = Path(__file__).resolve().parent.parent


def test_run_config_overrides_reach_every_group(monkeypatch):
    monkeypatch.delenv("FEDCLIP_CACHE", raising=False)
    cfg = load_config(
        "training.lr=0.5 dataset.held_out=photo strategy.weighting=examples model.prompt='a photo of a {}'"
    )
    assert cfg.training.lr == 0.5 and cfg.dataset.held_out == "photo" and cfg.strategy.weighting == "examples"
    assert cfg.model.prompt == "a photo of a {}"
    assert cfg.training.weight_decay == 0.2  # untouched values keep the paper's


def test_empty_run_config_is_the_demo():
    cfg = load_config()
    assert cfg.dataset.root == "demo" and cfg.model.name_or_path == "demo" and cfg.training.loss == "cross_entropy"


def test_training_paper_restores_the_paper_optimiser():
    cfg = load_config("training=paper")
    assert (cfg.training.lr, cfg.training.rounds, list(cfg.training.betas)) == (5e-5, 200, [0.9, 0.98])


def test_env_moves_cache_and_outputs(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDCLIP_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("FEDCLIP_OUTPUTS", str(tmp_path / "o"))
    cfg = load_config()
    assert cfg.cache_dir == str(tmp_path / "c") and cfg.demo.cache_dir == str(tmp_path / "c")
    assert cfg.output_dir == str(tmp_path / "o")


def test_unknown_option_is_an_error():
    with pytest.raises(HydraException):
        load_config("training.learning_rate=1")


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("training.lr=abc", "training.lr: Value 'abc' of type 'str' could not be converted to Float"),
        ("training.rounds=2.5", "training.rounds: Value '2.5' of type 'float' could not be converted to Integer"),
        ("strategy.secagg.enabled=maybe", "strategy.secagg.enabled: Value 'maybe' is not a valid bool (type str)"),
        ("dataset.split=0.5", "dataset.split: Invalid value assigned: AnyNode is not a ListConfig, list or tuple."),
        ("training.loss=hinge", "training.loss: got 'hinge', takes one of cross_entropy, contrastive"),
        ("+dataset.extra=1", "dataset.extra: not a key of this app's configuration (Key 'extra' not in 'Dataset')"),
        (
            "method.personalize_epochs=two",
            "method.personalize_epochs: Value 'two' of type 'str' could not be converted to Integer",
        ),
        ("method=promptfl method.n_ctx=x", "method.n_ctx: Value 'x' of type 'str' could not be converted to Integer"),
    ],
)
def test_a_wrong_type_or_value_is_one_line_naming_the_key(override, line):
    """The schema (common/schema.py) checks every key, a method's own keys by its class's __init__ annotations."""
    with pytest.raises(ConfigError) as err:
        load_config(override)
    assert str(err.value) == line


def test_every_key_of_every_conf_file_is_in_the_schema():
    """Each option of each group composes and passes the schema: no key of conf/ is unknown to it, none lacks a
    value."""
    for group in ("dataset", "model", "training", "method"):
        for option in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml") if not p.stem.startswith("_")):
            extra = " dataset.root=/data dataset.held_out=x" if group == "dataset" and option != "demo" else ""
            assert load_config(f"{group}={option}{extra}").get(group) is not None


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
