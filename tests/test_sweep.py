"""The leave-one-domain-out sweep: its table on known run folders, and one real sweep that stops and resumes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks.sweep import failure_reason, run_overrides, shared_experiment
from benchmarks.sweep import main as sweep_main
from benchmarks.sweep_report import read_run, run_dir, write_plots, write_tables
from common.config import load_config

METHODS, HELD_OUT, SEEDS = ["fedclip", "fedavg"], ["photo", "sketch"], [0, 1]


def fake_run(out: Path, method: str, held_out: str, seed: int, gen: float, pers: float | None, **summary) -> None:
    """A finished run folder: two training rounds after the zero-shot round 0."""
    folder = run_dir(out, method, held_out, seed) / "2026-01-01_00-00-00"
    folder.mkdir(parents=True)
    rows = [
        {
            "round": r,
            f"acc/{held_out}": gen - 0.1 * (2 - r),
            "acc/other": 0.5,
            "bytes_round": 1000 * r,
            "seconds": 0.5 + 0.2 * (r - 1),
        }
        for r in range(3)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "held_out": held_out,
        "generalization": {held_out: gen},
        "personalization_mean": pers,
        "rounds": 2,
        **summary,
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def failed_run(out: Path, method: str, held_out: str, seed: int) -> None:
    run_dir(out, method, held_out, seed).mkdir(parents=True)
    (run_dir(out, method, held_out, seed) / "failure.json").write_text(json.dumps({"reason": "exit code 1: boom"}))


@pytest.fixture
def sweep_folder(tmp_path) -> Path:
    """fedclip: every run done, today's summary keys. fedavg: the new keys, one run done, two failed,
    one stopped half-way; its one finished run has no personalization."""
    today = dict(adapter_parameters=8320, bytes_per_client_per_round=101376, bytes_total=405504)
    for held_out, seed, gen, pers in (
        ("photo", 0, 0.50, 0.60),
        ("photo", 1, 0.52, 0.62),
        ("sketch", 0, 0.40, 0.70),
        ("sketch", 1, 0.44, 0.72),
    ):
        fake_run(tmp_path, "fedclip", held_out, seed, gen, pers, **today)
    fake_run(
        tmp_path,
        "fedavg",
        "photo",
        0,
        0.30,
        None,
        trained_parameters=1_000_000,
        bytes_up_per_client_per_round=4 * 2**20,
        bytes_down_per_client_per_round=8 * 2**20,
        seconds_per_round=2.5,
        features_encoded=0,
        bytes_total=3 * 2**30,
    )
    failed_run(tmp_path, "fedavg", "photo", 1)
    failed_run(tmp_path, "fedavg", "sketch", 0)
    (run_dir(tmp_path, "fedavg", "sketch", 1) / "2026-01-01_00-00-00").mkdir(parents=True)  # no summary.json
    return tmp_path


def test_table_markdown_and_csv(sweep_folder):
    runs = [read_run(sweep_folder, m, d, s) for m in METHODS for d in HELD_OUT for s in SEEDS]
    assert [r.status for r in runs] == ["done"] * 5 + ["failed", "failed", "incomplete"]
    write_tables(sweep_folder, runs, METHODS, HELD_OUT, SEEDS)
    md = (sweep_folder / "table.md").read_text()
    assert (
        """| held out | fedclip | fedavg |
|---|---|---|
| photo | 51.00 ± 1.41 | 30.00 (1/2) |
| sketch | 42.00 ± 2.83 | failed |
| **mean** | 46.50 ± 2.12 | — |
"""
        in md
    )  # mean row: seed 0 (50+40)/2 = 45, seed 1 (52+44)/2 = 48; fedavg has no seed with both domains
    assert (
        """| held out | fedclip | fedavg |
|---|---|---|
| photo | 61.00 ± 1.41 | n/a |
| sketch | 71.00 ± 1.41 | failed |
| **mean** | 66.00 ± 1.41 | — |
"""
        in md
    )
    assert "| fedclip | 8,320 | — | — | 99.0 KiB | 396.0 KiB | 0.60 | — | 2 |" in md  # seconds from metrics.jsonl
    assert "| fedavg | 1,000,000 | 4.0 MiB | 8.0 MiB | 12.0 MiB | 3.0 GiB | 2.50 | 0 | 2 |" in md
    assert (
        f"- fedavg, held out sketch, seed 0: exit code 1: boom "
        f"(log: {run_dir(sweep_folder, 'fedavg', 'sketch', 0)}/flwr.log)" in md
    )

    with open(sweep_folder / "table.csv") as fh:
        rows = {(r["held_out"], r["method"]): r for r in csv.DictReader(fh)}
    assert list(rows) == [
        ("photo", "fedclip"),
        ("sketch", "fedclip"),
        ("mean", "fedclip"),
        ("photo", "fedavg"),
        ("sketch", "fedavg"),
        ("mean", "fedavg"),
    ]
    assert (rows["mean", "fedclip"]["generalization_mean_pct"], rows["mean", "fedclip"]["generalization_std_pct"]) == (
        "46.5",
        "2.1213",
    )
    assert rows["photo", "fedclip"]["bytes_per_client_per_round"] == "101376"
    assert rows["photo", "fedclip"]["bytes_up_per_client_per_round"] == ""  # today's summaries hold only the sum
    assert rows["photo", "fedavg"]["bytes_per_client_per_round"] == str(12 * 2**20)
    assert (
        rows["sketch", "fedavg"]["done"],
        rows["sketch", "fedavg"]["failed"],
        rows["sketch", "fedavg"]["generalization_mean_pct"],
    ) == ("0", "1", "")

    plots = write_plots(sweep_folder, runs, METHODS, HELD_OUT)
    assert sorted(p.name for p in plots) == ["accuracy_photo.png", "accuracy_sketch.png", "bytes_vs_accuracy.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_run_overrides_quote_domains_and_add_the_method_only_when_not_the_default():
    assert (
        run_overrides(["training.rounds=2"], "fedclip", "sketch", 1)
        == "training.rounds=2 dataset.held_out=sketch seed=1"
    )
    assert run_overrides([], "fedavg", "Real World", 0) == "dataset.held_out='Real World' seed=0 method=fedavg"


def test_a_sweeps_runs_share_one_mlflow_experiment_named_by_its_folder(tmp_path):
    out = tmp_path / "my sweep"
    base = shared_experiment(["training.rounds=2"], out)
    assert base == ["training.rounds=2", f"tracking.mlflow_experiment='{out}'"]
    runs = {run_overrides(base, m, d, s) for m in ("fedclip", "promptfl") for d in ("photo", "sketch") for s in (0, 1)}
    assert all(f"tracking.mlflow_experiment='{out}'" in r for r in runs) and len(runs) == 8
    assert load_config(base).tracking.mlflow_experiment == str(out)
    # the user's wins
    assert shared_experiment(["tracking.mlflow_experiment=mine"], out) == ["tracking.mlflow_experiment=mine"]


def test_failure_reason_is_the_server_apps_exception_not_flowers_wrapper():
    log = """\x1b[91mERROR \x1b[0m:     Traceback (most recent call last):
RuntimeError: could not load the CLIP '/nonexistent'
RuntimeError: no node holds a training domain (nodes answered with []); nothing can train
RuntimeError: Exception in ServerApp thread
2026-11-27 23:29:54,397 ERROR Exit Code: 700
"""
    assert (
        failure_reason(log)
        == "RuntimeError: no node holds a training domain (nodes answered with []); nothing can train"
    )
    assert failure_reason("starting\n# stopped: still running after 5 s\n") == "# stopped: still running after 5 s"


def test_swept_keys_and_unknown_domains_are_refused(demo_cache, monkeypatch):
    monkeypatch.setenv("FEDCLIP_CACHE", demo_cache)
    with pytest.raises(ValueError, match="sweep.seeds"):
        sweep_main(["seed=3"])
    with pytest.raises(ValueError, match="not among the run's domains"):
        sweep_main(["dataset.domains=[photo,sketch] sweep.held_out=[cartoon]"])


def test_real_sweep_stops_and_resumes(tmp_path, demo_cache, monkeypatch, capsys):
    """Three domains held out in turn, 2 rounds: stopped after two runs, then resumed with the third
    left half-finished; the resumed sweep redoes only that one."""
    monkeypatch.setenv("FEDCLIP_CACHE", demo_cache)
    out = tmp_path / "sweep"
    args = [f"dataset.domains=[photo,sketch,cartoon] training.rounds=2 sweep.out_dir={out}"]

    assert sweep_main([*args, "sweep.max_runs=2"]) == 0
    printed = capsys.readouterr().out
    assert "run 1/3: method=fedclip held_out=photo seed=0: held-out" in printed
    assert "run 3/3" not in printed and "1 run(s) not started (sweep.max_runs=2)" in printed
    assert "| cartoon | — |" in (out / "table.md").read_text()

    half = run_dir(out, "fedclip", "cartoon", 0) / "2026-01-01_00-00-00"  # as if killed mid-run
    half.mkdir(parents=True)
    (half / "metrics.jsonl").write_text('{"round": 0}\n')
    done_before = {d: next(run_dir(out, "fedclip", d, 0).glob("*/summary.json")) for d in ("photo", "sketch")}

    assert sweep_main(args) == 0
    printed = capsys.readouterr().out
    assert "run 1/3: method=fedclip held_out=photo seed=0: done before, skipped" in printed
    assert "run 2/3: method=fedclip held_out=sketch seed=0: done before, skipped" in printed
    assert "run 3/3: method=fedclip held_out=cartoon seed=0 (stopped half-way before: redone)" in printed
    assert all(p.is_file() for p in done_before.values())  # untouched
    assert not half.exists()
    assert len(list(run_dir(out, "fedclip", "cartoon", 0).glob("*/summary.json"))) == 1

    md = (out / "table.md").read_text()
    gen = md.split("## Generalization")[1].split("##")[0]
    rows = [line.split(" | ")[0][2:] for line in gen.splitlines() if line.startswith("| ")][1:]  # after the header
    assert rows == ["photo", "sketch", "cartoon", "**mean**"]
    index = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["done"] * 3
    summary = json.loads(done_before["photo"].read_text())
    assert summary["rounds"] == 2 and summary["held_out"] == "photo"
    assert (out / "plots" / "accuracy_cartoon.png").is_file() and (out / "plots" / "bytes_vs_accuracy.png").is_file()


def test_sweep_runs_promptfl_through_flwr_run(tmp_path, demo_cache, monkeypatch, capsys):
    """method=promptfl in a sweep: one real `flwr run` simulation (Ray) with the method set by --run-config overrides,
    its context the only thing that travels, and its column and cost row in the table."""
    monkeypatch.setenv("FEDCLIP_CACHE", demo_cache)
    out = tmp_path / "sweep"
    assert (
        sweep_main(
            [
                f"dataset.domains=[photo,sketch,cartoon] training.rounds=2 sweep.methods=[promptfl] "
                f"sweep.held_out=[sketch] "
                f"sweep.out_dir={out}"
            ]
        )
        == 0
    )
    assert "run 1/1: method=promptfl held_out=sketch seed=0: held-out" in capsys.readouterr().out
    [path] = run_dir(out, "promptfl", "sketch", 0).glob("*/summary.json")
    summary = json.loads(path.read_text())
    assert (
        'dataset.held_out=sketch seed=0 method=promptfl"'
        in (run_dir(out, "promptfl", "sketch", 0) / "flwr.log").read_text()
    )
    assert (
        summary["method"] == "promptfl" and summary["rounds"] == 2 and summary["generalization"]["sketch"] is not None
    )
    assert summary["trained_parameters"] == 4 * 64  # "a picture of a": 4 vectors of the demo CLIP's text width
    assert 4 * 4 * 64 <= summary["bytes_up_per_client_per_round"] < 2048  # the context (1 KiB) and its .npy header
    assert (path.parent / "prompt_final.safetensors").is_file() and (path.parent / "prompt_best.safetensors").is_file()
    md = (out / "table.md").read_text()
    assert "| held out | promptfl |" in md and "| promptfl | 256 |" in md


def test_sweep_runs_the_personal_and_two_tower_prompt_methods_through_flwr_run(tmp_path, demo_cache, monkeypatch):
    """The prompt methods added after PromptFL in one sweep of real `flwr run` simulations (Ray): each run completes,
    evaluates the held-out domain and reports each training domain's personalization."""
    monkeypatch.setenv("FEDCLIP_CACHE", demo_cache)
    out, methods = tmp_path / "sweep", ["personal_prompt", "conditioned_prompt", "clustered_prompt", "two_tower_prompt"]
    assert (
        sweep_main(
            [
                f"dataset.domains=[photo,sketch,cartoon] training.rounds=1 sweep.methods=[{','.join(methods)}] "
                f"sweep.held_out=[sketch] sweep.out_dir={out}"
            ]
        )
        == 0
    )
    for method in methods:
        [path] = run_dir(out, method, "sketch", 0).glob("*/summary.json")
        summary = json.loads(path.read_text())
        assert summary["method"] == method and summary["generalization"]["sketch"] is not None
        assert all(summary["personalization"][d] is not None for d in ("photo", "cartoon"))
