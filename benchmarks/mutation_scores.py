"""Per-module mutation scores from mutmut's results, as docs/mutation.md reports them (benchmarks/mutation.sh runs it).

    python -m benchmarks.mutation_scores              # the table of every module mutmut has results for
    python -m benchmarks.mutation_scores --survivors  # and each surviving mutant's name (`mutmut show NAME` prints its diff)

A mutant counts as killed when a test failed on it or it ran past mutmut's timeout (the mutation made the code hang);
it survives when every test that covers its function passed, and has "no tests" when none of the selected tests runs
its function. The score is killed / (mutants - not yet checked): a mutant with no tests counts against it.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          37: "killed", -11: "killed", -9: "killed"}  # mutmut's exit codes (mutmut/stats.py): failing test, timeout, crash
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}


def status(exit_code: int | None) -> str:
    if exit_code is None:
        return "not checked"
    return KILLED.get(exit_code) or SURVIVED.get(exit_code) or ("skipped" if exit_code == 34 else "suspicious")


def scores(mutants: Path) -> dict[str, tuple[Counter, list[str]]]:
    """Module file -> (count of each status, names of the surviving mutants), from mutmut's .meta files."""
    found = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        results = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(status(code) for code in results.values())
        found[str(meta.relative_to(mutants)).removesuffix(".meta")] = (
            counts, sorted(name for name, code in results.items() if status(code) in ("survived", "no tests", "suspicious")))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's working copy (default: ./mutants)")
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants too")
    args = parser.parse_args()
    print("| module | mutants | killed | timeout | survived | no tests | not checked | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for module, (counts, _) in scores(args.mutants).items():
        checked = sum(counts.values()) - counts["not checked"] - counts["skipped"]
        detected = counts["killed"] + counts["timeout"]
        score = f"{100 * detected / checked:.1f}%" if checked else "-"
        print(f"| {module} | {sum(counts.values())} | {counts['killed']} | {counts['timeout']} | {counts['survived'] + counts['suspicious']} | "
              f"{counts['no tests']} | {counts['not checked']} | {score} |")
    if args.survivors:
        for module, (_, survivors) in scores(args.mutants).items():
            print(f"\n{module}: {len(survivors)}")
            print("\n".join(f"  {name}" for name in survivors))


if __name__ == "__main__":
    main()
