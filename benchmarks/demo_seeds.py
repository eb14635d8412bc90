"""A method's gains over zero-shot CLIP on the demo, over several seeds, with 95% confidence intervals.

    python -m benchmarks.demo_seeds --seeds 0 1 2 3 4 5 6 7 8 9
    python -m benchmarks.demo_seeds --seeds 10 11 12 13 14 15 16 17 18 19 --overrides "method=promptfl"
    python -m benchmarks.demo_seeds --seeds 0 1 2 3 4 --overrides "dataset.held_out=photo"

Each seed is one whole run of the default configuration in this process (tests/inprocess.py: the
ServerApp's main and the ClientApps unchanged, no SuperLink and no Ray, so it takes a fraction of a
`flwr run`'s CPU; the accuracies are the same as `flwr run`'s). The seed changes the splits, the
adapter's initialisation and the shuffling, not the demo. Prints a Markdown table: per seed, the
held-out domain's accuracy and the mean of the training clients' test splits (personalization),
zero-shot and at the best round; then each gain's mean and its 95% confidence interval (Student's t
over the seeds' paired gains), and whether that interval includes zero.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from scipy import stats

from client_app.app import app as client_app
from common.config import load_config
from common.data import dataset_domains
from server_app.app import app as server_app
from tests.inprocess import run_in_process


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of its Student's t confidence interval."""
    mean = statistics.fmean(values)
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def finished_summary(out: Path, seed: int) -> dict | None:
    """The summary.json of a seed's last finished run in `out`; None if it has none."""
    done = [
        p
        for p in sorted((out / f"seed{seed}").glob("*/summary.json"))
        if json.loads(p.read_text()).get("status") != "failed"
    ]
    return json.loads(done[-1].read_text()) if done else None


def run_seed(seed: int, overrides: str, out: Path) -> dict:
    """One in-process run's summary.json; a seed whose run folder in `out` is finished is not run again."""
    folder = out / f"seed{seed}"
    summary = finished_summary(out, seed)
    if summary is None:
        shutil.rmtree(folder, ignore_errors=True)
        run_overrides = f"{overrides} seed={seed} output_dir={folder}".strip()
        cfg = load_config(run_overrides)
        run_in_process(
            server_app,
            client_app,
            run_overrides,
            len(dataset_domains(cfg)) * int(cfg.dataset.get("clients_per_domain", 1)),
        )
        summary = json.loads(sorted(folder.glob("*/summary.json"))[-1].read_text())
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--overrides", default="", help="Hydra overrides for every run (space-separated)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/demo-seeds"),
        help="one run folder per seed; finished seeds are reused, so an interrupted command resumes",
    )
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("a confidence interval needs at least 2 seeds")

    rows, held_gains, pers_gains = [], [], []
    for seed in args.seeds:
        s = run_seed(seed, args.overrides, args.out.resolve())
        held = s["held_out"]
        zs_held, held_acc = 100 * s["zero_shot"][held], 100 * s["generalization"][held]
        zs_pers, pers_acc = 100 * s["zero_shot_train_domains_mean"], 100 * s["personalization_mean"]
        held_gains.append(held_acc - zs_held)
        pers_gains.append(pers_acc - zs_pers)
        rows.append(
            f"| {seed} | {zs_held:.2f} → {held_acc:.2f} ({held_gains[-1]:+.2f}) | "
            f"{zs_pers:.2f} → {pers_acc:.2f} ({pers_gains[-1]:+.2f}) | {s['best_round']} |"
        )
        print(f"seed {seed} done: {rows[-1]}", file=sys.stderr, flush=True)

    def cell(gains: list[float]) -> str:
        mean, low, high = confidence_interval(gains)
        verdict = "includes zero" if low <= 0 <= high else "excludes zero"
        return f"**{mean:+.2f}** [{low:+.2f}, {high:+.2f}], {verdict}"

    method = s["method"]
    print(
        f"| seed | held-out {held}: zero-shot → {method} (gain) | personalization mean: zero-shot → {method} (gain) "
        f"| best round |"
    )
    print("|---|---|---|---|")
    print("\n".join(rows))
    print(f"| **gain, mean [95% CI] over {len(args.seeds)} seeds** | {cell(held_gains)} | {cell(pers_gains)} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
