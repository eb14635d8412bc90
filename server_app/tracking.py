"""Where a run shows up besides its folder: TensorBoard event files in the run folder, and one MLflow run.

RunReport hands each round's row to `Tracking.log_round`, which logs the numbers the table shows
(`round_scalars`: one name per number, the same in TensorBoard and MLflow, the round as the step),
and the summary and the run folder's files to `Tracking.finish`. Both writers are the libraries' own
and write in the background (TensorBoard's event writer thread, MLflow's asynchronous logging), so a
round does not wait for a disk or a server. MLflow is optional (tracking.mlflow_uri, the `mlflow`
extra): when it is not installed, the URI is bad or the server cannot be reached, that is one warning
and the run goes on without it; so is a failure later in the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5  # a running run's curves appear in TensorBoard and MLflow within this many seconds
ROW_SCALARS = {  # a report row's number -> its name in TensorBoard and MLflow
    "val_acc_mean": "accuracy/val_mean",
    "train_loss": "train/loss",
    "bytes_down_per_client": "traffic/bytes_down_per_client",
    "bytes_up_per_client": "traffic/bytes_up_per_client",
    "bytes_round": "traffic/bytes_round",
    "seconds": "time/seconds_per_round",
    "dp_epsilon": "privacy/epsilon",
}
ROW_COUNTS = {  # a report row's list of clients -> the name its length is logged under
    "rejected": "clients/rejected_updates",
    "lost": "clients/lost",
    "missing": "clients/missing_evaluation",
}
NAME_CHARACTERS = re.compile(r"[^\w.\- /]")  # what MLflow accepts in a metric name on every platform
FOLDER_NAME = re.compile(r"[^\w.-]+")  # what an experiment's artifact folder name may not hold
# an absent server: a warning
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# within seconds, not after MLflow's default minutes of retries (a user's own setting wins)


def accuracy_name(domain: str, held_out: str) -> str:
    """A domain's accuracy scalar: accuracy/<domain>, the held-out one marked accuracy/<domain>_held_out."""
    return metric_name(f"accuracy/{domain}{'_held_out' if domain == held_out else ''}")


def metric_name(name: str) -> str:
    return NAME_CHARACTERS.sub("_", name)


def round_scalars(row: Mapping, domains: Iterable[str], held_out: str) -> dict[str, float]:
    """The numbers of one report row (metrics.jsonl) by name: accuracy per domain, mean validation accuracy, train loss,
    bytes per client each way, seconds, epsilon under DP and the counts of rejected updates, lost clients and clients
    with no evaluation. What the row does not have (None: round 0 trained nothing, DP off) is left out."""
    scalars = {accuracy_name(d, held_out): row.get(f"acc/{d}") for d in domains}
    scalars |= {name: row.get(key) for key, name in ROW_SCALARS.items()}
    scalars |= {name: len(row[key]) for key, name in ROW_COUNTS.items() if key in row}
    return {name: float(value) for name, value in scalars.items() if value is not None}


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved configuration as MLflow params: dotted keys, scalars as text, lists as JSON."""
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = json.dumps(node) if isinstance(node, list) else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


class TensorBoardLog:
    """Event files in the run folder (torch's SummaryWriter): the scalars at every round, the configuration and
    summary as text."""

    def __init__(self, folder: Path, config_yaml: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=FLUSH_SECONDS)
        self.writer.add_text("config", f"```yaml\n{config_yaml}```")

    def log_round(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, summary: dict, files: list[Path], status: str) -> None:
        if summary:
            self.writer.add_text("summary", f"```json\n{json.dumps(summary, indent=2)}\n```")
        self.writer.close()


class MlflowLog:
    """One MLflow run: the configuration as params, the scalars at every round (asynchronously), then the summary's
    numbers
    as metrics and the run folder's files as artifacts.

    Rounds are handed to MLflow at most every FLUSH_SECONDS, and at the end: one write per round cost fast in-process
    rounds about 30% (a sqlite write and the logging thread beside a 28 ms round)."""

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]) -> None:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(experiment, artifact_location=artifact_root(uri, experiment))
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        self.pending: list = []  # the asynchronous logging operations, waited for at the end
        self.buffer: list = []  # rounds not yet handed to MLflow
        self.flushed_at = time.monotonic()
        where = f"{uri} (database {database})" if (database := sqlite_database(uri)) else uri
        log.info("MLflow: run %s (%s) in experiment %r at %s", self.run_id, run_name, experiment, where)

    def log_round(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer.extend(Metric(name, value, now, step) for name, value in scalars.items())
        if time.monotonic() - self.flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rounds to MLflow's background logging, at most 1000 metrics a call (MLflow's limit)."""
        for start in range(0, len(self.buffer), 1000):
            self.pending.append(
                self.client.log_batch(self.run_id, metrics=self.buffer[start : start + 1000], synchronous=False)
            )
        self.buffer, self.flushed_at = [], time.monotonic()

    def finish(self, summary: dict, files: list[Path], status: str) -> None:
        from mlflow.entities import Metric

        self.flush()
        for operation in self.pending:
            operation.wait()
        now = int(time.time() * 1000)
        results = [Metric(metric_name(f"results/{k}"), float(v), now, 0) for k, v in summary_numbers(summary).items()]
        for start in range(0, len(results), 1000):
            self.client.log_batch(self.run_id, metrics=results[start : start + 1000])
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status)


def summary_numbers(summary: Mapping, prefix: str = "") -> dict[str, float]:
    """summary.json's numbers by dotted name (accuracies per domain, best round, cost), for MLflow metrics."""
    numbers = {}
    for key, value in summary.items():
        if isinstance(value, Mapping):
            numbers |= summary_numbers(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = value
    return numbers


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a sqlite database (mlartifacts/<experiment>/), as `mlflow
    server`
    keeps them beside its store, rather than ./mlruns of whatever folder the ServerApp runs in; else the server's
    choice."""
    database = sqlite_database(uri)
    # one folder, also for a sweep's path-like name
    folder = FOLDER_NAME.sub("_", experiment).strip("_") or "experiment"
    return None if database is None else (database.parent / "mlartifacts" / folder).as_uri()


def sqlite_database(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (sqlite:///rel.db is relative to this process's folder,
    sqlite:////abs.db absolute)."""
    return Path(uri.removeprefix("sqlite:///")).expanduser().resolve() if uri.startswith("sqlite:///") else None


class Tracking:
    """The run's TensorBoard and MLflow logs (tracking.* in conf/config.yaml); a writer that fails is dropped with
    one warning."""

    def __init__(self, cfg: DictConfig, folder: Path, domains: list[str], held_out: str, tags: dict[str, str]) -> None:
        self.domains, self.held_out = domains, held_out
        self.writers: list[TensorBoardLog | MlflowLog] = []
        options = cfg.get("tracking") or {}
        if options.get("tensorboard", False):
            self.writers.append(TensorBoardLog(folder, OmegaConf.to_yaml(cfg)))
        if uri := options.get("mlflow_uri"):
            run_name = options.get("mlflow_run_name") or f"{cfg.method.name} {held_out} seed{cfg.seed} {folder.name}"
            try:
                self.writers.append(
                    MlflowLog(
                        str(uri),
                        str(options.get("mlflow_experiment") or "fedclip"),
                        run_name,
                        flat_params(cfg),
                        {**tags, "run_folder": str(folder)},
                    )
                )
            except ImportError as err:
                log.warning(
                    "tracking.mlflow_uri=%s but MLflow is not installed (%s): this run is not logged to MLflow. "
                    'Install it with pip install -e ".[mlflow]" (or pip install mlflow)',
                    uri,
                    err,
                )
            except Exception as err:  # noqa: BLE001 - a bad URI, an absent server, a refused login: the run goes on without it
                log.warning(
                    "tracking.mlflow_uri=%s: MLflow cannot be used (%s: %s); this run is not logged to MLflow. "
                    "Check the URI (sqlite:////abs/path/mlflow.db, http://host:5000) and that its server runs",
                    uri,
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )

    def log_round(self, row: Mapping) -> None:
        """One report row's scalars to every writer, at step = its round."""
        scalars = round_scalars(row, self.domains, self.held_out)
        self._each("log_round", scalars, int(row["round"]))

    def finish(self, summary: dict, files: list[Path], status: str = "FINISHED") -> None:
        """The summary and the run folder's files (MLflow artifacts); closes the writers. status: FINISHED or FAILED."""
        self._each("finish", summary, [p for p in files if p.is_file()], status)
        self.writers = []

    def _each(self, method: str, *args) -> None:
        for writer in list(self.writers):
            try:
                getattr(writer, method)(*args)
            except Exception as err:  # noqa: BLE001 - tracking never stops a run
                log.warning(
                    "%s failed (%s: %s): the run goes on without it", type(writer).__name__, type(err).__name__, err
                )
                self.writers.remove(writer)
