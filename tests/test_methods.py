"""Methods end to end (ServerApp main + ClientApps in this process) on a tiny CLIP and a small folder: what no equality
case covers (a second run reusing the cache, unknown methods). Each method's own run, its numbers and what it trains,
sends and saves, is checked in tests/test_protocol_equality.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from client_app.app import app as client_app
from common.config import load_config
from common.methods.base import load_method
from server_app.app import app as server_app
from tests.conftest import write_image_folder
from tests.inprocess import run_in_process

DOMAINS = ("art", "photo", "sketch")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


def run_method(method: str, tiny_clip: Path, folder: Path, tmp_path: Path, extra: str = "", rounds: int = 2) -> dict:
    overrides = (
        f"method={method} dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds={rounds} training.batch_size=8 cache_dir={tmp_path / 'cache'} "
        f"output_dir={tmp_path / 'out'} {extra}"
    )
    run_in_process(server_app, client_app, overrides, len(DOMAINS))
    [summary] = (tmp_path / "out").glob("*/summary.json")
    assert (summary.parent / "accuracy.png").is_file()  # every run folder, every method
    return json.loads(summary.read_text())


def test_zero_shot_trains_nothing_and_sends_nothing(tiny_clip, folder, tmp_path):
    first = run_method("zero_shot", tiny_clip, folder, tmp_path / "first")
    assert first["features_encoded"] == len(DOMAINS) * 3 * 6  # every readable image once, at the query
    summary = run_method("zero_shot", tiny_clip, folder, tmp_path)
    assert summary["rounds"] == 0 and summary["trained_parameters"] == 0 and summary["bytes_total"] == 0
    assert summary["generalization"]["sketch"] == summary["zero_shot"]["sketch"]
    assert summary["features_encoded"] == 0  # the first run encoded them; this one reuses them


def test_unknown_method_is_a_clear_error(tiny_clip, folder, tmp_path):
    """No conf/method/fedsgd.yaml: Hydra refuses it while composing, naming the methods there are."""
    with pytest.raises(
        MissingConfigException,
        match=r"Could not find 'method/fedsgd'\s+Available options in 'method':(\s+\w+)*\s+fedclip",
    ):
        run_method("fedsgd", tiny_clip, folder, tmp_path)


def test_a_method_file_without_a_class_is_a_clear_error():
    """A conf/method file Hydra can compose but that names no plug-in class: the app's own check, with the fix."""
    cfg = load_config("method=fedclip")
    OmegaConf.set_struct(cfg, False)
    del cfg.method["_target_"]
    with pytest.raises(
        ValueError,
        match=r"method 'fedclip' names no class: its conf/method/ file needs `_target_: "
        r"common.methods.<module>.<Class>`",
    ):
        load_method(cfg)


@pytest.mark.parametrize("method", ["local_prompt", "local_personal_prompt", "centralized_prompt"])
def test_the_prompt_references_run_with_the_prompt_methods_module(method, tiny_clip, folder, tmp_path):
    """Local-only and centralized prompts (the references a prompt method is compared with) train the same context as
    promptfl: local-only keeps one per client and saves no global one; centralized trains one on the pooled data on
    one node; the local personal one reports each site's personalized accuracy."""
    summary = run_method(f"{method} method.lr=0.05", tiny_clip, folder, tmp_path, rounds=2)
    run = next((tmp_path / "out").glob("*/summary.json")).parent
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["trained_parameters"] == 4 * 32 and summary["generalization"]["sketch"] is not None
    assert (run / "prompt_final.safetensors").is_file() == (method == "centralized_prompt")
    trained = {key.partition("/")[0] for key in rows[1]["train"] if key.endswith("/train-loss")}
    assert trained == ({"art"} if method == "centralized_prompt" else {"art", "photo"})
    assert ("art/personalized-test-acc" in rows[-1]["evaluate"]) == (method == "local_personal_prompt")
    # a reference keeps no weights at its sites: it has no weights name for predict to read them by
    assert not list((tmp_path / "out" / "clients").glob("*/*/*_final.safetensors"))
