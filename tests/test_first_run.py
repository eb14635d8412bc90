"""A simulation that crashes is reported as failed, although `flwr run` exits 0 after "Simulation Engine crashed"."""

from __future__ import annotations

import pytest

from benchmarks import first_run


def test_crashed_simulation_is_a_failed_run(tmp_path, monkeypatch, capsys):
    # Ray gives up on its GCS server at once: the same crash as the one grpcio >= 1.80 caused (docs/first-run.md)
    monkeypatch.setenv("RAY_NUM_REDIS_GET_RETRIES", "0")
    assert first_run.main(["--runs", "1", "--out", str(tmp_path), "--timeout", "300"]) == 1
    out = capsys.readouterr().out
    assert "run 1/1: FAILED" in out and ("GCS" in out or "gcs_server" in out), out
    assert "0 of 1 runs succeeded" in out
    assert not list(tmp_path.glob("run01/*/summary.json"))


def test_round_times_read_from_the_log():
    log = (
        "2026-11-28 18:08:07,445 INFO      round | train loss |    cartoon\n"
        "\x1b[36m(ClientAppActor pid=610)\x1b[0m 2026-11-28 18:08:07,786 INFO [sketch] encoded 300/300 images\n"
        "2026-11-28 18:08:08,056 INFO          0 |          - |      38.33\n"
        "2026-11-28 18:08:09,479 INFO          1 |     1.6313 |      45.00\n"
    )
    start = first_run.datetime.datetime(2026, 11, 28, 18, 8, 0).timestamp()
    assert first_run.round_times(log, start) == pytest.approx({0: 8.056, 1: 9.479})
