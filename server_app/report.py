"""A run's outputs: the per-round table in the log and the run folder a user opens afterwards.

outputs/<date-time>/ holds config.yaml (resolved), metrics.jsonl and metrics.csv (one row per
round), adapter_final.safetensors, adapter_best.safetensors and summary.json.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from datetime import datetime
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

log = logging.getLogger(__name__)


def save_adapter(arrays: ArrayRecord, path: Path, metadata: dict[str, str]) -> None:
    """An adapter as safetensors, loadable with AttentionAdapter.load_state_dict(load_file(path))."""
    save_file({k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}, path, metadata=metadata)


class RunReport:
    """Collects each round's metrics, prints the table row, and keeps the best round's adapter."""

    def __init__(self, cfg: DictConfig, domains: list[str], adapter_bytes: int, adapter_params: int) -> None:
        self.cfg = cfg
        self.held_out = cfg.dataset.held_out
        self.domains = domains  # training domains first, then the held-out one if present
        self.train_domains = [d for d in domains if d != self.held_out]
        self.adapter_bytes, self.adapter_params = adapter_bytes, adapter_params
        self.dir = Path(cfg.output_dir).expanduser().resolve() / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self.dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, self.dir / "config.yaml")
        self.rows: list[dict] = []
        self.best: dict | None = None
        self.start = time.time()
        log.info("run folder: %s", self.dir)
        names = [f"{d}{'*' if d == self.held_out else ''}" for d in domains]
        self._print(["round", "train loss", *names, "val mean", "sent/client", "seconds"])

    def _print(self, cells: list[str]) -> None:
        log.info(" | ".join(f"{c:>10}" for c in cells))

    def accuracy(self, metrics: MetricRecord, domain: str) -> float | None:
        """The accuracy a domain is judged by: all images if held out, else its test split."""
        return metrics.get(f"{domain}/{'all' if domain == self.held_out else 'test'}-acc")

    def add_round(self, server_round: int, train: MetricRecord, evaluation: MetricRecord, seconds: float, arrays: ArrayRecord) -> None:
        """Record one round (0 = zero-shot); save the adapter if its mean val accuracy is the best so far."""
        losses = [train[f"{d}/train-loss"] for d in self.train_domains if f"{d}/train-loss" in train]
        vals = [evaluation[f"{d}/val-acc"] for d in self.train_domains if f"{d}/val-acc" in evaluation]
        # a training client gets the adapter, sends its update, gets the new adapter to evaluate;
        # the held-out client only gets it to evaluate; round 0 (zero-shot) sends no adapter
        sent = 0 if server_round == 0 else 3 * self.adapter_bytes
        held_out_nodes = int(self.held_out in self.domains)
        round_total = 0 if server_round == 0 else (3 * len(self.train_domains) + held_out_nodes) * self.adapter_bytes
        row = {
            "round": server_round,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "val_acc_mean": sum(vals) / len(vals) if vals else None,
            **{f"acc/{d}": self.accuracy(evaluation, d) for d in self.domains},
            "bytes_per_client": sent,
            "bytes_round": round_total,
            "seconds": seconds,
            "train": dict(train),
            "evaluate": dict(evaluation),
        }
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        fmt = lambda v, pct=True: "-" if v is None else (f"{100 * v:.2f}" if pct else f"{v:.4f}")  # noqa: E731
        self._print(
            [str(server_round), fmt(row["train_loss"], False), *[fmt(row[f"acc/{d}"]) for d in self.domains],
             fmt(row["val_acc_mean"]), f"{sent / 1024:.1f} KiB", f"{seconds:.2f}"]
        )
        if server_round > 0 and row["val_acc_mean"] is not None and (self.best is None or row["val_acc_mean"] > self.best["val_acc_mean"]):
            self.best = row
            save_adapter(arrays, self.dir / "adapter_best.safetensors", {"round": str(server_round)})

    def finish(self, arrays: ArrayRecord) -> dict:
        """Write the final adapter, metrics.csv and summary.json; return the summary."""
        save_adapter(arrays, self.dir / "adapter_final.safetensors", {"round": str(self.rows[-1]["round"])})
        columns = ["round", "train_loss", "val_acc_mean", *[f"acc/{d}" for d in self.domains], "bytes_per_client", "bytes_round", "seconds"]
        with open(self.dir / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        zero_shot, best = self.rows[0], self.best or self.rows[-1]
        pers = {d: best[f"acc/{d}"] for d in self.train_domains}
        summary = {
            "held_out": self.held_out,
            "zero_shot": {d: zero_shot[f"acc/{d}"] for d in self.domains},
            "best_round": best["round"],
            "best_val_acc_mean": best["val_acc_mean"],
            "generalization": {self.held_out: best.get(f"acc/{self.held_out}")},
            "personalization": pers,
            "personalization_mean": _mean(pers.values()),
            "zero_shot_train_domains_mean": _mean(zero_shot[f"acc/{d}"] for d in self.train_domains),
            "rounds": len(self.rows) - 1,
            "wall_seconds": time.time() - self.start,
            "adapter_parameters": self.adapter_params,
            "bytes_per_client_per_round": 3 * self.adapter_bytes,
            "bytes_total": sum(r["bytes_round"] for r in self.rows),
            "run_folder": str(self.dir),
        }
        with open(self.dir / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=2)
        log.info("best round %s (mean val %.2f%%): held-out %s %s (zero-shot %s); personalization mean %s (zero-shot %s)",
                 best["round"], 100 * (best["val_acc_mean"] or 0), self.held_out, _pct(best.get(f"acc/{self.held_out}")),
                 _pct(zero_shot.get(f"acc/{self.held_out}")), _pct(summary["personalization_mean"]), _pct(summary["zero_shot_train_domains_mean"]))
        log.info("summary: %s", self.dir / "summary.json")
        return summary


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
