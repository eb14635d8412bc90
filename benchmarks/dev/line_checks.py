"""Each bug-prone line of the trust-critical code removed or changed, alone, and the tests named: each must fail
(docs/mutation.md).

    git worktree add --detach /tmp/scratch HEAD && python -m benchmarks.dev.line_checks /tmp/scratch

It edits the files of the checkout it is given, one line at a time, and puts each back: give it a scratch checkout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CASES = [
    (
        "DP calibration: the noise divided by the clients actually averaged (line removed)",
        "server_app/privacy.py",
        "            self.num_sampled_clients = len(accepted)  # the noise's std is noise_multiplier x clip / "
        "clients averaged\n",
        "",
        ["tests/test_privacy.py"],
    ),
    (
        "DP under SecAgg+: the noise divided by the updates in the sum (line removed)",
        "server_app/privacy.py",
        "        self.num_sampled_clients = len(replies)",
        "        pass  #",
        ["tests/test_privacy.py", "tests/test_secagg.py"],
    ),
    (
        "screening: NaN/Inf rejected (check removed)",
        "server_app/screening.py",
        '        if not np.isfinite(array).all():\n            return None, f"{key} holds NaN or Inf"\n',
        "",
        ["tests/test_trust.py", "tests/test_strategy.py", "tests/test_poisoning.py"],
    ),
    (
        "screening: example count above what discovery reported (check removed)",
        "server_app/screening.py",
        "            if (limit := max_examples(client)) is not None and examples > limit:",
        "            if False:",
        ["tests/test_trust.py", "tests/test_strategy.py", "tests/test_poisoning.py"],
    ),
    (
        "robust rules: clients a round samples, not all training clients (the old bug restored)",
        "server_app/strategy.py",
        "clients_a_round=len(self.train_sample(1)),",
        "clients_a_round=len(self.train_nodes),",
        ["tests/test_trust.py"],
    ),
    (
        "robust rules: a round with too few valid updates leaves the adapter unchanged (bound removed)",
        "server_app/strategy.py",
        "need = max(self.min_train_nodes, min_clients(self.aggregation, self.num_malicious))",
        "need = self.min_train_nodes",
        ["tests/test_trust.py", "tests/test_strategy.py"],
    ),
    (
        "best round: compared on the clients evaluated in both rounds (line changed to all clients)",
        "server_app/selection.py",
        '        common = self.scores.evaluated(row["evaluate"]) & self.scores.evaluated(best["evaluate"])\n',
        '        common = self.scores.evaluated(row["evaluate"]) | self.scores.evaluated(best["evaluate"])\n',
        ["tests/test_report.py"],
    ),
    (
        "best round: a tie keeps the earlier round (> changed to >=)",
        "server_app/selection.py",
        "        return mine > theirs\n",
        "        return mine >= theirs\n",
        ["tests/test_report.py"],
    ),
    (
        "checkpoint: adaptive DP's clipping norm restored on resume (line removed)",
        "server_app/checkpoint.py",
        "        strategy.load_checkpoint_state(ckpt.strategy)\n",
        "        pass\n",
        ["tests/test_checkpoint.py", "tests/test_privacy.py"],
    ),
    (
        "checkpoint: the server optimizer's moments restored on resume (line removed)",
        "server_app/checkpoint.py",
        "        optimizer.load_state(ckpt.optimizer)\n",
        "        pass\n",
        ["tests/test_checkpoint.py", "tests/test_server_optimizer.py"],
    ),
]


def main(root: Path) -> int:
    """Print, for each case, pytest's summary and the tests that failed; 1 if a change left every test passing."""
    missed = 0
    for title, path, old, new, tests in CASES:
        missed += not check(root, title, path, old, new, tests)
    return int(missed > 0)


def check(root: Path, title: str, path: str, old: str, new: str, tests: list[str]) -> bool:
    """One change applied, the tests run, the file put back; whether a test failed."""
    file = root / path
    text = file.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{path}: the line of '{title}' is not there once; update CASES to the code")
    file.write_text(text.replace(old, new))
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "--basetemp",
                str(root / ".line-checks"),
                *tests,
            ],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        file.write_text(text)
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in out.splitlines() if line.startswith("FAILED")]
    print(
        f"### {title}\n`{path}`: {out.strip().splitlines()[-1]}\n" + "".join(f"- {name}\n" for name in failed),
        flush=True,
    )
    return bool(failed)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
