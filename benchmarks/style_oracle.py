"""The most a prompt shared by the sites of one style can give them: one PromptFL context per style, tuned on the train
splits of all that style's sites pooled in one place, scored on each site's own test split.

    python -m benchmarks.style_oracle --seeds 0 1 2 3 4 --settings 1 25 \\
        --grid outputs/methods-grid --labels "Conditioned prompt" "Clustered prompt"

It is the bound of every method whose personal part is learned per style (clustered_prompt with clean clusters,
conditioned_prompt's generator at its best): the whole style's images in one place, the method's own optimiser and
schedule (`method=promptfl`'s options, `training.rounds` epochs of the pool, as method=centralized_prompt tunes).
Gains are in points over zero-shot CLIP on the same sites (a domain's test images pooled, then the mean over the
training domains, as summary.json's `personalization_mean`). With --grid, a methods_grid folder of the same seeds and
settings, each label's gain is paired with the bound's, seed by seed. Needs every site's data on this machine.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.demo_seeds import finished_summary
from benchmarks.methods_grid import cell, config_folder, gains, setting_overrides
from common.config import load_config
from common.data import dataset_domains
from common.features import DomainFeatures
from common.local_data import client_data
from common.methods.base import load_method
from common.model import class_logits
from server_app.selection import SELECTIONS


def style_oracle(seed: int, setting: str, overrides: str = "", others: float = 0.0) -> tuple[float, float]:
    """Zero-shot's and the style-pooled context's personalization accuracy (0-1) for one seed and setting; `others`:
    the share of each other training style's train images pooled in too (seeded), 0 for the style's own alone."""
    cfg = load_config(f"{overrides} seed={seed} {setting_overrides(setting)} method=promptfl")
    method, k = load_method(cfg), int(cfg.dataset.clients_per_domain)
    training = OmegaConf.merge(cfg.training, {"local_epochs": cfg.training.rounds})
    styles = {
        domain: [client_data(cfg, domain, shard, torch.device("cpu")) for shard in range(k)]
        for domain in dataset_domains(cfg)
        if domain != cfg.dataset.held_out
    }
    train = {
        domain: (
            torch.cat([d.feats.image[d.split.train] for d in sites]),
            torch.cat([d.feats.labels[d.split.train] for d in sites]),
        )
        for domain, sites in styles.items()
    }
    zero_shot, pooled = [], []
    for domain, sites in styles.items():
        parts = [train[domain]]
        for other, (x, y) in train.items():
            if other != domain and others > 0:
                keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[: round(others * len(y))]
                parts.append((x[keep], y[keep]))
        pool = DomainFeatures(
            torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), None, sites[0].feats.logit_scale, []
        )
        text = method._text(sites[0])
        ctx, _ = method._tune(
            text,
            text.initial_context(method.init),
            pool,
            torch.arange(len(pool.labels)),
            training,
            torch.Generator().manual_seed(seed),
            {},
        )
        with torch.no_grad():
            tuned = text(ctx.to(text.ids.device)).cpu()
        right = {"zero-shot": 0, "pooled": 0}
        tested = 0
        for d in sites:
            rows = torch.as_tensor(d.split.test, dtype=torch.long)
            x, y, scale = d.feats.image[rows], d.feats.labels[rows], d.feats.logit_scale
            right["zero-shot"] += int(class_logits(x, d.feats.text, scale, None).argmax(1).eq(y).sum())
            right["pooled"] += int(class_logits(x, tuned, scale, None).argmax(1).eq(y).sum())
            tested += len(rows)
        zero_shot.append(right["zero-shot"] / tested)
        pooled.append(right["pooled"] / tested)
        print(
            f"seed {seed}, {setting}, {domain}: zero-shot {zero_shot[-1]:.4f}, style-pooled {pooled[-1]:.4f}",
            file=sys.stderr,
            flush=True,
        )
    return sum(zero_shot) / len(zero_shot), sum(pooled) / len(pooled)


def grid_gains(grid: Path, settings: list[str], labels: list[str], seeds: list[int], rule: str) -> dict:
    """Each (setting, label)'s personalization gains per seed, from a methods_grid folder's finished runs."""
    found = {}
    for setting in settings:
        for label in labels:
            folder = config_folder(grid, setting, label)
            runs = [finished_summary(folder, seed) for seed in seeds]
            if None in runs:
                missing = [seed for seed, run in zip(seeds, runs) if run is None]
                raise SystemExit(
                    f"{folder} has no finished run of seed(s) {missing}: run benchmarks.methods_grid first"
                )
            found[(setting, label)] = gains(runs, rule)[1]
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", default=["1", "25"])
    parser.add_argument("--overrides", default="", help="Hydra overrides (the grid's --overrides)")
    parser.add_argument("--grid", type=Path, help="a methods_grid --out folder with runs of the same seeds")
    parser.add_argument("--labels", nargs="*", default=[], help="the grid's configurations to pair with the bound")
    parser.add_argument(
        "--others", type=float, default=0.0, help="the share of every other style's train images pooled in (0 to 1)"
    )
    parser.add_argument("--selection", default="last", choices=SELECTIONS, help="the round of the grid's runs")
    parser.add_argument("--csv", type=Path, help="also write each seed's accuracies and gain here")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("a confidence interval needs at least 2 seeds")
    if not 0 <= args.others <= 1:
        parser.error(f"--others is a share of each other style's images, from 0 to 1; got {args.others}")
    if args.labels and not args.grid:
        parser.error("--labels names configurations of a grid: give its folder with --grid")
    paired = grid_gains(args.grid, args.settings, args.labels, args.seeds, args.selection) if args.grid else {}
    print("| clients a domain | zero-shot pers. | style-pooled context: personalization gain |")
    print("|---|---|---|")
    bound, rows = {}, []
    for setting in args.settings:
        accs = [style_oracle(seed, setting, args.overrides, args.others) for seed in args.seeds]
        bound[setting] = [100 * (pooled - zero) for zero, pooled in accs]
        zero = 100 * sum(z for z, _ in accs) / len(accs)
        print(f"| {setting} | {zero:.2f} | {cell(bound[setting])} |", flush=True)
        rows += [
            {
                "setting": setting,
                "seed": seed,
                "others": args.others,
                "zero_shot": f"{z:.6f}",
                "style_pooled": f"{p:.6f}",
            }
            for seed, (z, p) in zip(args.seeds, accs)
        ]
    if paired:
        print("\n| clients a domain | configuration | its personalization gain | it - style-pooled |")
        print("|---|---|---|---|")
        for (setting, label), pers in paired.items():
            difference = [a - b for a, b in zip(pers, bound[setting])]
            print(f"| {setting} | {label} | {cell(pers)} | {cell(difference)} |")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
