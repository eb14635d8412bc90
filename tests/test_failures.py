"""Clients that fail are said at the round it happens, named with their error and kept in summary.json; a round in which
fewer than strategy.min_train_fraction of the training clients replied, or a discovery fewer nodes answered, stops the
run with an error instead of ending with exit 0 and the numbers of a federation it was not (the in-process grid: a
handler that raises is an error reply, as in a real run).

Found on a Ray cluster whose worker could not import the app: 7 of 8 clients failed, the run trained on one and wrote a
summary.json with a held-out accuracy of None and no sign of the failures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import client_app.app as client_module
from server_app.app import app as server_app
from server_app.federation import FederationError
from tests.conftest import write_image_folder
from tests.inprocess import run_folder, run_in_process

MISSING = "ModuleNotFoundError: No module named 'client_app'"  # what a worker without the app's code replies


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


def failing_app(partitions: set[int], *, from_round: int = 1, query: bool = False) -> ClientApp:
    """The real handlers; the clients of `partitions` fail as a worker without the app's code does: every train
    message from round `from_round` on (with `query`: already the discovery's query)."""

    def fail(msg: Message, ctxt: Context, call_next) -> Message:
        if int(ctxt.node_config["partition-id"]) in partitions:
            config = msg.content.config_records.get("config", {})
            if (query and msg.metadata.message_type == "query") or int(config.get("server-round", 0)) >= from_round:
                raise ModuleNotFoundError(MISSING.partition(": ")[2])
        return call_next(msg, ctxt)

    app = ClientApp()
    app.query(mods=[fail])(client_module.query)
    app.train(mods=[fail])(client_module.train)
    app.evaluate()(client_module.evaluate)
    return app


def run(app: ClientApp, tiny_clip: Path, folder: Path, out: Path, options: str = "") -> None:
    overrides = (
        f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds=3 training.batch_size=8 dataset.clients_per_domain=2 cache_dir={out.parent / 'cache'} "
        f"output_dir={out} {options}"
    )
    run_in_process(server_app, app, overrides, 6)


def summary(out: Path) -> dict:
    return json.loads((run_folder(out) / "summary.json").read_text())


def test_a_round_most_of_whose_clients_fail_stops_the_run_and_says_who_and_why(tiny_clip, folder, tmp_path, caplog):
    """3 of the 4 training clients fail from round 2 on: round 1's row is kept, round 2 stops the run naming them."""
    out = tmp_path / "out"
    with pytest.raises(FederationError, match=r"round 2: 3 of 4 training clients failed \(art#0, art#1, photo#0;"):
        run(failing_app({0, 1, 2}, from_round=2), tiny_clip, folder, out)
    found = summary(out)
    assert found["status"] == "failed" and found["rounds"] == 1 and "min_train_fraction=0.5" in found["error"]
    assert list(found["failed_clients"]) == ["2"]
    assert sorted(found["failed_clients"]["2"]) == ["art#0", "art#1", "photo#0"]
    assert all(MISSING in reason for reason in found["failed_clients"]["2"].values())
    assert f"round 2: art#0, art#1, photo#0 failed: {MISSING}" in caplog.text  # one line for those that failed alike
    rows = [json.loads(line) for line in (run_folder(out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]  # what was done before is kept


def test_a_round_that_keeps_enough_clients_goes_on_and_the_summary_lists_who_failed(tiny_clip, folder, tmp_path):
    """1 of 4 fails each round: the run goes on (3 of 4 >= 0.5) and ends, its summary naming the client each round."""
    out = tmp_path / "out"
    run(failing_app({0}), tiny_clip, folder, out)
    found = summary(out)
    assert found["status"] == "completed" and found["rounds"] == 3
    assert found["failed_clients"].keys() == {"1", "2", "3"}
    assert all(list(failed) == ["art#0"] and MISSING in failed["art#0"] for failed in found["failed_clients"].values())


def test_min_train_fraction_zero_never_stops_a_run(tiny_clip, folder, tmp_path):
    out = tmp_path / "out"
    run(failing_app({0, 1, 2}, from_round=2), tiny_clip, folder, out, "strategy.min_train_fraction=0")
    assert summary(out)["status"] == "completed"


def test_a_discovery_most_nodes_fail_stops_before_the_first_round_with_a_run_folder(tiny_clip, folder, tmp_path):
    """4 of 6 nodes cannot answer the query (photo#1 could train): the run stops at discovery; its folder's summary.json
    names them."""
    out = tmp_path / "out"
    with pytest.raises(FederationError, match=r"4 of 6 node\(s\) failed to answer discovery \(node 100: "):
        run(failing_app({0, 1, 2, 4}, query=True), tiny_clip, folder, out)
    found = summary(out)
    assert found["status"] == "failed" and found["rounds"] == 0
    assert sorted(found["failed_clients"]["discovery"]) == ["node 100", "node 101", "node 102", "node 104"]
    assert all(MISSING in reason for reason in found["failed_clients"]["discovery"].values())


def test_a_sweep_redoes_a_run_the_app_stopped_and_says_why(tmp_path):
    """A stopped run's folder has a summary.json too (status failed): the sweep counts it failed, never done."""
    from benchmarks.sweep_report import read_run, run_dir
    from server_app.report import write_failed_summary

    folder = run_dir(tmp_path, "fedclip", "sketch", 0) / "2026-12-06_12-00-00"
    folder.mkdir(parents=True)
    write_failed_summary(folder, FederationError("round 2: 3 of 4 training clients failed"), {"2": {"a": "x"}}, 1)
    run = read_run(tmp_path, "fedclip", "sketch", 0)
    assert (
        run.status == "failed" and run.failure["reason"] == "FederationError: round 2: 3 of 4 training clients failed"
    )
