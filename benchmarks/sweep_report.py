"""The sweep's paper-style tables and plots, read back from its run folders.

Layout: <out_dir>/runs/<method>/<held_out>/seed<k>/ is one `flwr run` (FEDCLIP_OUTPUTS); inside it
<date-time>/summary.json marks a finished run, failure.json a failed one, flwr.log is its log.
Writes <out_dir>/table.md, table.csv and plots/*.png.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from server_app.plots import figure, line, save, style
from server_app.table import format_bytes

FAILURE_FILE = "failure.json"
SAFE_NAME = re.compile(r"[^\w.-]+")  # a domain name as part of a file name
LOG_FILE = "flwr.log"


@dataclass
class Run:
    """One cell entry of the sweep: a method trained with one domain held out and one seed."""

    method: str
    held_out: str
    seed: int
    dir: Path
    status: str = "pending"  # pending (never started), incomplete (stopped half-way), failed, done
    summary: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl, one row per round
    failure: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.dir / LOG_FILE

    @property
    def generalization(self) -> float | None:
        return self.summary.get("generalization", {}).get(self.held_out)

    @property
    def personalization(self) -> float | None:
        return self.summary.get("personalization_mean")


def run_dir(out_dir: Path, method: str, held_out: str, seed: int) -> Path:
    return out_dir / "runs" / method / held_out / f"seed{seed}"


def read_run(out_dir: Path, method: str, held_out: str, seed: int) -> Run:
    """A run's state from its folder: done if a summary.json exists, failed if it says so or failure.json exists."""
    run = Run(method, held_out, seed, run_dir(out_dir, method, held_out, seed))
    summaries = sorted(run.dir.glob("*/summary.json"))
    summary = json.loads(summaries[-1].read_text()) if summaries else None
    if summary is not None and summary.get("status") == "failed":  # the app stopped the run, and says why
        run.status, run.failure = "failed", {"reason": summary["error"], "summary": str(summaries[-1])}
    elif summary is not None:
        run.status = "done"
        run.summary = summary
        metrics = summaries[-1].parent / "metrics.jsonl"
        if metrics.is_file():
            run.rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    elif (run.dir / FAILURE_FILE).is_file():
        run.status, run.failure = "failed", json.loads((run.dir / FAILURE_FILE).read_text())
    elif run.dir.exists():
        run.status = "incomplete"
    return run


# ---------------------------------------------------------------- numbers


def _pct_cell(values: list[float], expected: int, any_failed: bool) -> str:
    """Mean ± sample std in %, '(k/n)' when runs are missing; 'failed', '—' (not run) or 'n/a' (no such metric)."""
    if not values:
        return "failed" if any_failed else "—"
    text = f"{100 * statistics.mean(values):.2f}"
    if len(values) > 1:
        text += f" ± {100 * statistics.stdev(values):.2f}"
    return text if len(values) == expected else f"{text} ({len(values)}/{expected})"


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    mean = statistics.mean(values) if values else None
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _seed_means(runs: list[Run], held_outs: list[str], seeds: list[int], metric: str) -> list[float]:
    """Per seed, the metric averaged over every held-out domain; seeds missing any domain are left out."""
    means = []
    for seed in seeds:
        values = [getattr(r, metric) for r in runs if r.seed == seed and r.status == "done"]
        values = [v for v in values if v is not None]
        if len(values) == len(held_outs):
            means.append(statistics.mean(values))
    return means


def trained_parameters(summary: dict) -> int | None:
    return summary.get("trained_parameters", summary.get("adapter_parameters"))


def bytes_per_client_per_round(summary: dict) -> int | None:
    """Up plus down; summaries from before the up/down split hold only the sum."""
    if "bytes_up_per_client_per_round" in summary:
        return summary["bytes_up_per_client_per_round"] + summary.get("bytes_down_per_client_per_round", 0)
    return summary.get("bytes_per_client_per_round")


def seconds_per_round(run: Run) -> float | None:
    """The summary's mean, else the mean of the logged seconds of the training rounds."""
    if "seconds_per_round" in run.summary:
        return run.summary["seconds_per_round"]
    seconds = [r["seconds"] for r in run.rows if r.get("round", 0) > 0 and r.get("seconds") is not None]
    return statistics.mean(seconds) if seconds else None


COST_COLUMNS = {  # csv column: how to read it from a finished run
    "trained_parameters": lambda r: trained_parameters(r.summary),
    "bytes_up_per_client_per_round": lambda r: r.summary.get("bytes_up_per_client_per_round"),
    "bytes_down_per_client_per_round": lambda r: r.summary.get("bytes_down_per_client_per_round"),
    "bytes_per_client_per_round": lambda r: bytes_per_client_per_round(r.summary),
    "bytes_total": lambda r: r.summary.get("bytes_total"),
    "seconds_per_round": seconds_per_round,
    "features_encoded": lambda r: r.summary.get("features_encoded"),
    "rounds": lambda r: r.summary.get("rounds"),
}


def _cost(runs: list[Run], column: str) -> float | None:
    values = [v for r in runs if r.status == "done" and (v := COST_COLUMNS[column](r)) is not None]
    return statistics.mean(values) if values else None


def _number(n: float | None, fmt: str = ",.0f") -> str:
    return "—" if n is None else format(n, fmt)


# ---------------------------------------------------------------- tables


def write_tables(out_dir: Path, runs: list[Run], methods: list[str], held_outs: list[str], seeds: list[int]) -> None:
    """table.md (generalization, personalization, cost, failed runs) and table.csv (one row per cell, numbers)."""
    cell_runs = {(m, d): [r for r in runs if r.method == m and r.held_out == d] for m in methods for d in held_outs}
    method_runs = {m: [r for r in runs if r.method == m] for m in methods}
    seed_list = ", ".join(str(s) for s in seeds)
    md = [
        "# Leave-one-domain-out sweep",
        "",
        f"Accuracy (%) at the round with the best mean validation accuracy; mean ± sample std over seeds {seed_list}. "
        "`(k/n)`: only k of the n runs finished; `failed`: every run of the cell failed (see below); "
        "`—`: not run yet. The mean row averages each seed over all held-out domains, then over the seeds "
        "that have every domain.",
    ]
    csv_rows = []
    for title, metric in (
        ("Generalization: accuracy on the held-out domain (all its images)", "generalization"),
        ("Personalization: mean accuracy of the training clients on their test splits", "personalization"),
    ):
        md += ["", f"## {title}", "", "| held out | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for d in held_outs:
            cells = []
            for m in methods:
                done = [r for r in cell_runs[m, d] if r.status == "done"]
                values = [v for r in done if (v := getattr(r, metric)) is not None]
                failed = any(r.status == "failed" for r in cell_runs[m, d])
                cells.append("n/a" if done and not values else _pct_cell(values, len(seeds), failed))
            md.append(f"| {d} | " + " | ".join(cells) + " |")
        cells = [_pct_cell(_seed_means(method_runs[m], held_outs, seeds, metric), len(seeds), False) for m in methods]
        md.append("| **mean** | " + " | ".join(cells) + " |")

    md += [
        "",
        "## Cost per method (mean over its finished runs)",
        "",
        "| method | parameters trained | up / client / round | down / client / round | up + down / client / round "
        "| total per run | seconds / round | features encoded per run | rounds |",
        "|---" * 9 + "|",
    ]
    for m in methods:
        c = {k: _cost(method_runs[m], k) for k in COST_COLUMNS}
        md.append(
            f"| {m} | {_number(c['trained_parameters'])} | {format_bytes(c['bytes_up_per_client_per_round'])} "
            f"| {format_bytes(c['bytes_down_per_client_per_round'])} | {format_bytes(c['bytes_per_client_per_round'])} "
            f"| {format_bytes(c['bytes_total'])} | {_number(c['seconds_per_round'], '.2f')} "
            f"| {_number(c['features_encoded'])} | {_number(c['rounds'], '.0f')} |"
        )

    failed_runs = [r for r in runs if r.status == "failed"]
    if failed_runs:
        md += ["", "## Failed runs", ""]
        md += [
            f"- {r.method}, held out {r.held_out}, seed {r.seed}: {r.failure.get('reason', '?')} (log: {r.log})"
            for r in failed_runs
        ]
    (out_dir / "table.md").write_text("\n".join(md) + "\n")

    for m in methods:
        for d, group in [*((d, cell_runs[m, d]) for d in held_outs), ("mean", method_runs[m])]:
            row = {
                "held_out": d,
                "method": m,
                "runs": len(group),
                "done": sum(r.status == "done" for r in group),
                "failed": sum(r.status == "failed" for r in group),
            }
            for metric in ("generalization", "personalization"):
                if d == "mean":
                    mean, std = _stats(_seed_means(group, held_outs, seeds, metric))
                else:
                    mean, std = _stats(
                        [v for r in group if r.status == "done" and (v := getattr(r, metric)) is not None]
                    )
                row[f"{metric}_mean_pct"] = None if mean is None else round(100 * mean, 4)
                row[f"{metric}_std_pct"] = None if std is None else round(100 * std, 4)
            row.update({k: None if (v := _cost(group, k)) is None else round(v, 4) for k in COST_COLUMNS})
            csv_rows.append(row)
    with open(out_dir / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)


# ---------------------------------------------------------------- plots


def _curve(runs: list[Run], value) -> tuple[list[int], list[float], list[float]]:
    """Rounds every run has, with the mean and sample std over runs of value(row) at each."""
    per_run = [{r["round"]: v for r in run.rows if (v := value(run, r)) is not None} for run in runs]
    rounds = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    means = [statistics.mean(p[k] for p in per_run) for k in rounds]
    stds = [statistics.stdev(p[k] for p in per_run) if len(per_run) > 1 else 0.0 for k in rounds]
    return rounds, means, stds


def _held_out_acc(run: Run, row: dict) -> float | None:
    return row.get(f"acc/{run.held_out}")


def _train_acc(run: Run, row: dict) -> float | None:
    values = [v for k, v in row.items() if k.startswith("acc/") and k != f"acc/{run.held_out}" and v is not None]
    return statistics.mean(values) if values else None


def write_plots(out_dir: Path, runs: list[Run], methods: list[str], held_outs: list[str]) -> list[Path]:
    """accuracy_<held out>.png (held-out and training-client accuracy per round, one line per method)
    and bytes_vs_accuracy.png (held-out accuracy against cumulative bytes sent, per method)."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # a method has one colour in every plot
    done = [r for r in runs if r.status == "done" and r.rows]
    for d in held_outs:
        cell = {m: [r for r in done if r.method == m and r.held_out == d] for m in methods}
        if not any(cell.values()):
            continue
        fig, axes = figure(2, size=(11, 4), sharex=True)
        for ax, value, title in (
            (axes[0], _held_out_acc, f"held out: {d} (generalization)"),
            (axes[1], _train_acc, "training clients' test splits (personalization)"),
        ):
            for m, group in cell.items():
                if group:
                    line(ax, *_curve(group, value), f"{m} ({len(group)} seed{'s' * (len(group) > 1)})", colors[m])
            style(ax, title)
        axes[0].legend()
        written.append(save(fig, plots / f"accuracy_{SAFE_NAME.sub('_', d)}.png"))

    fig, [ax] = figure()
    for m in methods:
        group = [r for r in done if r.method == m]
        if not group:
            continue
        rounds, acc, _ = _curve(group, _held_out_acc)
        sent = []
        for run in group:
            total, cumulative = 0, {}
            for row in sorted(run.rows, key=lambda r: r["round"]):
                total += row.get("bytes_round") or 0
                cumulative[row["round"]] = total
            sent.append(cumulative)
        xs = [statistics.mean(c[k] for c in sent) for k in rounds]
        keep = [i for i, x in enumerate(xs) if x > 0]  # log axis: a method that sends nothing is a level line
        if keep:
            # no band: it would mix domains
            line(ax, [xs[i] for i in keep], [acc[i] for i in keep], [0.0] * len(keep), m, colors[m])
        elif rounds:
            line(ax, [1], acc[-1:], [0.0], f"{m} (sends nothing)", colors[m])
    ax.set(xscale="log")
    style(
        ax,
        "communication against generalization",
        "bytes sent, all clients, cumulative",
        "held-out accuracy (%), mean over domains and seeds",
        integer_x=False,
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return [*written, save(fig, plots / "bytes_vs_accuracy.png")]
