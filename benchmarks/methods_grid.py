"""The methods compared on the demo: each configuration at 1, 5 and 25 clients a domain (shards and Dirichlet),
over the same seeds, with 95% intervals on the gains over zero-shot CLIP, and what each round costs.

    python -m benchmarks.methods_grid --seeds 0 1 2 3 4 \\
        --configs "FedCLIP=method=fedclip" "PromptFL=method=promptfl" \\
                  "PromptFL + fedavgm=method=promptfl strategy.server_optimizer=fedavgm" \\
        --settings 1 5 5d 25 25d --overrides "cpu_threads=1" --compare "PromptFL:FedCLIP"

A setting is the clients per domain, with `d` for a Dirichlet partition over labels (dataset.partition=dirichlet,
alpha 0.5) instead of equal random shards. Every run is benchmarks/demo_seeds.py's in-process run (finished runs are
reused, so an interrupted grid resumes), so every configuration sees the same splits and seeds. A run's
summary.json holds what each selection rule (`selection`: val_mean, val_pooled, last) would have chosen, so one run
gives every rule's gains: the first table uses the rule given by --selection, the second compares the rules.
Seconds per round are the run's own (in process, no SuperLink): compare them within one grid, run alone.
The first table is also written to `<out>/grid.csv` (for a spreadsheet), and every run's summary to `<out>/grid.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from benchmarks.demo_seeds import confidence_interval, run_seed
from server_app.selection import SELECTIONS

ENDS = ("", "_low", "_high")  # a gain's mean and its 95% interval, in grid.csv's column names


def setting_overrides(setting: str) -> str:
    """`25d` -> 25 clients a domain, Dirichlet over labels; `5` -> 5 equal random shards."""
    clients, dirichlet = setting.rstrip("d"), setting.endswith("d")
    return f"dataset.clients_per_domain={int(clients)}" + (" dataset.partition=dirichlet" if dirichlet else "")


def config_folder(out: Path, setting: str, label: str) -> Path:
    """Where a configuration's runs of one setting are (a folder per seed)."""
    return out.resolve() / setting / label.replace(" ", "").replace("+", "_")


def gains(summaries: list[dict], rule: str) -> tuple[list[float], list[float]]:
    """Held-out and personalization gains over zero-shot (points), per seed, at the round `rule` chooses."""
    held, pers = [], []
    for s in summaries:
        o = s["selections"][rule]
        held.append(100 * (o["held_out"] - o["zero_shot_held_out"]))
        pers.append(100 * (o["personalization_mean"] - o["zero_shot_train_domains_mean"]))
    return held, pers


def cell(values: list[float]) -> str:
    mean, low, high = confidence_interval(values)
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--configs", nargs="+", required=True, help='"label=hydra overrides", one per configuration')
    parser.add_argument("--settings", nargs="+", default=["1", "5", "5d", "25", "25d"])
    parser.add_argument("--overrides", default="", help="Hydra overrides for every run")
    parser.add_argument("--selection", default="val_mean", choices=SELECTIONS, help="the rule of the first table")
    parser.add_argument("--out", type=Path, default=Path("outputs/methods-grid"))
    parser.add_argument(
        "--compare",
        nargs="*",
        default=[],
        metavar="A:B",
        help='"label A:label B": the paired differences A - B over the seeds (e.g. a method against its local-only)',
    )
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("a confidence interval needs at least 2 seeds")
    configs = dict(c.split("=", 1) for c in args.configs)

    results = {}
    for setting in args.settings:
        for label, overrides in configs.items():
            folder = config_folder(args.out, setting, label)
            runs = [
                run_seed(seed, f"{args.overrides} {setting_overrides(setting)} {overrides}", folder)
                for seed in args.seeds
            ]
            results[(setting, label)] = runs
            held, pers = gains(runs, args.selection)
            print(
                f"{setting} {label}: held-out {cell(held)}, personalization {cell(pers)}", file=sys.stderr, flush=True
            )

    print(
        f"Gains over zero-shot CLIP in points, mean [95% CI] over seeds {', '.join(map(str, args.seeds))}; "
        f"best round by `selection={args.selection}`.\n"
    )
    print(
        "| clients a domain | configuration | zero-shot held-out / pers. | held-out gain | personalization gain "
        "| seconds/round | bytes/client/round | parameters sent |"
    )
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for (setting, label), runs in results.items():
        held, pers = gains(runs, args.selection)
        first = runs[0]["selections"][args.selection]
        train_domains = sum(r["zero_shot_train_domains_mean"] for r in runs) / len(runs)
        zero = f"{100 * first['zero_shot_held_out']:.2f} / {100 * train_domains:.2f}"
        seconds = sum(r["seconds_per_round"] for r in runs) / len(runs)
        sent = sum(r["bytes_per_client_per_round"] for r in runs) / len(runs)
        print(
            f"| {setting} | {label} | {zero} | {cell(held)} | {cell(pers)} | {seconds:.2f} | {sent / 1024:,.1f} KiB "
            f"| {runs[0]['trained_parameters']:,} |"
        )
        table.append(
            {
                "setting": setting,
                "configuration": label,
                "seeds": " ".join(map(str, args.seeds)),
                **{f"held_out_gain{end}": f"{v:.4f}" for end, v in zip(ENDS, confidence_interval(held))},
                **{f"personalization_gain{end}": f"{v:.4f}" for end, v in zip(ENDS, confidence_interval(pers))},
                "seconds_per_round": f"{seconds:.4f}",
                "bytes_per_client_per_round": f"{sent:.0f}",
                "parameters_sent": runs[0]["trained_parameters"],
            }
        )

    print("\nThe selection rules compared on the same runs (held-out gain / personalization gain; mean best round):\n")
    print("| clients a domain | configuration | " + " | ".join(SELECTIONS) + " |")
    print("|---|---|" + "---|" * len(SELECTIONS))
    for (setting, label), runs in results.items():
        cells = []
        for rule in SELECTIONS:
            held, pers = gains(runs, rule)
            rounds = sum(r["selections"][rule]["round"] for r in runs) / len(runs)
            cells.append(f"{cell(held)} / {cell(pers)}; round {rounds:.0f}")
        print(f"| {setting} | {label} | " + " | ".join(cells) + " |")
    if args.compare:
        print(f"\nPaired differences (points, mean [95% CI] over the seeds; `selection={args.selection}`):\n")
        print("| clients a domain | A - B | held-out | personalization (each site's own test split) |")
        print("|---|---|---|---|")
        for pair in args.compare:
            a, _, b = pair.partition(":")
            for setting in args.settings:
                if (setting, a) in results and (setting, b) in results:
                    (held_a, pers_a), (held_b, pers_b) = (gains(results[(setting, x)], args.selection) for x in (a, b))
                    held = [x - y for x, y in zip(held_a, held_b)]
                    pers = [x - y for x, y in zip(pers_a, pers_b)]
                    print(f"| {setting} | {a} - {b} | {cell(held)} | {cell(pers)} |")
    with open(args.out / "grid.csv", "w", newline="") as fh:  # the first table, for a spreadsheet
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (args.out / "grid.json").write_text(
        json.dumps({f"{s}|{lab}": runs for (s, lab), runs in results.items()}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
