"""Server optimizers: the combined update as a pseudo-gradient, step for step as Flower's own strategies take it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi
from safetensors.torch import load_file

from client_app.app import app as client_app
from server_app.app import app as server_app
from server_app.checkpoint import load_checkpoint
from server_app.server_optimizer import ServerOptimizer
from tests.conftest import reply_from, write_image_folder
from tests.inprocess import run_in_process

RNG = np.random.default_rng(0)
START = {"w": RNG.normal(size=(4, 3)).astype(np.float32), "b": RNG.normal(size=3).astype(np.float32)}


def record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in state.items()})


def flower_rounds(strategy, combined: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Flower's strategy over rounds whose (only) reply carries the combined weights: its mean is exactly them."""
    arrays, out = record(START), []
    for server_round, state in enumerate(combined, start=1):
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid()))
        reply = reply_from(1, RecordDict({"arrays": record(state), "metrics": MetricRecord({"num-examples": 1})}))
        arrays, _ = strategy.aggregate_train(server_round, [reply])
        out.append({k: v.numpy() for k, v in arrays.items()})
    return out


def ours(optimizer: ServerOptimizer, combined: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    arrays, out = record(START), []
    for server_round, state in enumerate(combined, start=1):
        arrays = optimizer.step(server_round, arrays, record(state))
        out.append({k: v.numpy() for k, v in arrays.items()})
    return out


class _Grid:
    def get_node_ids(self):
        return [1]


ONE_NODE = {"min_available_nodes": 1, "min_train_nodes": 1}  # Flower's strategies wait for 2 nodes by default
COMBINED = [
    {k: v + RNG.normal(scale=0.1, size=v.shape).astype(np.float32) * (r + 1) for k, v in START.items()}
    for r in range(4)
]


@pytest.mark.parametrize(
    "kind,flower",
    [  # built per test: a strategy keeps its moments, so one instance cannot serve twice
        ("fedadam", lambda: FedAdam(**ONE_NODE, eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)),
        ("fedyogi", lambda: FedYogi(**ONE_NODE, eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)),
        ("fedadagrad", lambda: FedAdagrad(**ONE_NODE, eta=0.05, tau=1e-3)),
        ("fedavgm", lambda: FedAvgM(**ONE_NODE, server_learning_rate=0.7, server_momentum=0.9)),
    ],
)
def test_each_step_equals_flowers(kind, flower):
    lr = 0.7 if kind == "fedavgm" else 0.05
    mine = ours(ServerOptimizer(kind, lr=lr, momentum=0.9, betas=(0.9, 0.99), tau=1e-3), COMBINED)
    theirs = flower_rounds(flower(), COMBINED)
    for a, b in zip(mine, theirs):
        for k in START:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(mine[-1]["w"], COMBINED[-1]["w"])  # a step, not the mean


def test_mean_and_plain_fedavgm_take_the_combined_weights():
    for optimizer in (ServerOptimizer("mean"), ServerOptimizer("fedavgm", lr=1.0, momentum=0.0)):
        for got, want in zip(ours(optimizer, COMBINED), COMBINED):
            for k in START:
                np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-7)


def test_unknown_optimizer_is_an_error():
    """A run's is refused before its first message (tests/test_options.py); one built directly fails too."""
    with pytest.raises(ValueError, match="unknown server optimizer 'sgd'"):
        ServerOptimizer("sgd")


def run(folder: Path, tiny_clip: Path, out: Path, extra: str, rounds: int) -> Path:
    overrides = (
        f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds={rounds} "
        f"training.batch_size=8 cache_dir={out.parent / 'cache'} output_dir={out} {extra}"
    )
    run_in_process(server_app, client_app, overrides, 3)
    return sorted(p.parent for p in out.glob("*/config.yaml"))[-1]  # the newest run folder, not clients/


def test_fedadam_run_keeps_its_moments_across_a_resume(tiny_clip, tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "data", per_class=6)
    adam = "strategy.server_optimizer=fedadam strategy.server_lr=0.01"
    first = run(folder, tiny_clip, tmp_path / "first", adam, 2)
    moments = load_checkpoint(first).optimizer
    assert {k.split("/")[1] for k in moments} == {"m", "v"} and len(
        moments
    ) == 2 * 4  # m and v of the adapter's 4 tensors
    assert all(np.abs(v).max() > 0 for v in moments.values())
    steps = []  # the state each step of the resumed run starts from
    real_step = ServerOptimizer.step
    monkeypatch.setattr(ServerOptimizer, "step", lambda self, *a: steps.append(self.state()) or real_step(self, *a))
    resumed = run(folder, tiny_clip, tmp_path / "resumed", f"{adam} resume={first}", 3)
    assert len(steps) == 1 and steps[0].keys() == moments.keys()  # round 3 only, from round 2's moments
    for k in moments:
        np.testing.assert_array_equal(steps[0][k], moments[k])
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    plain = run(folder, tiny_clip, tmp_path / "plain", "", 2)
    # the optimizer changed the path
    assert not np.allclose(
        load_file(plain / "adapter_final.safetensors")["fc1.weight"],
        load_file(first / "adapter_final.safetensors")["fc1.weight"],
    )


def test_server_optimizer_needs_global_weights(tiny_clip, tmp_path):
    folder = write_image_folder(tmp_path / "data", per_class=6)
    with pytest.raises(ValueError, match="method=local keeps none"):
        run(folder, tiny_clip, tmp_path / "out", "method=local strategy.server_optimizer=fedyogi", 1)
