"""What tracking costs a round: the same demo run with tracking off and on, alternated, seconds per round from
summary.json.

    python -m benchmarks.tracking_cost --repeats 5
    python -m benchmarks.tracking_cost --repeats 5 --on "tracking.tensorboard=true
    tracking.mlflow_uri=sqlite:////tmp/fedclip-mlflow.db"

Each run is one whole run of the default configuration in this process (benchmarks/demo_seeds.py's run_seed: the
ServerApp
and the ClientApps unchanged, no Ray), identical but for the tracking options; runs alternate off, on, off, on, ...
so that
a machine that slows down weighs on both alike. A zero-shot run first encodes the demo's features (or finds them in the
cache), so that no pair pays for it. Prints each pair's seconds per round (the summary's mean over the trained
rounds: the per-round logging falls inside
them) and the whole run's seconds (start, TensorBoard's and MLflow's set-up and the end: MLflow's artifacts
included), then
the medians and on / off. Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks.demo_seeds import run_seed

OFF = "tracking.tensorboard=false tracking.mlflow_uri=null"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs (off, on)")
    parser.add_argument("--overrides", default="", help="Hydra overrides of every run, e.g. training.rounds=20")
    parser.add_argument("--on", default="tracking.tensorboard=true", help="the tracking options of the 'on' runs")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/tracking-cost"), help="emptied first; one folder per run"
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    # encodes the features once, outside the pairs
    run_seed(0, f"{args.overrides} {OFF} method=zero_shot", out / "warm-up")
    print("| pair | off: s/round | on: s/round | off: s/run | on: s/run |\n|---|---|---|---|---|")
    for repeat in range(args.repeats):
        for name, tracking in (("off", OFF), ("on", args.on)):
            start = time.perf_counter()
            summary = run_seed(0, f"{args.overrides} {tracking}", out / f"{name}{repeat}")
            results[name].append((summary["seconds_per_round"], time.perf_counter() - start))
        (off_round, off_run), (on_round, on_run) = results["off"][-1], results["on"][-1]
        print(f"| {repeat} | {off_round:.4f} | {on_round:.4f} | {off_run:.2f} | {on_run:.2f} |", flush=True)
    median = {name: [statistics.median(v[i] for v in values) for i in (0, 1)] for name, values in results.items()}
    print(
        f"\nmedian seconds per round: off {median['off'][0]:.4f}, on {median['on'][0]:.4f}: "
        f"on / off = {median['on'][0] / median['off'][0]:.3f}; whole run: off {median['off'][1]:.2f} s, "
        f"on {median['on'][1]:.2f} s "
        f"(tracking options of 'on': {args.on})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
