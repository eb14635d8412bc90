"""A run seen where people look: TensorBoard's event files, an MLflow run and accuracy.png, read back with the
libraries' own readers.

One in-process run of the demo (3 rounds, central DP so that epsilon is logged too) with TensorBoard on and, where the
`mlflow` extra is installed, an MLflow sqlite store; every number read back must be the one in metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from client_app.app import app as client_app
from common.config import load_config
from predict import FedClipClassifier
from server_app.app import app as server_app
from server_app.report import RunReport
from server_app.tracking import artifact_root
from tests.inprocess import run_folder, run_in_process

MLFLOW = importlib.util.find_spec("mlflow") is not None
NO_MLFLOW = 'mlflow is not installed: pip install -e ".[mlflow]" (.ci/run installs it)'
EXPERIMENT = "tracking-test"
DOMAINS, HELD_OUT = ("cartoon", "painting", "photo", "sketch"), "sketch"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_cache) -> tuple[Path, Path]:
    """The run folder and the MLflow database of a 3-round demo run."""
    tmp = tmp_path_factory.mktemp("tracking")
    database = tmp / "mlflow.db"
    overrides = (
        f"training.rounds=3 strategy.dp.side=server cache_dir={demo_cache} output_dir={tmp / 'out'} "
        f"tracking.tensorboard=true"
        + (f" tracking.mlflow_uri=sqlite:///{database} tracking.mlflow_experiment={EXPERIMENT}" if MLFLOW else "")
    )
    run_in_process(server_app, client_app, overrides, len(DOMAINS))
    folder = run_folder(tmp / "out")
    return folder, database


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every number of metrics.jsonl that the table shows, by the name TensorBoard and MLflow log it under, per
    round."""
    names = {
        **{f"acc/{d}": f"accuracy/{d}" for d in DOMAINS},
        f"acc/{HELD_OUT}": f"accuracy/{HELD_OUT}_held_out",
        "val_acc_mean": "accuracy/val_mean",
        "train_loss": "train/loss",
        "bytes_down_per_client": "traffic/bytes_down_per_client",
        "bytes_up_per_client": "traffic/bytes_up_per_client",
        "bytes_round": "traffic/bytes_round",
        "seconds": "time/seconds_per_round",
        "dp_epsilon": "privacy/epsilon",
    }
    counts = {"rejected": "clients/rejected_updates", "lost": "clients/lost", "missing": "clients/missing_evaluation"}
    expected: dict[str, dict[int, float]] = {}
    for row in rows(folder):
        for key, name in names.items():
            if row[key] is not None:
                expected.setdefault(name, {})[row["round"]] = row[key]
        for key, name in counts.items():
            expected.setdefault(name, {})[row["round"]] = len(row[key])
    return expected


def test_tensorboard_scalars_equal_metrics_jsonl(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    folder, _ = demo_run
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    expected = expected_scalars(folder)
    assert set(logged) == set(expected)
    assert logged["accuracy/sketch_held_out"].keys() == {0, 1, 2, 3} and logged["train/loss"].keys() == {1, 2, 3}
    assert logged["privacy/epsilon"][3] > logged["privacy/epsilon"][1] > 0
    for tag, values in expected.items():
        assert logged[tag].keys() == values.keys(), tag
        for step, value in values.items():
            assert logged[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard keeps float32
    [config] = events.Tensors("config/text_summary")
    text = tensor_util.make_ndarray(config.tensor_proto).item().decode()
    assert OmegaConf.to_yaml(OmegaConf.load(folder / "config.yaml")) in text


@pytest.mark.skipif(not MLFLOW, reason=NO_MLFLOW)
def test_mlflow_run_matches_the_run_folder(demo_run, tmp_path):
    from mlflow.tracking import MlflowClient

    folder, database = demo_run
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    [run] = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_folder"] == str(folder)
    # to filter runs by
    assert {k: run.data.tags[k] for k in ("method", "held_out", "seed")} == {
        "method": "fedclip",
        "held_out": "sketch",
        "seed": "0",
    }
    assert run.info.run_name == f"fedclip sketch seed0 {folder.name}"
    config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    params = run.data.params
    for key, value in params.items():
        node = config
        for part in key.split("."):
            node = node[part]
        assert value == (json.dumps(node) if isinstance(node, list) else str(node)), key
    assert (
        params["training.rounds"] == "3"
        and params["strategy.dp.side"] == "server"
        and params["dataset.domains"] == json.dumps(list(config["dataset"]["domains"]))
    )
    assert len(params) == len(flat := list(_leaves(config))), set(flat) - set(params)
    for name, values in expected_scalars(folder).items():
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} == values, name
    summary = json.loads((folder / "summary.json").read_text())
    assert run.data.metrics["results/generalization.sketch"] == summary["generalization"]["sketch"]
    assert run.data.metrics["results/best_round"] == summary["best_round"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "adapter_best.safetensors",
        "adapter_final.safetensors",
        "run.json",
        "accuracy.png",
        "summary.json",
        "config.yaml",
        "metrics.csv",
    } <= artifacts
    adapter = client.download_artifacts(run.info.run_id, "adapter_best.safetensors", str(tmp_path))
    assert Path(adapter).read_bytes() == (folder / "adapter_best.safetensors").read_bytes()
    assert (
        Path(client.download_artifacts(run.info.run_id, "run.json", str(tmp_path))).read_text()
        == (folder / "run.json").read_text()
    )
    # the artifacts are a run folder fedclip-predict can use: the adapter fetched from MLflow classifies as the
    # run's own
    fetched = FedClipClassifier.from_run(client.download_artifacts(run.info.run_id, "", str(tmp_path / "all")))
    assert (
        fetched.info["run"]["generalization"] == summary["generalization"]
        and fetched.classes == json.loads((folder / "run.json").read_text())["classes"]
    )


def _leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


def test_each_run_folder_holds_its_accuracy_plot(demo_run):
    folder, _ = demo_run
    with Image.open(folder / "accuracy.png") as image:
        assert image.format == "PNG" and image.size[0] > 400


def report(tmp_path, overrides: str = "") -> RunReport:
    cfg = load_config(f"output_dir={tmp_path} dataset.held_out=sketch {overrides}")
    return RunReport(cfg, {"a": "a", "b": "b", "sketch": "sketch"}, ["a", "b"], 10, "adapter")


@pytest.mark.parametrize(
    "uri,says",
    [
        ("nonsense://nowhere", "MLflow cannot be used"),
        ("http://127.0.0.1:9", "MLflow cannot be used"),  # nothing listens on the discard port
    ],
)
@pytest.mark.skipif(not MLFLOW, reason=NO_MLFLOW)
def test_an_unusable_mlflow_uri_is_one_warning_not_a_failed_run(uri, says, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        made = report(tmp_path, f"tracking.mlflow_uri={uri}")
    assert says in caplog.text and uri in caplog.text
    assert [type(w).__name__ for w in made.tracking.writers] == ["TensorBoardLog"]


def test_mlflow_not_installed_is_one_warning_saying_how_to_install_it(tmp_path, caplog, monkeypatch):
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with caplog.at_level(logging.WARNING):
        made = report(tmp_path, "tracking.mlflow_uri=sqlite:///x.db tracking.tensorboard=false")
    assert 'pip install -e ".[mlflow]"' in caplog.text and made.tracking.writers == []


def test_a_sqlite_stores_artifacts_stay_next_to_it_whatever_the_experiment_is_called(tmp_path):
    for experiment in ("fedclip", str(tmp_path / "sweep"), "a b/../c"):  # a sweep names its experiment by its folder
        root = Path(artifact_root(f"sqlite:///{tmp_path}/mlflow.db", experiment).removeprefix("file://"))
        assert root.parent == tmp_path / "mlartifacts", experiment
    assert artifact_root("http://127.0.0.1:5000", "fedclip") is None  # a server keeps them where it is configured to


@pytest.mark.skipif(not MLFLOW, reason=NO_MLFLOW)
def test_a_run_that_stops_on_an_error_keeps_its_plot_and_is_marked_failed_in_mlflow(tmp_path):
    from flwr.app import MetricRecord
    from mlflow.tracking import MlflowClient

    database = tmp_path / "mlflow.db"
    made = report(tmp_path / "out", f"tracking.mlflow_uri=sqlite:///{database}")
    accuracies = {
        "a/val-acc": 0.5,
        "a/test-acc": 0.5,
        "a/num-val": 10,
        "a/num-test": 10,
        "sketch/all-acc": 0.4,
        "sketch/num-all": 10,
    }
    made.add_round(0, MetricRecord(), MetricRecord(accuracies), 0.0, None)
    made.abort(RuntimeError("stopped"))
    summary = json.loads((made.dir / "summary.json").read_text())  # says why, not the numbers of a finished run
    assert (made.dir / "accuracy.png").is_file() and summary == {
        "status": "failed",
        "error": "RuntimeError: stopped",
        "failed_clients": {},
        "rounds": 0,
        "run_folder": str(made.dir),
    }
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    [run] = client.search_runs([client.get_experiment_by_name("fedclip").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics["accuracy/sketch_held_out"] == 0.4
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["accuracy.png", "summary.json"]


@pytest.mark.skipif(not MLFLOW, reason=NO_MLFLOW)
def test_mlflow_gets_rounds_in_batches_at_most_flush_seconds_apart_and_all_of_them_at_the_end(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from server_app import tracking
    from server_app.tracking import MlflowLog

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    made = MlflowLog(uri, "fedclip", "batches", {}, {})
    history = lambda: [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(made.run_id, "loss")]  # noqa: E731
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 3600.0)
    made.log_round({"loss": 1.0}, 1)  # within FLUSH_SECONDS of the start: kept
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 0.0)
    made.log_round({"loss": 0.5}, 2)  # handed over, with the round before it
    for operation in made.pending:
        operation.wait()
    assert sorted(history()) == [1, 2] and made.buffer == []
    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 3600.0)
    made.log_round({"loss": 0.25}, 3)
    assert sorted(history()) == [1, 2]
    made.finish({}, [], "FINISHED")
    assert sorted(history()) == [1, 2, 3]
