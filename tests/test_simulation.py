"""End to end: `flwr run .` on the embedded demo, exactly as the README runs it, in a private FLWR_HOME."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from benchmarks.sweep import flwr_run
from common.model import AttentionAdapter

ROUNDS = 40  # the default; the test runs the README command unchanged


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_cache) -> tuple[dict, Path, str]:
    folder = tmp_path_factory.mktemp("flwr-run")
    _, log = flwr_run(folder, env={"FEDCLIP_CACHE": demo_cache}, timeout=1800)
    runs = sorted(folder.glob("*/summary.json"))
    assert runs, f"flwr run wrote no summary.json:\n{log[-6000:]}"
    return json.loads(runs[-1].read_text()), runs[-1].parent, log


def test_run_folder_holds_config_metrics_and_adapters(demo_run):
    summary, folder, log = demo_run
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "adapter_final.safetensors",
        "adapter_best.safetensors",
    ):
        assert (folder / name).is_file(), name
    with open(folder / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == list(range(ROUNDS + 1))
    state = load_file(folder / "adapter_best.safetensors")
    adapter = AttentionAdapter(state["fc1.weight"].shape[0])
    adapter.load_state_dict(state)
    assert summary["method"] == "fedclip" and summary["trained_parameters"] == sum(
        p.numel() for p in adapter.parameters()
    )
    raw = 4 * summary["trained_parameters"]  # one float32 adapter
    adapter = summary["bytes_up_per_client_per_round"]  # a training client sends one adapter back a round
    assert raw <= adapter <= raw + 1024  # + .npy headers
    # one exchange a round: a training client receives one adapter (its train message carries the evaluation
    # of that adapter), plus the last round's evaluation
    assert summary["bytes_down_per_client_per_round"] == pytest.approx(adapter * (ROUNDS + 1) / ROUNDS, abs=1)
    # measured on the messages: round 1 sends 3 adapters and gets 3 back (the held-out client's zero-shot evaluation
    # carries none); rounds 2..40 also send the held-out client 1; the last evaluation sends 4
    assert summary["bytes_total"] == (6 + 7 * (ROUNDS - 1) + 4) * adapter
    assert "round | train loss" in log and "sketch*" in log  # the per-round table, held-out domain marked


def test_federated_adapter_beats_zero_shot(demo_run):
    summary, _, _ = demo_run
    held_out = summary["held_out"]
    assert summary["generalization"][held_out] > summary["zero_shot"][held_out]
    assert summary["personalization_mean"] > summary["zero_shot_train_domains_mean"]
