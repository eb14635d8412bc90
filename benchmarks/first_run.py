"""The README's first command, several times in a row, each with a fresh FLWR_HOME: does a first run work every time?

    flock /tmp/fedclip-flwr.lock python -m benchmarks.first_run               # 10 runs back to back
    python -m benchmarks.first_run --runs 1                                   # one run; exit 1 if it failed

Each run is exactly `flwr run . --stream --federation-config "num-supernodes=4 client-resources-num-cpus=1"`
(benchmarks.sweep.flwr_run, no retry), started right after the previous one ended and its SuperLink was
stopped, with its own FLWR_HOME and run folder under --out. A run succeeded when its run folder holds a
summary.json: `flwr run` itself exits 0 even when the Simulation Engine crashed. Prints one line per run
(seconds from the command to the zero-shot round and to round 1, total seconds, or the failure) and the
count; the exit code is 0 only when every run succeeded.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import sys
import time
from pathlib import Path

from benchmarks.sweep import failure_reason, flwr_run

ROW = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO +(\d+) \| ")  # a round row of the table, timestamped


def round_times(log: str, start: float) -> dict[int, float]:
    """Seconds from `start` (a time.time()) to each round row the ServerApp logged."""
    times = {}
    for line in log.splitlines():
        if m := ROW.match(re.sub(r"\x1b\[[0-9;]*m", "", line).strip()):
            stamp = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            times.setdefault(int(m.group(2)), stamp - start)
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("outputs/first-run"), help="one folder per run in here")
    parser.add_argument(
        "--overrides", default="", help="Hydra overrides for every run (default: none, the README command)"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds before a run is stopped and counted failed"
    )
    args = parser.parse_args(argv)

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    ok = 0
    for i in range(1, args.runs + 1):
        folder = out / f"run{i:02d}"
        start = time.time()
        code, log = flwr_run(folder, args.overrides, timeout=args.timeout, attempts=1)
        seconds = time.time() - start
        summaries = sorted(folder.glob("*/summary.json"))
        rounds = round_times(log, start)
        timing = f"round 0 at {rounds[0]:.0f} s, round 1 at {rounds[1]:.0f} s, " if {0, 1} <= rounds.keys() else ""
        if summaries:
            ok += 1
            print(f"run {i}/{args.runs}: ok: {timing}done in {seconds:.0f} s ({summaries[-1]})", flush=True)
        else:
            print(
                f"run {i}/{args.runs}: FAILED after {seconds:.0f} s (flwr run exit "
                f"code {code}): {failure_reason(log)}; "
                f"log {folder / 'flwr.log'}",
                flush=True,
            )
    print(f"{ok} of {args.runs} runs succeeded")
    return 0 if ok == args.runs else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
