"""A run's outputs: the per-round table in the log and the run folder a user opens afterwards.

outputs/<date-time>/ holds config.yaml (resolved), run.json (the classes and the CLIP's fingerprint: what
predict needs to use the adapter), metrics.jsonl and metrics.csv (one row per round), the trained
weights (weights.py: <weights_name>_best/_final.safetensors, none for a method that keeps no global weights),
summary.json (accuracies, and the cost: parameters trained, bytes each way (traffic.py), seconds, images encoded) and
accuracy.png (plots.py); with tracking.tensorboard, TensorBoard's event files, and with tracking.mlflow_uri an MLflow
run (tracking.py). Each round's row is also a line of the round table in the log (table.py).

A client lost in a round (its node died, its reply was dropped) leaves that round's means over fewer
clients, and a mean over other clients is not comparable. So every row records the clients with no
evaluation (`missing`), the best round is chosen on the clients two rounds share (server_app/selection.py),
and the summary compares personalization with zero-shot on the clients evaluated in both rounds;
summary.json lists the `incomplete_rounds`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
import uuid
from datetime import datetime
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from omegaconf import DictConfig, OmegaConf

from common import wire
from common.files import new_folder
from server_app import screening
from server_app.plots import run_accuracy_plot
from server_app.selection import SELECTIONS, RoundSelection, Scores, mean
from server_app.table import RoundTable, format_bytes, percent
from server_app.tracking import Tracking
from server_app.traffic import Traffic
from server_app.weights import KEPT, save_weights, weights_path

log = logging.getLogger(__name__)

PLOT_FILE = "accuracy.png"
ROWS_FILE = "metrics.jsonl"  # one JSON row a round, appended as the run goes


def last_line(reason: str) -> str:
    """An error's last line (a traceback's: the exception and its message), for a log line."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return lines[-1] if lines else reason


def write_failed_summary(folder: Path, error: BaseException, failed: dict[str, dict[str, str]], rounds: int) -> None:
    """summary.json of a run that stopped on an error: the error, the clients that failed by round, the rounds done."""
    summary = {
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "failed_clients": failed,
        "rounds": rounds,
        "run_folder": str(folder),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))


def write_failed_run(cfg: DictConfig, error: BaseException, failed: dict[str, dict[str, str]]) -> Path:
    """A run folder for a run that stopped before its first round (discovery): its configuration and summary.json."""
    folder = new_folder(Path(cfg.output_dir).expanduser().resolve(), datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    OmegaConf.save(cfg, folder / "config.yaml")
    write_failed_summary(folder, error, failed, 0)
    log.error("the run stopped before its first round; summary: %s", folder / "summary.json")
    return folder


class RunReport:
    """Collects each round's metrics and traffic, prints the table row, and keeps the best round's weights.

    `weights_name` names the weights files (server_app/weights.py); None: the method keeps no global weights.
    """

    def __init__(
        self,
        cfg: DictConfig,
        client_domains: dict[str, str],
        train_clients: list[str],
        trained_parameters: int,
        weights_name: str | None,
        classes: list[str] | None = None,
        model_fingerprint: str | None = None,
        flwr_run_id: int | None = None,
        discovery_seconds: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.method = cfg.method.name
        self.held_out = cfg.dataset.held_out
        self.scores = Scores(client_domains, self.held_out)
        self.domains = self.scores.domains  # the table's columns: training domains, then the held-out one
        self.train_clients = train_clients  # the clients that train (one for method=centralized)
        self.trained_parameters = trained_parameters
        self.weights_name = weights_name
        self.traffic = Traffic()
        self.dir = new_folder(Path(cfg.output_dir).expanduser().resolve(), datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        OmegaConf.save(cfg, self.dir / "config.yaml")
        # the app's run across resumes (a resumed run takes its checkpoint's): names what clients keep between rounds
        self.run_key = uuid.uuid4().hex
        self.run_info = {"classes": classes, "model_fingerprint": model_fingerprint or None}
        self.write_run_info()
        self.rows: list[dict] = []
        # metrics.jsonl as written so far: its length and hash, which a checkpoint names instead of copying the rows
        self.rows_bytes, self.rows_hash = 0, hashlib.blake2b(digest_size=16)
        self.failed: dict[str, dict[str, str]] = {}  # exchange ("3", "last evaluation") -> client -> why it failed
        self.selection = RoundSelection(self.scores, cfg.selection)  # the others are in summary.json too
        self.start = time.time()
        self.flwr_run_id = flwr_run_id  # `flwr ls` / `flwr log` name a run by it
        self.discovery_seconds = discovery_seconds  # asking every node which client it holds (they encode then)
        log.info("run folder: %s", self.dir)
        self.tracking = Tracking(
            cfg,
            self.dir,
            self.domains,
            self.held_out,
            {
                "method": self.method,
                "held_out": str(self.held_out),
                "seed": str(cfg.seed),
                **({"flwr_run_id": str(flwr_run_id)} if flwr_run_id is not None else {}),
            },
        )
        self.dp = cfg.strategy.dp.side is not None  # the privacy spent is reported (server_app/privacy.py)
        self.table = RoundTable(self.domains, self.held_out, self.dp)

    def write_run_info(self) -> None:
        """run.json: the classes and the CLIP's fingerprint (what predict needs), and the run key."""
        (self.dir / "run.json").write_text(json.dumps({**self.run_info, "run_key": self.run_key}, indent=2))

    def add_round(
        self,
        server_round: int,
        train: MetricRecord,
        evaluation: MetricRecord,
        seconds: float,
        arrays: ArrayRecord | None,
    ) -> None:
        """Record one round (0 = zero-shot); save the weights if they beat the best round's so far (`beats`).

        The round's traffic (Traffic.end_round) is its bytes and its `lost` clients, those that did not answer a
        message of the round's exchanges (or answered with an error). `missing` lists the run's clients that this
        round's evaluation has no accuracy of: the round's means leave them out; `rejected` those whose update
        screening left out. The row also goes to the round table, TensorBoard and MLflow (server_app/tracking.py).
        """
        losses = [train[f"{c}/{wire.TRAIN_LOSS}"] for c in self.train_clients if f"{c}/{wire.TRAIN_LOSS}" in train]
        traffic = self.traffic.end_round(self.train_clients)
        row = {
            "round": server_round,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "val_acc_mean": self.scores.val_mean(evaluation),
            **{f"acc/{d}": self.scores.accuracy(evaluation, d) for d in self.domains},
            "missing": sorted(self.scores.all_clients - self.scores.evaluated(evaluation)),
            "lost": traffic["lost"],
            "rejected": sorted(key.rpartition("/")[0] for key in train if key.endswith(f"/{screening.REJECTED}")),
            "bytes_down_per_client": traffic["bytes_down_per_client"],  # a training client's
            "bytes_up_per_client": traffic["bytes_up_per_client"],
            "bytes_round": traffic["bytes_round"],
            "seconds": seconds,
            "dp_epsilon": train.get("dp-epsilon") if self.dp else None,
            "train": dict(train),
            "evaluate": dict(evaluation),
        }
        self.append_rows([row])
        self.tracking.log_round(row)
        self.table.add(row)
        if (
            row["missing"] and self.cfg.strategy.fraction_evaluate >= 1
        ):  # sampled evaluation leaves clients out by design
            log.warning(
                "round %d: no evaluation from %s: the row's means are over the other clients",
                server_round,
                ", ".join(row["missing"]),
            )
        if server_round > 0 and self.selection.choose(row) and arrays is not None and self.weights_name:
            save_weights(arrays, self.dir, self.weights_name, "best", server_round, self.method)

    def append_rows(self, rows: list[dict]) -> None:
        """Rows added to the report and to metrics.jsonl, whose length and hash follow what is written."""
        lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
        with open(self.dir / ROWS_FILE, "ab") as fh:
            fh.write(lines)
        self.rows += rows
        self.rows_bytes += len(lines)
        self.rows_hash.update(lines)

    def add_failures(self, exchange: str, failed: dict[str, str]) -> None:
        """Log the clients that failed in a round's exchange, one line for those that failed alike, and keep them
        for summary.json."""
        if not failed:
            return
        self.failed[exchange] = failed
        alike: dict[str, list[str]] = {}
        for client, reason in sorted(failed.items()):
            alike.setdefault(last_line(reason), []).append(client)
        for reason, clients in alike.items():
            log.error("round %s: %s failed: %s", exchange, ", ".join(clients), reason)

    def personalization(self, best: dict, zero_shot: dict) -> tuple[set[str], dict[str, float | None], float | None]:
        """Each training domain's test accuracy at a round, and zero-shot's mean, on the same clients: those evaluated
        both at that round and at round 0."""
        compared = (
            self.scores.evaluated(best["evaluate"])
            & self.scores.evaluated(zero_shot["evaluate"])
            & self.scores.source_clients
        )
        pers = {d: self.scores.accuracy(best["evaluate"], d, clients=compared) for d in self.scores.source_domains}
        return (
            compared,
            pers,
            mean(self.scores.accuracy(zero_shot["evaluate"], d, clients=compared) for d in self.scores.source_domains),
        )

    def outcome(self, best: dict, zero_shot: dict) -> dict:
        """What a selection rule's round gives: held-out and personalization accuracy, zero-shot's beside them."""
        _, pers, zero_shot_pers = self.personalization(best, zero_shot)
        return {
            "round": best["round"],
            "held_out": best.get(f"acc/{self.held_out}"),
            "zero_shot_held_out": zero_shot.get(f"acc/{self.held_out}"),
            "personalization_mean": mean(pers.values()),
            "zero_shot_train_domains_mean": zero_shot_pers,
        }

    def finish(self, arrays: ArrayRecord | None) -> dict:
        """Write the final weights, metrics.csv and summary.json; return the summary."""
        if arrays is not None and self.weights_name and len(self.rows) > 1:
            save_weights(arrays, self.dir, self.weights_name, "final", self.rows[-1]["round"], self.method)
        lists = ("missing", "lost", "rejected")  # clients, ";"-separated
        columns = [
            "round",
            "train_loss",
            "val_acc_mean",
            *[f"acc/{d}" for d in self.domains],
            "missing",
            "bytes_down_per_client",
            "bytes_up_per_client",
            "bytes_round",
            "seconds",
            "lost",
            "rejected",
        ]
        with open(self.dir / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**row, **{k: ";".join(row.get(k, [])) for k in lists}} for row in self.rows)
        zero_shot, trained = self.rows[0], self.rows[1:]
        best = self.selection.best or zero_shot
        compared, pers, zero_shot_pers = self.personalization(best, zero_shot)
        incomplete = [r["round"] for r in self.rows if self.scores.all_clients - self.scores.evaluated(r["evaluate"])]
        if compared != self.scores.source_clients:
            log.warning(
                "personalization and zero-shot are compared on the clients evaluated in both round %d and round 0: %s",
                best["round"],
                ", ".join(sorted(compared)),
            )
        down, up = (
            mean(r["bytes_down_per_client"] for r in trained) or 0,
            mean(r["bytes_up_per_client"] for r in trained) or 0,
        )
        summary = {
            "status": "completed",
            "method": self.method,
            "seed": self.cfg.seed,
            "held_out": self.held_out,
            "zero_shot": {d: zero_shot[f"acc/{d}"] for d in self.domains},
            "selection": self.selection.rule,
            "best_round": best["round"],
            "best_val_acc_mean": best["val_acc_mean"],
            "generalization": {self.held_out: best.get(f"acc/{self.held_out}")},
            "personalization": pers,
            "personalization_mean": mean(pers.values()),
            "zero_shot_train_domains_mean": zero_shot_pers,
            "personalization_clients": sorted(compared),
            "selections": {
                rule: self.outcome(self.selection.chosen.get(rule, zero_shot), zero_shot) for rule in SELECTIONS
            },
            "incomplete_rounds": incomplete,
            "failed_clients": self.failed,
            "rounds": len(trained),
            "wall_seconds": time.time() - self.start,
            "discovery_seconds": self.discovery_seconds,
            "seconds_per_round": mean(r["seconds"] for r in trained),
            "trained_parameters": self.trained_parameters,
            "bytes_down_per_client_per_round": round(down),
            "bytes_up_per_client_per_round": round(up),
            "bytes_per_client_per_round": round(down + up),
            "bytes_total": sum(r["bytes_round"] for r in self.rows),
            "features_encoded": self.traffic.images_encoded,
            "dp": {**OmegaConf.to_container(self.cfg.strategy.dp), "epsilon": self.rows[-1]["dp_epsilon"]}
            if self.dp
            else None,
            "run_folder": str(self.dir),
            "flwr_run_id": self.flwr_run_id,
        }
        with open(self.dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=2)
        self.tracking.finish(summary, [self.plot(), *self.files()])
        log.info(
            "%s: round %s (selection=%s, mean val %s): held-out %s %s (zero-shot %s); personalization mean %s "
            "(zero-shot %s)",
            self.method,
            best["round"],
            self.selection.rule,
            percent(best["val_acc_mean"]),
            self.held_out,
            percent(best.get(f"acc/{self.held_out}")),
            percent(zero_shot.get(f"acc/{self.held_out}")),
            percent(summary["personalization_mean"]),
            percent(summary["zero_shot_train_domains_mean"]),
        )
        log.info(
            "trained %s parameters; %s down + %s up per training client per round; %d images encoded; summary: %s",
            f"{self.trained_parameters:,}",
            format_bytes(down),
            format_bytes(up),
            self.traffic.images_encoded,
            self.dir / "summary.json",
        )
        return summary

    def plot(self) -> Path:
        """accuracy.png: each domain's accuracy against the round, zero-shot dashed, the best round marked
        (server_app/plots.py)."""
        title = f"{self.method}, held out {self.held_out}, seed {self.cfg.seed}"
        return run_accuracy_plot(
            self.rows,
            self.domains,
            self.held_out,
            self.selection.best["round"] if self.selection.best else None,
            title,
            self.dir / PLOT_FILE,
        )

    def files(self) -> list[Path]:
        """The run folder's files that MLflow keeps as artifacts: the weights, run.json, the configuration, the
        summary."""
        weights = [weights_path(self.dir, self.weights_name, which) for which in KEPT] if self.weights_name else []
        return [*weights, *(self.dir / name for name in ("run.json", "config.yaml", "metrics.csv", "summary.json"))]

    def abort(self, error: BaseException) -> None:
        """A run that stopped on an error: summary.json says so and why, the plot of its rounds so far, and its MLflow
        run marked FAILED."""
        write_failed_summary(self.dir, error, self.failed, max(len(self.rows) - 1, 0))
        try:
            files = [self.plot()] if self.rows else []
        except Exception as err:  # noqa: BLE001 - the error that stopped the run is the one to see
            log.warning("could not draw %s: %s", PLOT_FILE, err)
            files = []
        self.tracking.finish({}, [*files, self.dir / "summary.json"], "FAILED")
