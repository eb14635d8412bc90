"""Checkpoint after every round and resume from it: the adapter, the round and the report rows survive."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from common.config import load_config
from common.model import AttentionAdapter
from server_app.checkpoint import load_checkpoint, resume_run, save_checkpoint
from server_app.report import RunReport

DOMAINS = ["a", "b", "sketch"]


def make_report(tmp_path, dim: int = 8, extra: str = "") -> tuple[RunReport, ArrayRecord]:
    cfg = load_config(f"output_dir={tmp_path} dataset.held_out=sketch selection=val_mean {extra}")
    torch.manual_seed(0)
    arrays = ArrayRecord(AttentionAdapter(dim).state_dict())
    return RunReport(cfg, {d: d for d in DOMAINS}, ["a", "b"], 2 * (dim * dim + dim)), arrays


def evaluation(acc: float) -> MetricRecord:
    return MetricRecord({f"{d}/{s}-acc": acc for d in DOMAINS for s in ("val", "test", "all")})


def play(report: RunReport, arrays: ArrayRecord, rounds: int, accs: list[float]) -> ArrayRecord:
    """Rounds 0..rounds with a checkpoint after each, changing the adapter every round."""
    for r in range(rounds + 1):
        if r > 0:
            arrays = ArrayRecord({k: v + r for k, v in arrays.to_torch_state_dict().items()})
        report.add_round(r, MetricRecord({"a/train-loss": 1.0 / (r + 1)}) if r else MetricRecord(), evaluation(accs[r]), 0.1, arrays)
        save_checkpoint(report, arrays)
    return arrays


def test_checkpoint_holds_the_last_round(tmp_path):
    report, arrays = make_report(tmp_path / "run1")
    final = play(report, arrays, 3, [0.1, 0.5, 0.4, 0.3])
    ckpt = load_checkpoint(report.dir)
    assert ckpt.round == 3 and [r["round"] for r in ckpt.rows] == [0, 1, 2, 3]
    for key, value in final.to_torch_state_dict().items():
        assert torch.equal(ckpt.arrays.to_torch_state_dict()[key], value)
    assert not list(report.dir.glob("*.tmp"))


def test_resume_goes_on_from_the_checkpoint(tmp_path):
    old, arrays = make_report(tmp_path / "run1")
    final = play(old, arrays, 3, [0.1, 0.5, 0.4, 0.3])
    new, fresh = make_report(tmp_path / "run2")
    resumed, first_round = resume_run(str(old.dir), new, fresh)
    assert first_round == 4
    assert all(torch.equal(resumed.to_torch_state_dict()[k], v) for k, v in final.to_torch_state_dict().items())
    assert new.best["round"] == 1  # the best round of the first part stays the best so far
    assert (new.dir / "adapter_best.safetensors").read_bytes() == (old.dir / "adapter_best.safetensors").read_bytes()
    new.add_round(4, MetricRecord(), evaluation(0.6), 0.1, resumed)
    summary = new.finish(resumed)
    assert summary["rounds"] == 4 and summary["best_round"] == 4
    rows = [json.loads(line) for line in (new.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]


def test_resume_refuses_what_does_not_fit(tmp_path):
    old, arrays = make_report(tmp_path / "run1")
    play(old, arrays, 1, [0.1, 0.2])
    with pytest.raises(FileNotFoundError, match="no checkpoint.safetensors"):
        resume_run(str(tmp_path / "nowhere"), *make_report(tmp_path / "run2"))
    with pytest.raises(ValueError, match="another CLIP"):
        resume_run(str(old.dir), *make_report(tmp_path / "run3", dim=16))
    other, fresh = make_report(tmp_path / "run4")
    other.domains = ["a", "c", "sketch"]
    with pytest.raises(ValueError, match="domains"):
        resume_run(str(old.dir), other, fresh)
    with pytest.raises(ValueError, match=r"seed \(now 1, then 0\)"):  # another protocol: the rows would not mean the same
        resume_run(str(old.dir), *make_report(tmp_path / "run5", extra="seed=1"))
