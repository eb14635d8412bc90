"""The round table in the log: a header of the domains, then one line a round as the run goes; and how its figures
are written for a reader (percentages, byte counts), the same in the sweep's tables (benchmarks/sweep_report.py)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class RoundTable:
    """The table's header (the held-out domain starred; with strategy.dp one more column, the privacy spent), printed
    when it is made, and a line for each round's row (server_app/report.py)."""

    def __init__(self, domains: list[str], held_out: str, dp: bool) -> None:
        self.domains, self.dp = domains, dp
        names = [f"{d}{'*' if d == held_out else ''}" for d in domains]
        self._print(["round", "train loss", *names, "val mean", "sent/client", "seconds", *(["epsilon"] if dp else [])])

    def add(self, row: dict) -> None:
        """A round's line: its train loss, each domain's accuracy and the mean validation accuracy in %, the bytes a
        training client received and sent, the seconds (and the privacy spent)."""
        fmt = lambda v, pct=True: "-" if v is None else (f"{100 * v:.2f}" if pct else f"{v:.4f}")  # noqa: E731
        sent = (row["bytes_down_per_client"] or 0) + (row["bytes_up_per_client"] or 0)
        self._print(
            [
                str(row["round"]),
                fmt(row["train_loss"], False),
                *[fmt(row[f"acc/{d}"]) for d in self.domains],
                fmt(row["val_acc_mean"]),
                format_bytes(sent),
                f"{row['seconds']:.2f}",
                *([fmt(row["dp_epsilon"], False)] if self.dp else []),
            ]
        )

    @staticmethod
    def _print(cells: list[str]) -> None:
        log.info(" | ".join(f"{c:>10}" for c in cells))


def percent(value: float | None) -> str:
    """A fraction in % with two decimals ("-" for None)."""
    return "-" if value is None else f"{100 * value:.2f}%"


def format_bytes(n: float | None) -> str:
    """A byte count as B, KiB, MiB or GiB ("—" for None), for the log and the sweep's tables."""
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
