"""The run report when a client is lost: rounds compared on the same clients, incomplete rounds named, honest
traffic means."""

from __future__ import annotations

import csv
import json
import logging
import re
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from client_app.app import app as client_app
from common.config import load_config
from common.methods.base import load_method
from server_app.app import app as server_app
from server_app.options import refuse_options
from server_app.report import RunReport
from server_app.table import format_bytes
from server_app.traffic import message_bytes
from tests.conftest import reply_from, write_image_folder
from tests.inprocess import InProcessGrid

CLIENTS = {"a": "a", "b": "b", "sketch": "sketch"}  # one client per domain: the client is the domain


def make_report(tmp_path) -> RunReport:
    return RunReport(
        load_config(f"output_dir={tmp_path} dataset.held_out=sketch selection=val_mean"),
        CLIENTS,
        ["a", "b"],
        10,
        "adapter",
    )


def evaluation(**accs: float) -> MetricRecord:
    """Each named client's val and test accuracy (the held-out one's over all its images); absent clients were lost."""
    metrics = {}
    for client, acc in accs.items():
        for split in ("all",) if client == "sketch" else ("val", "test"):
            metrics[f"{client}/{split}-acc"], metrics[f"{client}/num-{split}"] = acc, 10
    return MetricRecord(metrics)


def weights(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(2, value, np.float32))})


def test_a_round_that_lost_a_client_is_compared_on_the_clients_it_kept(tmp_path, caplog):
    report = make_report(tmp_path)
    report.add_round(0, MetricRecord(), evaluation(a=0.5, b=0.2, sketch=0.3), 0.0, weights(0))
    report.add_round(1, MetricRecord(), evaluation(a=0.8, b=0.4, sketch=0.4), 0.1, weights(1))  # val mean 0.6
    with caplog.at_level(logging.WARNING):
        # b lost: "mean" 0.7, but a got worse
        report.add_round(2, MetricRecord(), evaluation(a=0.7, sketch=0.5), 0.1, weights(2))
    assert (
        report.selection.best["round"] == 1
    )  # on a, the only client evaluated in both rounds, round 1 is better (0.8 > 0.7)
    assert report.rows[2]["missing"] == ["b"] and report.rows[1]["missing"] == []
    assert "round 2: no evaluation from b" in caplog.text
    # b still lost; a better than at round 1
    report.add_round(3, MetricRecord(), evaluation(a=0.9, sketch=0.5), 0.1, weights(3))
    assert report.selection.best["round"] == 3
    assert load_file(report.dir / "adapter_best.safetensors")["w"][0] == 3  # the best round's weights were kept
    summary = report.finish(weights(3))
    assert summary["best_round"] == 3 and summary["incomplete_rounds"] == [2, 3]
    # personalization and its zero-shot baseline over the same clients: a's test split at rounds 3 and 0
    assert summary["personalization_clients"] == ["a"]
    assert summary["personalization_mean"] == 0.9 and summary["zero_shot_train_domains_mean"] == 0.5
    assert summary["personalization"] == {"a": 0.9, "b": None}
    assert "compared on the clients evaluated in both round 3 and round 0: a" in caplog.text
    csv_rows = (report.dir / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].split(",")[6] == "missing" and csv_rows[3].split(",")[6] == "b"


def test_a_complete_run_reports_as_before(tmp_path):
    report = make_report(tmp_path)
    for r, acc in enumerate([0.2, 0.6, 0.5]):
        report.add_round(r, MetricRecord(), evaluation(a=acc, b=acc + 0.1, sketch=acc), 0.1, None)
    summary = report.finish(None)
    assert summary["best_round"] == 1 and summary["incomplete_rounds"] == []
    assert summary["personalization_clients"] == ["a", "b"]
    assert (
        summary["personalization_mean"] == (0.6 + 0.7) / 2
        and summary["zero_shot_train_domains_mean"] == (0.2 + 0.3) / 2
    )


def message(node: int, size: int) -> Message:
    return Message(
        RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(size, np.float32))}), "config": ConfigRecord()}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )


def update(node: int, size: int) -> Message:
    return reply_from(
        node,
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.zeros(size, np.float32))}),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        ),
    )


def test_a_client_that_never_replied_does_not_count_as_sending_nothing(tmp_path):
    report = make_report(tmp_path)
    nodes = {1: "a", 2: "b", 3: "sketch"}
    sent = [message(1, 100), message(2, 100)]
    # b got the adapter, its reply was an error
    replies = [
        update(1, 50),
        reply_from(2, error="Error: Node Unavailable"),
    ]
    report.traffic.count(nodes, sent, replies)
    report.add_round(1, MetricRecord(), evaluation(a=0.5, sketch=0.5), 0.1, None)
    row = report.rows[0]
    assert row["bytes_down_per_client"] == message_bytes(sent[0])  # both were sent the adapter
    assert row["bytes_up_per_client"] == message_bytes(replies[0])  # only a sent one back: b's loss does not halve it
    assert row["bytes_round"] == 2 * message_bytes(sent[0]) + message_bytes(replies[0])  # every byte moved
    assert row["lost"] == ["b"]  # an error for a reply: lost this round
    report.traffic.count(nodes, [message(1, 100)], [])  # a round in which no training client replied at all
    report.add_round(2, MetricRecord(), evaluation(sketch=0.5), 0.1, None)
    assert report.rows[1]["bytes_up_per_client"] is None
    assert json.loads((report.dir / "metrics.jsonl").read_text().splitlines()[1])["bytes_up_per_client"] is None


class LosingGrid(InProcessGrid):
    """The in-process grid, with one node that dies when round `dies_in`'s training reaches it: the SuperLink answers
    for it with an error, and from the next round on it is no longer connected."""

    def __init__(self, client_app, run_config: dict, num_nodes: int, lost_node: int, dies_in: int) -> None:
        super().__init__(client_app, run_config, num_nodes)
        self.lost_node, self.dies_in, self.dead = lost_node, dies_in, False

    def get_node_ids(self):
        return [n for n in super().get_node_ids() if not (self.dead and n == self.lost_node)]

    def push_messages(self, messages):
        messages, ids = list(messages), []
        for msg in messages:
            config = msg.content.config_records.get("config", {})
            self.dead |= msg.metadata.dst_node_id == self.lost_node and config.get("server-round") == self.dies_in
            if self.dead and msg.metadata.dst_node_id == self.lost_node:
                msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                reply = Message(error=Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's id: it answers for a node it lost
                self.replies[msg.metadata.message_id] = reply
                ids.append(msg.metadata.message_id)
            else:
                ids += super().push_messages([msg])
        return ids


def test_a_run_that_loses_a_node_names_the_incomplete_rounds_and_averages_bytes_over_the_repliers(tiny_clip, tmp_path):
    folder = write_image_folder(tmp_path / "data")
    overrides = (
        f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds=3 "
        f"training.batch_size=8 cache_dir={tmp_path / 'cache'} output_dir={tmp_path / 'out'}"
    )
    run_config = {"overrides": overrides}
    grid = LosingGrid(client_app, run_config, 3, lost_node=100, dies_in=2)
    server_app(grid, Context(1, 0, {}, RecordDict(), run_config))
    [path] = (tmp_path / "out").glob("*/summary.json")
    summary = json.loads(path.read_text())
    rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    [lost] = [
        k.removesuffix("/train-loss")
        for k in rows[1]["train"]
        if k.endswith("/train-loss") and k not in rows[2]["train"]
    ]
    adapter = 4 * summary["trained_parameters"]  # one float32 adapter back per training client that replied
    # round 2: the lost node sent nothing
    assert all(adapter <= r["bytes_up_per_client"] <= adapter + 1024 for r in rows[1:3])
    # round 1's evaluation rode on round 2's training message, which the lost node never answered
    assert [r["missing"] for r in rows] == [[], [lost], [lost], [lost]]
    assert [r["lost"] for r in rows] == [
        [],
        [],
        [lost],
        [],
    ]  # its round-2 message went unanswered; after that it was not sent one
    assert summary["incomplete_rounds"] == [1, 2, 3]
    assert lost not in summary["personalization_clients"] and summary["personalization_clients"]


def sized(**accs: tuple[float, int]) -> MetricRecord:
    """Each named training client's val accuracy over its number of val images (held-out sketch fixed at 0.3)."""
    metrics = {"sketch/all-acc": 0.3, "sketch/num-all": 10}
    for client, (acc, n) in accs.items():
        metrics[f"{client}/val-acc"], metrics[f"{client}/num-val"] = acc, n
        metrics[f"{client}/test-acc"], metrics[f"{client}/num-test"] = acc, n
    return MetricRecord(metrics)


def test_the_selection_rules_choose_their_own_rounds_and_the_summary_gives_each(tmp_path):
    # domain a has 30 validation images, b has 2: the mean over domains weighs b's two images like a's thirty
    rounds = [
        sized(a=(0.5, 30), b=(0.5, 2)),
        sized(a=(0.4, 30), b=(1.0, 2)),  # domain mean 0.70, pooled 0.44
        sized(a=(0.6, 30), b=(0.5, 2)),  # domain mean 0.55, pooled 0.59
        sized(a=(0.6, 30), b=(0.0, 2)),
    ]  # the last round: domain mean 0.30, pooled 0.56
    chosen = {}
    for rule, expected in (("val_mean", 1), ("val_pooled", 2), ("last", 3)):
        report = RunReport(
            load_config(f"output_dir={tmp_path / rule} dataset.held_out=sketch selection={rule}"),
            CLIENTS,
            ["a", "b"],
            10,
            "adapter",
        )
        for r, metrics in enumerate(rounds):
            report.add_round(r, MetricRecord(), metrics, 0.1, weights(r))
        summary = report.finish(weights(3))
        assert summary["selection"] == rule and summary["best_round"] == expected
        assert load_file(report.dir / "adapter_best.safetensors")["w"][0] == expected
        chosen[rule] = summary["selections"]
    assert chosen["val_mean"] == chosen["last"] == chosen["val_pooled"]  # every run reports every rule's round
    assert {rule: o["round"] for rule, o in chosen["last"].items()} == {"val_mean": 1, "val_pooled": 2, "last": 3}
    assert chosen["last"]["val_pooled"]["personalization_mean"] == (0.6 + 0.5) / 2
    assert chosen["last"]["last"]["zero_shot_train_domains_mean"] == 0.5


def test_an_unknown_selection_rule_is_refused(tmp_path):
    cfg = load_config(f"output_dir={tmp_path} selection=best")
    with pytest.raises(ValueError, match=r"^selection='best': choose one of val_mean, val_pooled, last$"):
        refuse_options(cfg, load_method(cfg))
    with pytest.raises(ValueError, match="unknown selection rule 'best'"):  # a report built directly
        RunReport(cfg, CLIENTS, ["a", "b"], 10, "adapter")


# --- best-round selection (RoundSelection.beats) -----------------------------------------------------------------
# selection=val_mean: the rules that compare validation accuracies share its comparison (common clients, ties).

SHARDED = {"a#0": "a", "a#1": "a", "b#0": "b", "b#1": "b", "sketch": "sketch"}  # two clients per training domain


def sharded_report(tmp_path, fraction_evaluate: float = 1.0) -> RunReport:
    cfg = load_config(
        f"output_dir={tmp_path} dataset.held_out=sketch selection=val_mean "
        f"strategy.fraction_evaluate={fraction_evaluate}"
    )
    return RunReport(cfg, SHARDED, ["a#0", "a#1", "b#0", "b#1"], 10, "adapter")


def sharded_evaluation(**accs: float) -> MetricRecord:
    """Val and test accuracy of each named training client (100 images each), and the held-out client's."""
    metrics = {"sketch/all-acc": 0.3, "sketch/num-all": 10}
    for client, acc in accs.items():
        name = client.replace("_", "#")
        for split in ("val", "test"):
            metrics[f"{name}/{split}-acc"], metrics[f"{name}/num-{split}"] = acc, 100
    return MetricRecord(metrics)


def test_rounds_with_no_training_client_in_common_are_compared_on_their_own_means(tmp_path, caplog):
    """Sampled evaluation: each round evaluates other clients. The held-out client is in every round but says nothing
    about the validation mean, so two rounds that share no training client fall back to their own means."""
    report = sharded_report(tmp_path, fraction_evaluate=0.5)
    report.add_round(0, MetricRecord(), sharded_evaluation(a_0=0.2, a_1=0.2, b_0=0.2, b_1=0.2), 0.0, weights(0))
    with caplog.at_level(logging.WARNING):
        report.add_round(1, MetricRecord(), sharded_evaluation(a_0=0.5, b_0=0.5), 0.1, weights(1))  # own mean 0.5
        # nothing in common: 0.6 > 0.5
        report.add_round(2, MetricRecord(), sharded_evaluation(a_1=0.7, b_1=0.5), 0.1, weights(2))
    assert report.selection.best["round"] == 2
    # sampled by design: no warning
    assert report.rows[2]["missing"] == ["a#0", "b#0"] and "no evaluation from" not in caplog.text
    # b#1 in common with round 2: compared on it alone (0.45 < 0.5), although this round's own mean (0.675) is higher
    report.add_round(3, MetricRecord(), sharded_evaluation(a_0=0.9, b_1=0.45), 0.1, weights(3))
    assert report.selection.best["round"] == 2
    assert load_file(report.dir / "adapter_best.safetensors")["w"][0] == 2


def test_a_round_that_only_ties_the_best_does_not_replace_it(tmp_path):
    report = sharded_report(tmp_path)
    report.add_round(0, MetricRecord(), sharded_evaluation(a_0=0.2, a_1=0.2, b_0=0.2, b_1=0.2), 0.0, weights(0))
    report.add_round(1, MetricRecord(), sharded_evaluation(a_0=0.6, a_1=0.4, b_0=0.5, b_1=0.5), 0.1, weights(1))  # 0.5
    # 0.5: a tie
    report.add_round(2, MetricRecord(), sharded_evaluation(a_0=0.4, a_1=0.6, b_0=0.5, b_1=0.5), 0.1, weights(2))
    assert report.selection.best["round"] == 1  # the earlier round is kept: a later equal one is not better
    # b#0 lost: a tie on the rest
    report.add_round(3, MetricRecord(), sharded_evaluation(a_0=0.6, a_1=0.4, b_1=0.5), 0.1, weights(3))
    assert report.selection.best["round"] == 1
    # barely better
    report.add_round(4, MetricRecord(), sharded_evaluation(a_0=0.6, a_1=0.4, b_0=0.5, b_1=0.50001), 0.1, weights(4))
    assert report.selection.best["round"] == 4 and load_file(report.dir / "adapter_best.safetensors")["w"][0] == 4
    assert report.finish(weights(4))["best_round"] == 4


def test_a_round_with_no_validation_accuracy_is_never_the_best(tmp_path):
    """A round in which only the held-out client was evaluated has no validation mean: it cannot be chosen, and a
    round that has one is chosen over none."""
    report = sharded_report(tmp_path, fraction_evaluate=0.5)
    report.add_round(0, MetricRecord(), sharded_evaluation(a_0=0.2, a_1=0.2, b_0=0.2, b_1=0.2), 0.0, weights(0))
    report.add_round(1, MetricRecord(), sharded_evaluation(), 0.1, weights(1))
    assert report.rows[1]["val_acc_mean"] is None and report.selection.best is None
    report.add_round(2, MetricRecord(), sharded_evaluation(b_1=0.1), 0.1, weights(2))
    assert report.selection.best["round"] == 2
    report.add_round(3, MetricRecord(), sharded_evaluation(), 0.1, weights(3))
    assert report.selection.best["round"] == 2
    assert report.finish(weights(3))["best_round"] == 2


def test_zero_shot_is_never_the_best_round_even_when_no_round_beats_it(tmp_path):
    report = sharded_report(tmp_path)
    report.add_round(0, MetricRecord(), sharded_evaluation(a_0=0.9, a_1=0.9, b_0=0.9, b_1=0.9), 0.0, weights(0))
    report.add_round(1, MetricRecord(), sharded_evaluation(a_0=0.1, a_1=0.1, b_0=0.1, b_1=0.1), 0.1, weights(1))
    assert report.selection.best["round"] == 1  # the best trained round: round 0's weights are no adapter


# --- what a run folder holds, the round table, the byte counts ----------------------------------------------


def test_the_round_table_prints_each_rounds_row(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        report = make_report(tmp_path)
        report.add_round(0, MetricRecord(), evaluation(a=0.5, b=0.25, sketch=0.125), 0.0, None)
        report.traffic.count({1: "a", 2: "b"}, [message(1, 2048), message(2, 2048)], [update(1, 1024), update(2, 1024)])
        report.add_round(
            1,
            MetricRecord({"a/train-loss": 0.5, "b/train-loss": 0.25}),
            evaluation(a=0.75, b=0.5, sketch=0.25),
            1.5,
            None,
        )
    lines = [r.getMessage() for r in caplog.records if " | " in r.getMessage()]
    cell = lambda c: f"{c:>10}"  # noqa: E731
    assert lines[0] == " | ".join(
        map(cell, ["round", "train loss", "a", "b", "sketch*", "val mean", "sent/client", "seconds"])
    )
    assert lines[1] == " | ".join(map(cell, ["0", "-", "50.00", "25.00", "12.50", "37.50", "0 B", "0.00"]))
    sent = format_bytes(message_bytes(message(1, 2048)) + message_bytes(update(1, 1024)))
    assert lines[2] == " | ".join(map(cell, ["1", "0.3750", "75.00", "50.00", "25.00", "62.50", sent, "1.50"]))


def test_the_run_folder_holds_the_config_the_model_and_the_tables(tmp_path):
    cfg = load_config(f"output_dir={tmp_path} dataset.held_out=sketch selection=val_mean")
    report = RunReport(cfg, CLIENTS, ["a", "b"], 10, "encoder", ["cat", "dog"], "abc123")
    # sorts by start time
    assert report.dir.parent == tmp_path and re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", report.dir.name)
    assert json.loads((report.dir / "run.json").read_text()) == {
        "classes": ["cat", "dog"],
        "model_fingerprint": "abc123",
        "run_key": report.run_key,  # a new run's own: what its clients keep between rounds is saved under it
    }
    assert uuid.UUID(hex=report.run_key).hex == report.run_key
    assert OmegaConf.load(report.dir / "config.yaml") == cfg
    report.add_round(0, MetricRecord(), evaluation(a=0.5, b=0.2, sketch=0.3), 0.0, weights(0))
    report.add_round(1, MetricRecord({"a/train-loss": 1.0}), evaluation(a=0.6, b=0.4, sketch=0.4), 2.0, weights(1))
    errors = [reply_from(2, error="Error: Node Unavailable"), reply_from(3, error="Error: Node Unavailable")]
    report.traffic.count({1: "a", 2: "b", 3: "sketch"}, [message(2, 100), message(3, 100)], errors)
    report.add_round(2, MetricRecord({"a/train-loss": 0.5}), evaluation(a=0.1), 4.0, weights(2))  # b and sketch lost
    summary = report.finish(weights(2))
    assert [p.name for p in report.files()] == [
        "encoder_best.safetensors",
        "encoder_final.safetensors",
        "run.json",
        "config.yaml",
        "metrics.csv",
        "summary.json",
    ] and all(p.is_file() for p in report.files())
    with safe_open(
        report.dir / "encoder_best.safetensors", "pt"
    ) as fh:  # selection=val_mean: round 1 has the best validation mean
        assert fh.metadata() == {"round": "1", "method": "fedclip"}
    with safe_open(report.dir / "encoder_final.safetensors", "pt") as fh:
        assert fh.metadata() == {"round": "2", "method": "fedclip"}  # the last round's
    rows = list(csv.DictReader((report.dir / "metrics.csv").open()))
    assert list(rows[0]) == [
        "round",
        "train_loss",
        "val_acc_mean",
        "acc/a",
        "acc/b",
        "acc/sketch",
        "missing",
        "bytes_down_per_client",
        "bytes_up_per_client",
        "bytes_round",
        "seconds",
        "lost",
        "rejected",
    ]
    assert (
        rows[1]["round"] == "1"
        and rows[1]["train_loss"] == "1.0"
        and float(rows[1]["val_acc_mean"]) == pytest.approx(0.5)
    )
    assert rows[2]["missing"] == "b;sketch" and rows[2]["lost"] == "b;sketch" and rows[2]["acc/b"] == ""
    assert json.loads((report.dir / "summary.json").read_text()) == summary
    assert (
        summary["seconds_per_round"] == 3.0
        and summary["rounds"] == 2
        and summary["trained_parameters"] == 10
        and summary["dp"] is None
    )
    assert summary["generalization"] == {"sketch": 0.4} and summary["zero_shot"] == {"a": 0.5, "b": 0.2, "sketch": 0.3}
    assert 0 <= summary["wall_seconds"] < 600
    down, up = summary["bytes_down_per_client_per_round"], summary["bytes_up_per_client_per_round"]
    # round 2's two messages; errors carry nothing
    assert summary["bytes_per_client_per_round"] == down + up and summary["bytes_total"] == 2 * message_bytes(
        message(2, 100)
    )


def test_personalization_is_compared_with_zero_shot_on_the_clients_evaluated_in_both(tmp_path):
    """b's zero-shot evaluation was lost: its personalization at the best round has no baseline, so it is left out."""
    report = make_report(tmp_path)
    report.add_round(0, MetricRecord(), evaluation(a=0.5, sketch=0.3), 0.0, None)
    report.add_round(1, MetricRecord(), evaluation(a=0.6, b=0.9, sketch=0.4), 0.1, None)
    summary = report.finish(None)
    assert summary["personalization"] == {"a": 0.6, "b": None} and summary["personalization_clients"] == ["a"]
    assert summary["personalization_mean"] == 0.6 and summary["zero_shot_train_domains_mean"] == 0.5


def test_rows_of_an_older_run_without_missing_are_written(tmp_path):
    """A resumed run carries the rows of the checkpoint's run; one from before `missing` existed lacks the key."""
    report = make_report(tmp_path)
    report.add_round(0, MetricRecord(), evaluation(a=0.5, b=0.2, sketch=0.3), 0.0, None)
    del report.rows[0]["missing"]
    report.add_round(1, MetricRecord(), evaluation(a=0.6, b=0.4, sketch=0.4), 1.0, None)
    report.finish(None)
    rows = list(csv.DictReader((report.dir / "metrics.csv").open()))
    assert [r["missing"] for r in rows] == ["", ""]


def test_a_run_that_keeps_no_weights_saves_none(tmp_path):
    report = RunReport(load_config(f"output_dir={tmp_path} dataset.held_out=sketch"), CLIENTS, ["a", "b"], 10, None)
    report.add_round(0, MetricRecord(), evaluation(a=0.5, b=0.2, sketch=0.3), 0.0, weights(0))
    report.add_round(1, MetricRecord(), evaluation(a=0.6, b=0.4, sketch=0.4), 0.1, weights(1))
    report.finish(weights(1))
    assert not list(report.dir.glob("*.safetensors"))
    zero_shot_only = make_report(tmp_path / "zs")
    zero_shot_only.add_round(0, MetricRecord(), evaluation(a=0.5, b=0.2, sketch=0.3), 0.0, weights(0))
    summary = zero_shot_only.finish(weights(0))
    assert not list(zero_shot_only.dir.glob("*.safetensors")) and summary["best_round"] == 0 and summary["rounds"] == 0
    assert [summary[f"bytes_{way}per_client_per_round"] for way in ("down_", "up_", "")] == [0, 0, 0]
    assert summary["seconds_per_round"] is None


def test_message_bytes_count_the_tensors_and_the_bytes_in_config_records():
    arrays = ArrayRecord({"w": Array(np.zeros(10, np.float32))})
    content = RecordDict(
        {
            "arrays": arrays,
            "config": ConfigRecord({"key": b"12345", "shares": [b"ab", b"cde"], "round": 3, "name": "x"}),
        }
    )
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    assert message_bytes(msg) == len(arrays["w"].data) + 5 + 2 + 3
    assert message_bytes(reply_from(1, error="lost")) == 0
    assert len(arrays["w"].data) > 40  # the .npy header is counted: what travels


@pytest.mark.parametrize(
    "n,text",
    [
        (None, "—"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2**20, "1.0 MiB"),
        (4.01 * 2**20, "4.0 MiB"),
        (3 * 2**30, "3.0 GiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_traffic_and_images_encoded_are_counted_per_client(tmp_path):
    report = make_report(tmp_path)
    fused = update(1, 100)
    fused.content["metrics"]["evaluation/images-encoded"] = 7
    fused.content["metrics"]["images-encoded"] = 5
    report.traffic.count(
        {1: "a", 2: "b"}, [message(1, 10), message(2, 10)], [reply_from(1, error="lost"), fused, update(2, 100)]
    )
    traffic = report.traffic
    assert traffic.images_encoded == 12 and traffic.up["a"] == traffic.up["b"] == message_bytes(fused)
    assert traffic.down == {"a": message_bytes(message(1, 10)), "b": message_bytes(message(2, 10))}
    report.add_round(1, MetricRecord(), evaluation(a=0.5, b=0.5, sketch=0.5), 0.1, None)
    assert not traffic.down and not traffic.up  # the next round counts afresh
    assert report.rows[0]["bytes_round"] == 2 * message_bytes(message(1, 10)) + 2 * message_bytes(fused)


def test_a_run_without_weights_gives_mlflow_no_weight_files(tmp_path):
    report = RunReport(load_config(f"output_dir={tmp_path} method=zero_shot"), CLIENTS, ["a", "b"], 0, None)
    assert [p.name for p in report.files()] == ["run.json", "config.yaml", "metrics.csv", "summary.json"]


def test_a_domains_test_accuracy_is_the_personalized_one_when_a_client_fine_tuned_and_pooled_validation_weighs_images(
    tmp_path,
):
    report = make_report(tmp_path)
    local = MetricRecord(
        {
            "a/test-acc": 0.5,
            "a/personalized-test-acc": 0.9,
            "a/num-test": 10,
            "a/val-acc": 0.4,
            "a/num-val": 30,
            "b/val-acc": 0.8,
            "b/num-val": 10,
        }
    )
    assert report.scores.accuracy(local, "a") == 0.9  # method=local: each client's own adapter on its own test split
    assert report.scores.accuracy(local, "a", "val") == 0.4  # validation is never the personalized score
    assert report.scores.val_pooled(local) == pytest.approx((0.4 * 30 + 0.8 * 10) / 40)  # every validation image once
    assert report.scores.val_mean(local) == pytest.approx((0.4 + 0.8) / 2)  # each domain once


def test_a_rows_rejected_clients_are_those_screening_left_out(tmp_path):
    report = make_report(tmp_path)
    report.add_round(
        1,
        MetricRecord({"a/rejected": 1, "a/train-loss": 1.0, "b/train-loss": 2.0}),
        evaluation(a=0.5, b=0.5),
        0.1,
        None,
    )
    assert report.rows[0]["rejected"] == ["a"]
