"""End to end on the in-process grid: one poisoned client of four (its update scaled by 1e6). The plain mean is ruined;
the default screening rejects exactly that update and keeps every honest one; the median stays with the clean run.

Accuracy says nothing here (random images: near chance whatever the adapter), so each defence is judged by the
adapter: against a run without the attack, or the run in which the attacker's update never arrived."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

import client_app.app as client_module
from benchmarks.attacks import poisoned_client_app
from common.model import AttentionAdapter
from server_app.app import app as server_app
from tests.conftest import write_image_folder
from tests.inprocess import run_in_process

ROUNDS = 2
ATTACKER = "art#0"  # partition 0 of art#0/1, photo#0/1 (sketch#0/1 held out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


def final_adapter(client: ClientApp, options: str, tiny_clip: Path, folder: Path, out: Path) -> dict[str, np.ndarray]:
    overrides = (
        f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds={ROUNDS} "
        f"training.batch_size=8 dataset.clients_per_domain=2 cache_dir={out.parent / 'cache'} "
        f"output_dir={out} {options}"
    )
    run_in_process(server_app, client, overrides, 6)
    [path] = out.glob("*/adapter_final.safetensors")
    return load_file(path)


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(a[k].astype(np.float64) - b[k])) for k in a)))


def initial_adapter(like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    torch.manual_seed(0)  # the run's seed
    return {k: v.numpy() for k, v in AttentionAdapter(like["fc1.weight"].shape[1]).state_dict().items()}


def silent_attacker_app() -> ClientApp:
    """The real handlers; the attacker trains and evaluates, but its train reply never reaches the server."""

    def drop(msg: Message, ctxt: Context, call_next) -> Message:
        reply = call_next(msg, ctxt)
        if int(ctxt.node_config["partition-id"]) == 0:
            raise RuntimeError("this update is lost")
        return reply

    app = ClientApp()
    app.query()(client_module.query)
    app.train(mods=[drop])(client_module.train)
    app.evaluate()(client_module.evaluate)
    return app


def rejections(log: str) -> list[str]:
    return re.findall(r"update of node \d+ \((\S+)\) has norm \S+ > \S+: rejected", log)


def test_the_plain_mean_is_ruined(tiny_clip, folder, tmp_path):
    poisoned = final_adapter(
        poisoned_client_app("scale", {0}), "strategy.max_norm_ratio=null", tiny_clip, folder, tmp_path / "poisoned"
    )
    clean = final_adapter(client_module.app, "strategy.max_norm_ratio=null", tiny_clip, folder, tmp_path / "clean")
    assert max(float(np.abs(v).max()) for v in poisoned.values()) > 1e3
    assert distance(poisoned, clean) > 1e4 * distance(clean, initial_adapter(clean))


def test_screening_rejects_exactly_the_scaled_update_and_keeps_every_honest_one(tiny_clip, folder, tmp_path, caplog):
    """The default screening (max_norm_ratio 10 x the round's median norm) rejects the attacker each round and no one
    else: the result is the run in which the attacker's update was lost on the way, to the bit."""
    poisoned = final_adapter(poisoned_client_app("scale", {0}), "", tiny_clip, folder, tmp_path / "poisoned")
    assert rejections(caplog.text) == [ATTACKER] * ROUNDS
    caplog.clear()
    without = final_adapter(silent_attacker_app(), "", tiny_clip, folder, tmp_path / "without")
    assert rejections(caplog.text) == []
    for key in without:
        np.testing.assert_array_equal(poisoned[key], without[key])
    assert distance(without, initial_adapter(without)) > 1e-3  # the honest clients moved it


def test_the_median_stays_with_the_clean_run(tiny_clip, folder, tmp_path, caplog):
    """aggregation=median with num_malicious=1 and no screening: every update is accepted, the attacker's included,
    and the result is within a twentieth of the clean run's step from the clean run (measured: 1/85)."""
    options = "strategy.max_norm_ratio=null strategy.aggregation=median strategy.num_malicious=1"
    poisoned = final_adapter(poisoned_client_app("scale", {0}), options, tiny_clip, folder, tmp_path / "poisoned")
    clean = final_adapter(client_module.app, options, tiny_clip, folder, tmp_path / "clean")
    assert rejections(caplog.text) == [] and "valid update(s), need" not in caplog.text
    step = distance(clean, initial_adapter(clean))
    assert step > 1e-3 and distance(poisoned, clean) < step / 20
