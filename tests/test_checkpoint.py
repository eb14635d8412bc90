"""Checkpoint after every round and resume from it: the weights, the round, the report rows and the strategy's state
(adaptive DP's clipping norm) survive; resumed runs driven through the ServerApp's loop."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, MessageType, MetricRecord, RecordDict
from flwr.common.differential_privacy_constants import KEY_CLIPPING_NORM
from safetensors.torch import load_file

from client_app.app import app as client_app
from common.config import load_config
from common.files import save_tensors
from common.methods.fedclip import FedClip
from common.model import AttentionAdapter
from server_app.app import app as server_app
from server_app.checkpoint import load_checkpoint, resume_run, save_checkpoint
from server_app.privacy import CLIPPING_NORM_STATE, with_privacy
from server_app.report import RunReport
from server_app.server_optimizer import ServerOptimizer
from server_app.strategy import FedClipStrategy
from tests.conftest import write_image_folder
from tests.inprocess import InProcessGrid, run_in_process

DOMAINS = ["a", "b", "sketch"]


def make_report(tmp_path, dim: int = 8, extra: str = "") -> tuple[RunReport, ArrayRecord]:
    cfg = load_config(f"output_dir={tmp_path} dataset.held_out=sketch selection=val_mean {extra}")
    torch.manual_seed(0)
    arrays = ArrayRecord(AttentionAdapter(dim).state_dict())
    return RunReport(cfg, {d: d for d in DOMAINS}, ["a", "b"], 2 * (dim * dim + dim), "adapter"), arrays


def evaluation(acc: float) -> MetricRecord:
    return MetricRecord({f"{d}/{s}-acc": acc for d in DOMAINS for s in ("val", "test", "all")})


def play(report: RunReport, arrays: ArrayRecord, rounds: int, accs: list[float]) -> ArrayRecord:
    """Rounds 0..rounds with a checkpoint after each, changing the adapter every round."""
    for r in range(rounds + 1):
        if r > 0:
            arrays = ArrayRecord({k: v + r for k, v in arrays.to_torch_state_dict().items()})
        report.add_round(
            r, MetricRecord({"a/train-loss": 1.0 / (r + 1)}) if r else MetricRecord(), evaluation(accs[r]), 0.1, arrays
        )
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
    assert new.selection.best["round"] == 1  # the best round of the first part stays the best so far
    assert (new.dir / "adapter_best.safetensors").read_bytes() == (old.dir / "adapter_best.safetensors").read_bytes()
    new.add_round(4, MetricRecord(), evaluation(0.6), 0.1, resumed)
    summary = new.finish(resumed)
    assert summary["rounds"] == 4 and summary["best_round"] == 4
    rows = [json.loads(line) for line in (new.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]


def test_resume_from_another_output_folder_warns_that_simulated_clients_start_afresh(tmp_path, caplog):
    """A simulation's clients keep their state under the run's output_dir: a resume that writes elsewhere says so,
    naming the folder to resume with; one that writes beside the resumed run says nothing."""
    old, arrays = make_report(tmp_path / "runs")
    play(old, arrays, 1, [0.1, 0.5])
    elsewhere, fresh = make_report(tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING):
        resume_run(str(old.dir), elsewhere, fresh)
    assert f"resume with output_dir={tmp_path / 'runs'} to keep them" in caplog.text
    caplog.clear()
    beside, fresh = make_report(tmp_path / "runs")
    with caplog.at_level(logging.WARNING):
        resume_run(str(old.dir), beside, fresh)
    assert "start afresh" not in caplog.text


def test_resume_refuses_what_does_not_fit(tmp_path):
    old, arrays = make_report(tmp_path / "run1")
    play(old, arrays, 1, [0.1, 0.2])
    nowhere = tmp_path / "nowhere"
    expected = (
        f"resume={nowhere}: no checkpoint.safetensors there. Pass the run folder the run logged as 'run folder: ...' "
        '(it gets a checkpoint after every round), e.g. overrides="resume=outputs/2026-01-01_12-00-00"'
    )
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(expected)}$"):
        resume_run(str(nowhere), *make_report(tmp_path / "run2"))
    with pytest.raises(ValueError, match="another CLIP"):
        resume_run(str(old.dir), *make_report(tmp_path / "run3", dim=16))
    other, fresh = make_report(tmp_path / "run4")
    other.domains = ["a", "c", "sketch"]
    with pytest.raises(ValueError, match="domains"):
        resume_run(str(old.dir), other, fresh)
    with pytest.raises(
        ValueError, match=r"seed \(now 1, then 0\)"
    ):  # another protocol: the rows would not mean the same
        resume_run(str(old.dir), *make_report(tmp_path / "run5", extra="seed=1"))


# --- resume through the server loop (ServerApp main on the in-process grid) ---------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


class CrashingGrid(InProcessGrid):
    """The in-process grid, keeping what each round's train messages carry; the server "crashes" (raises) when round
    `crash_round`'s train messages are pushed."""

    def __init__(self, client_app, run_config: dict, num_nodes: int, crash_round: int | None = None) -> None:
        super().__init__(client_app, run_config, num_nodes)
        self.crash_round = crash_round
        self.sent: dict[
            int, list[tuple[dict[str, np.ndarray], dict]]
        ] = {}  # round -> (arrays, config) of each train message

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == MessageType.TRAIN and "arrays" in msg.content.array_records:
                config = dict(msg.content["config"])
                if config["server-round"] == self.crash_round:
                    raise RuntimeError("the server crashed")
                self.sent.setdefault(config["server-round"], []).append(
                    ({k: v.numpy() for k, v in msg.content["arrays"].items()}, config)
                )
        return super().push_messages(messages)


def serve(grid_overrides: str, out: Path, crash_round: int | None = None, nodes: int = 3) -> tuple[CrashingGrid, Path]:
    """One run of the ServerApp (crashing at `crash_round`, if given); the grid and the run folder."""
    run_config = {"overrides": f"{grid_overrides} output_dir={out}"}
    before = set(out.glob("*/config.yaml"))
    grid = CrashingGrid(client_app, run_config, nodes, crash_round)
    if crash_round is None:
        server_app(grid, Context(1, 0, {}, RecordDict(), run_config))
    else:
        with pytest.raises(RuntimeError, match="the server crashed"):
            server_app(grid, Context(1, 0, {}, RecordDict(), run_config))
    [config] = set(out.glob("*/config.yaml")) - before  # this run's folder (beside others', and clients/)
    return grid, config.parent


def common(folder: Path, tiny_clip: Path, tmp_path: Path, rounds: int, extra: str = "") -> str:
    # a short round_timeout: a client that cannot answer fails the test in a minute, not an hour
    return (
        f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds={rounds} "
        f"training.batch_size=8 strategy.round_timeout=60 cache_dir={tmp_path / 'cache'} {extra}"
    )


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_crashed_run_resumes_from_its_last_checkpoint(folder, tiny_clip, tmp_path, caplog):
    """The server dies while pushing round 3: the checkpoint holds round 1's weights and rows 0-1 (round 2's row
    would have come with round 3's exchange). The resumed run trains round 2 from exactly those weights, does not
    evaluate round 1 again, and ends with every round's row once."""
    crashed_grid, crashed = serve(common(folder, tiny_clip, tmp_path, 3), tmp_path / "crashed", crash_round=3)
    ckpt = load_checkpoint(crashed)
    assert ckpt.round == 1 and [r["round"] for r in ckpt.rows] == [0, 1] and ckpt.rows == rows_of(crashed)
    with caplog.at_level(logging.INFO):
        grid, resumed = serve(common(folder, tiny_clip, tmp_path, 3, f"resume={crashed}"), tmp_path / "resumed")
    assert f"resumed from {crashed} after round 1; going on with round 2" in caplog.text
    assert sorted(grid.sent) == [2, 3]  # no round trained twice
    for arrays, config in grid.sent[2]:
        for key, value in ckpt.arrays.to_torch_state_dict().items():
            np.testing.assert_array_equal(arrays[key], value.numpy())  # round 2 trains from the checkpoint's weights
        # in the run's order, not the file's (Flower's DP mods compare it)
        assert list(arrays) == list(crashed_grid.sent[2][0][0])
        assert "evaluate-round" not in config  # round 1's weights were evaluated before the crash: not again
    assert [config["evaluate-round"] for _, config in grid.sent[3]] == [2, 2]
    rows = rows_of(resumed)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[:2] == ckpt.rows
    assert load_checkpoint(resumed).round == 3
    assert json.loads((resumed / "summary.json").read_text())["rounds"] == 3


def test_adaptive_clipping_goes_on_with_the_norm_it_had_learnt(folder, tiny_clip, tmp_path):
    """Client-side adaptive DP: the clipping norm the clients are sent in the resumed run's first round is the one the
    crashed run had learnt for that round, not strategy.dp.clipping_norm again."""
    dp = (
        "strategy.dp.side=client strategy.dp.clipping=adaptive strategy.dp.clipping_norm=0.001 "
        "strategy.dp.noise_multiplier=0.5 "
        "strategy.dp.clipped_count_stddev=0.5 strategy.dp.clip_norm_lr=0.5"
    )
    crashed_grid, crashed = serve(common(folder, tiny_clip, tmp_path, 3, dp), tmp_path / "crashed", crash_round=3)
    norms = {r: {config[KEY_CLIPPING_NORM] for _, config in sent} for r, sent in crashed_grid.sent.items()}
    # 0.001 clips every update: round 2's grew
    assert norms[1] == {0.001} and len(norms[2]) == 1 and norms[2] != {0.001}
    assert load_checkpoint(crashed).strategy == {CLIPPING_NORM_STATE: norms[2].pop()}
    grid, resumed = serve(common(folder, tiny_clip, tmp_path, 3, f"{dp} resume={crashed}"), tmp_path / "resumed")
    assert {config[KEY_CLIPPING_NORM] for _, config in grid.sent[2]} == {
        load_checkpoint(crashed).strategy[CLIPPING_NORM_STATE]
    }
    round3 = {config[KEY_CLIPPING_NORM] for _, config in grid.sent[3]}
    # each checkpoint keeps the norm of the round after it
    assert load_checkpoint(resumed).strategy[CLIPPING_NORM_STATE] not in round3


def test_an_old_checkpoint_without_the_norm_restarts_it_and_says_so(tmp_path, caplog):
    strategy = FedClipStrategy(
        {1: "a", 2: "b", 3: "sketch"}, "sketch", {"w": np.zeros(2, np.float32)}, "equal", 1, FedClip()
    )
    dp = load_config(
        "strategy.dp.side=server strategy.dp.clipping=adaptive strategy.dp.clipping_norm=0.3 "
        "strategy.dp.noise_multiplier=0"
    ).strategy.dp
    wrapped = with_privacy(strategy, dp)
    wrapped.load_checkpoint_state({})
    assert wrapped.clipping_norm == 0.3 and "the checkpoint holds no adaptive clipping norm" in caplog.text
    wrapped.load_checkpoint_state({CLIPPING_NORM_STATE: 0.7})
    assert wrapped.checkpoint_state() == {CLIPPING_NORM_STATE: 0.7}
    fixed = with_privacy(strategy, load_config("strategy.dp.side=server").strategy.dp)
    assert fixed.checkpoint_state() == {} == strategy.checkpoint_state()  # nothing learnt: nothing kept


@pytest.mark.parametrize("method", ["fedavg", "fedprox"])
def test_encoder_baselines_resume_with_their_best_encoder(method, folder, tiny_clip, tmp_path):
    """fedavg/fedprox checkpoint the image encoder: the resumed run starts from it and carries encoder_best over."""
    _, first = serve(common(folder, tiny_clip, tmp_path, 1, f"method={method}"), tmp_path / "first")
    best = first / "encoder_best.safetensors"
    assert best.exists() and load_checkpoint(first).arrays.keys() == load_file(best).keys()
    grid, resumed = serve(
        common(folder, tiny_clip, tmp_path, 2, f"method={method} resume={first}"), tmp_path / "resumed"
    )
    for arrays, _ in grid.sent[2]:
        for key, value in load_file(first / "encoder_final.safetensors").items():
            np.testing.assert_array_equal(arrays[key], value.numpy())  # round 2 trains from round 1's encoder
    rows = rows_of(resumed)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[:2] == rows_of(first)
    summary = json.loads((resumed / "summary.json").read_text())
    assert (resumed / "encoder_final.safetensors").exists()
    if summary["best_round"] == 1:  # the copied best encoder is the first run's
        assert (resumed / "encoder_best.safetensors").read_bytes() == best.read_bytes()
    else:
        assert load_file(resumed / "encoder_best.safetensors").keys() == load_file(best).keys()


def test_local_refuses_to_resume(folder, tiny_clip, tmp_path):
    _, first = serve(common(folder, tiny_clip, tmp_path, 1, "method=local"), tmp_path / "first")
    with pytest.raises(ValueError, match="resume= is not available for method=local: its weights live on the clients"):
        run_in_process(
            server_app,
            client_app,
            common(folder, tiny_clip, tmp_path, 2, f"method=local resume={first} output_dir={tmp_path / 'r'}"),
            3,
        )
    assert not (tmp_path / "r").exists()  # refused before anything ran


@pytest.mark.parametrize(
    "change,message",
    [
        ("method=centralized seed=3", "method (now 'centralized', then 'fedclip'), seed (now 3, then 0)"),
        ("method=centralized", "method (now 'centralized', then 'fedclip')"),
        ("dataset.held_out=a", "held_out (now 'a', then 'sketch')"),
        ("dataset.split=[0.5,0.25,0.25]", "split (now [0.5, 0.25, 0.25], then [0.6, 0.2, 0.2])"),
        ("dataset.clients_per_domain=2", "clients_per_domain (now 2, then 1)"),
        ("dataset.partition=dirichlet", "partition (now 'dirichlet', then 'shards')"),
        ("model.name_or_path=/elsewhere", "model (now '/elsewhere', then 'demo')"),
    ],
)
def test_resume_refuses_another_protocol(change, message, tmp_path):
    """Every setting the rows' meaning depends on must match the checkpoint's run."""
    old, arrays = make_report(tmp_path / "run1")
    play(old, arrays, 1, [0.1, 0.2])
    with pytest.raises(
        ValueError,
        match=re.escape(f"this run differs from the checkpoint's in {message}; resume with the same settings"),
    ):
        resume_run(str(old.dir), *make_report(tmp_path / "run2", extra=change))


def test_a_checkpoint_names_the_rows_and_does_not_grow_with_them(tmp_path):
    """At 1,000 clients a row is about half a megabyte: a checkpoint that copied every row rewrote them all each round.
    It holds where metrics.jsonl's rows end and their hash; a round the server had not checkpointed is left out."""
    report, arrays = make_report(tmp_path / "run1")
    big = MetricRecord({f"client{c}/{m}-acc": 0.5 for c in range(500) for m in ("val", "test", "all")})
    sizes = []
    for r in range(4):
        report.add_round(r, MetricRecord(), MetricRecord({**evaluation(0.1 * r), **big}), 0.1, arrays)
        save_checkpoint(report, arrays)
        sizes.append((report.dir / "checkpoint.safetensors").stat().st_size)
    assert max(sizes) - min(sizes) <= 16 and (report.dir / "metrics.jsonl").stat().st_size > 4 * 500 * 3 * 20
    report.add_round(4, MetricRecord(), evaluation(0.9), 0.1, arrays)  # the server stops before its checkpoint
    ckpt = load_checkpoint(report.dir)
    assert ckpt.round == 3 and ckpt.rows == report.rows[:4]


@pytest.mark.parametrize("damage", ["changed", "cut", "missing"])
def test_rows_that_are_not_the_checkpoints_are_refused(damage, tmp_path):
    report, arrays = make_report(tmp_path / "run1")
    play(report, arrays, 2, [0.1, 0.5, 0.4])
    rows = report.dir / "metrics.jsonl"
    if damage == "changed":
        rows.write_text(rows.read_text().replace('"round": 1', '"round": 7'))
    elif damage == "cut":
        rows.write_bytes(rows.read_bytes()[:-10])
    else:
        rows.unlink()
    with pytest.raises(ValueError, match="is not what the checkpoint was written with|cannot be read"):
        load_checkpoint(report.dir)


@pytest.mark.parametrize("meta", [{"method": "fedclip"}, {"round": "1"}, {"rows": "[]"}])
def test_a_file_without_round_and_rows_is_not_a_checkpoint(meta, tmp_path):
    report, arrays = make_report(tmp_path / "run1")
    save_tensors(arrays.to_torch_state_dict(), report.dir / "checkpoint.safetensors", meta)  # e.g. an adapter file
    with pytest.raises(ValueError, match="is not a FedCLIP checkpoint \\(no round/rows metadata\\)"):
        load_checkpoint(report.dir)


def test_an_older_checkpoint_without_protocol_or_strategy_state_loads(tmp_path):
    report, arrays = make_report(tmp_path / "run1")
    rows = [{"round": 0}, {"round": 1}]
    save_tensors(
        arrays.to_torch_state_dict(), report.dir / "checkpoint.safetensors", {"round": "1", "rows": json.dumps(rows)}
    )
    ckpt = load_checkpoint(report.dir)
    assert (ckpt.round, ckpt.rows, ckpt.protocol, ckpt.strategy, ckpt.optimizer) == (1, rows, {}, {}, {})


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    report, arrays = make_report(tmp_path / "run1")
    save_tensors(
        arrays.to_torch_state_dict(),
        report.dir / "checkpoint.safetensors",
        {"round": "3", "rows": json.dumps([{"round": 0}, {"round": 1}])},
    )
    with pytest.raises(ValueError, match="is inconsistent: round 3 but 2 report rows"):
        load_checkpoint(report.dir)
    save_tensors(arrays.to_torch_state_dict(), report.dir / "checkpoint.safetensors", {"round": "0", "rows": "[]"})
    with pytest.raises(ValueError, match="is inconsistent: round 0 but 0 report rows"):
        load_checkpoint(report.dir)


def test_resume_after_zero_shot_only_starts_at_round_one(tmp_path):
    old, arrays = make_report(tmp_path / "run1")
    play(old, arrays, 0, [0.3])
    new, fresh = make_report(tmp_path / "run2")
    resumed, first_round = resume_run(str(old.dir), new, fresh)
    assert first_round == 1 and new.selection.best is None and not (new.dir / "adapter_best.safetensors").exists()
    assert load_checkpoint(new.dir).round == 0 and load_checkpoint(new.dir).rows == load_checkpoint(old.dir).rows
    assert all(torch.equal(resumed.to_torch_state_dict()[k], v) for k, v in arrays.to_torch_state_dict().items())


class RememberingStrategy:
    """A strategy with state: what resume_run gives it and what it checkpoints."""

    def __init__(self, state: dict[str, float]) -> None:
        self.state, self.loaded = state, None

    def checkpoint_state(self) -> dict[str, float]:
        return self.state

    def load_checkpoint_state(self, state) -> None:
        self.loaded = dict(state)


def test_the_resumed_runs_own_checkpoint_keeps_the_optimizer_and_the_strategy_state(tmp_path):
    """resume_run checkpoints the new run folder at once: a crash before its first round must not lose either state."""
    old, arrays = make_report(tmp_path / "run1")
    optimizer = ServerOptimizer("fedadam", lr=0.01)
    optimizer.step(1, arrays, ArrayRecord({k: v + 1 for k, v in arrays.to_torch_state_dict().items()}))
    moments = optimizer.state()
    for r in range(2):
        old.add_round(r, MetricRecord(), evaluation(0.1 * (r + 1)), 0.1, arrays)
        save_checkpoint(old, arrays, optimizer, {"dp-clipping-norm": 0.25})
    new, fresh = make_report(tmp_path / "run2")
    strategy, resumed_optimizer = RememberingStrategy({"dp-clipping-norm": 0.5}), ServerOptimizer("fedadam", lr=0.01)
    resume_run(str(old.dir), new, fresh, resumed_optimizer, strategy)
    assert strategy.loaded == {"dp-clipping-norm": 0.25}  # what the old run had
    ckpt = load_checkpoint(new.dir)
    assert ckpt.strategy == {"dp-clipping-norm": 0.5}  # what the strategy holds now
    assert ckpt.optimizer.keys() == moments.keys() and all(
        np.array_equal(ckpt.optimizer[k], moments[k]) for k in moments
    )
