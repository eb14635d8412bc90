"""Accuracy plots: one style for a run folder's accuracy.png and the sweep's plots (benchmarks/sweep_report.py).

Figures are made with matplotlib's object API (`Figure`, Agg canvas), not pyplot: no global state and no GUI
backend, so a ServerApp thread or a test may draw one while anything else runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 120


def figure(ncols: int = 1, size: tuple[float, float] = (6.5, 4.5), sharex: bool = False) -> tuple[Figure, list[Axes]]:
    """A figure with `ncols` axes side by side."""
    fig = Figure(figsize=size)
    axes = fig.subplots(1, ncols, sharex=sharex, squeeze=False)[0]
    return fig, list(axes)


def line(
    ax: Axes, xs: Sequence[float], means: Sequence[float], stds: Sequence[float], label: str | None, color: str
) -> None:
    """A curve of fractions drawn in % with its ± std band; a single point (zero-shot: round 0 only) as a dashed
    level line."""
    ys = [100 * m for m in means]
    if len(xs) == 1:
        ax.axhline(ys[0], linestyle="--", color=color, label=label)
        return
    ax.plot(xs, ys, color=color, label=label)
    if any(stds):
        ax.fill_between(
            xs,
            [100 * (m - s) for m, s in zip(means, stds)],
            [100 * (m + s) for m, s in zip(means, stds)],
            color=color,
            alpha=0.2,
        )


def style(ax: Axes, title: str, xlabel: str = "round", ylabel: str = "accuracy (%)", integer_x: bool = True) -> None:
    """Title, axis labels, a light grid; whole rounds on the x axis."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")


def save(fig: Figure, path: Path) -> Path:
    """Write the figure as a PNG (replacing the file) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    fig.clf()
    return path


def run_accuracy_plot(
    rows: list[dict], domains: list[str], held_out: str, best_round: int | None, title: str, path: Path
) -> Path:
    """A run's accuracy.png: each domain's accuracy against the round (held out marked), its zero-shot accuracy
    (round 0)
    as a dashed line of the same colour, and the round `selection` chose (the best, or the last) marked."""
    fig, [ax] = figure(size=(8.5, 4.5))
    trained = [r for r in rows if r["round"] > 0]
    for i, domain in enumerate(domains):
        color, key = f"C{i % 10}", f"acc/{domain}"
        name = f"{domain} (held out)" if domain == held_out else domain
        points = [(r["round"], r[key]) for r in trained if r.get(key) is not None]
        if points:
            line(ax, [x for x, _ in points], [y for _, y in points], [0.0] * len(points), name, color)
        zero_shot = next((r.get(key) for r in rows if r["round"] == 0), None)
        if zero_shot is not None:
            line(ax, [0], [zero_shot], [0.0], None if points else f"{name}, zero-shot", color)
        best = next((r.get(key) for r in trained if r["round"] == best_round), None)
        if best is not None:
            ax.plot([best_round], [100 * best], marker="o", color=color)
    if best_round is not None:
        ax.axvline(best_round, color="0.5", linestyle=":", label=f"chosen round ({best_round})")
    ax.plot([], [], linestyle="--", color="0.5", label="zero-shot CLIP")  # what the dashed lines are
    style(ax, title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, never over them
    return save(fig, path)
