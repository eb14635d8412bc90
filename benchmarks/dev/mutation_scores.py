"""Per-module mutation scores from mutmut's results, as docs/mutation.md reports them (benchmarks/dev/mutation.sh
runs it).

    python -m benchmarks.dev.mutation_scores                 # the table of every module mutmut has results for
    python -m benchmarks.dev.mutation_scores --survivors     # and each surviving mutant's name (`mutmut show NAME`
    prints its diff)
    python -m benchmarks.dev.mutation_scores --sample 120    # the score of a seeded random sample of 120 mutants a
    module
    python -m benchmarks.dev.mutation_scores --pick 120 strategy privacy   # that sample's names, for `mutmut run
    NAME ...`

A mutant counts as killed when a test failed on it or it ran past mutmut's timeout (the mutation made the code hang);
it survives when every test that covers its function passed, and has "no tests" when none of the selected tests runs
its function. The score is killed / (mutants - not yet checked): a mutant with no tests counts against it.

Every mutant of the five modules takes about 2.5 hours on 2 cores (about 10 s each: a survivor runs every test
that covers its function); a sample of N a module, the same N every time for a given seed, estimates each module's
score with a 95% Wilson interval in a fraction of that.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from pathlib import Path

KILLED = {
    1: "killed",
    3: "killed",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    37: "killed",
    -11: "killed",
    -9: "killed",
}  # mutmut's exit codes (mutmut/stats.py): failing test, timeout, crash
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}


def status(exit_code: int | None) -> str:
    if exit_code is None:
        return "not checked"
    return KILLED.get(exit_code) or SURVIVED.get(exit_code) or ("skipped" if exit_code == 34 else "suspicious")


def results(mutants: Path) -> dict[str, dict[str, int | None]]:
    """Module file -> {mutant name: mutmut's exit code, None if not yet run}, from mutmut's .meta files."""
    return {
        str(meta.relative_to(mutants)).removesuffix(".meta"): json.loads(meta.read_text())["exit_code_by_key"]
        for meta in sorted(mutants.rglob("*.py.meta"))
    }


def sample(names: list[str], size: int | None, seed: int) -> list[str]:
    """`size` of a module's mutants drawn at random, the same ones for the same mutants and seed; all of them if
    size is None."""
    names = sorted(names)
    return names if size is None or size >= len(names) else sorted(random.Random(seed).sample(names, size))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sound near 100%, where the normal approximation is not."""
    p, denominator = successes / n, 1 + z * z / n
    centre, spread = (
        (p + z * z / (2 * n)) / denominator,
        z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator,
    )
    return centre - spread, centre + spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mutants", type=Path, default=Path("mutants"), help="mutmut's working copy (default: ./mutants)"
    )
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants too")
    parser.add_argument("--sample", type=int, help="score only a seeded random sample of this many mutants a module")
    parser.add_argument("--pick", type=int, help="print the sample's mutant names of the modules given, for mutmut run")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument(
        "modules", nargs="*", help="with --pick: the modules' names, e.g. strategy privacy (default: all)"
    )
    args = parser.parse_args()
    found = results(args.mutants)
    if args.pick:
        for module, codes in found.items():
            if not args.modules or Path(module).stem in args.modules:
                print("\n".join(sample(list(codes), args.pick, args.seed)))
        return
    print("| module | mutants | killed | timeout | survived | no tests | not checked | score | 95% interval |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    survivors = {}
    for module, codes in found.items():
        names = sample(list(codes), args.sample, args.seed)
        counts = Counter(status(codes[name]) for name in names)
        survivors[module] = [name for name in names if status(codes[name]) in ("survived", "no tests", "suspicious")]
        checked = len(names) - counts["not checked"] - counts["skipped"]
        detected = counts["killed"] + counts["timeout"]
        score, interval = "-", "-"
        if checked:
            low, high = wilson(detected, checked)
            score, interval = f"{100 * detected / checked:.1f}%", f"{100 * low:.1f}-{100 * high:.1f}%"
        print(
            f"| {module} | {len(names)} | {counts['killed']} | {counts['timeout']} "
            f"| {counts['survived'] + counts['suspicious']} | "
            f"{counts['no tests']} | {counts['not checked']} | {score} | {interval} |"
        )
    if args.survivors:
        for module, names in survivors.items():
            print(f"\n{module}: {len(names)}")
            print("\n".join(f"  {name}" for name in names))


if __name__ == "__main__":
    main()
