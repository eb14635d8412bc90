"""What screening, the robust rules, DP and 16-bit transport cost and buy, measured on the demo.

    python -m benchmarks.attacks attacks     # 9 training clients, 1 then 2 poisoned, under each rule (--attackers,
    --rules)
    python -m benchmarks.attacks dp          # utility against epsilon, a few noise multipliers, 3 seeds
    python -m benchmarks.attacks dtype       # float16 / bfloat16 transport against float32, 3 seeds
    python -m benchmarks.attacks bytes       # bytes per training client per round with ViT-B/32's adapter and
    PromptFL context,
                                             # each transport and SecAgg+ (--rules PromptFL: only PromptFL's rows)
    options: --rounds 20 --seeds 0 1 2 --out outputs/trust

Every run is the whole app (ServerApp main + ClientApps) on the in-process grid of tests/inprocess.py,
the demo with dataset.clients_per_domain=3 (9 training clients, 3 held-out sketch clients; --clients-per-domain 1:
the default demo). Poisoned
clients exist only here: a ClientApp wrapping the real handlers whose train replies are replaced, for
the chosen partitions, by a poisoned update (scaled by 1e6, sign-flipped, or random noise of the
update's norm). Prints markdown tables: held-out (sketch) and personalization accuracy at the best
round (the report's protocol) and held-out at the last round.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

import client_app.app as client_module
from client_app.clipping import dp_clipping_mod
from client_app.secagg import secagg_mod
from common.transport import WIRE_DTYPES, decode, encode
from server_app.app import app as server_app
from tests.conftest import save_tiny_clip, write_image_folder
from tests.inprocess import run_in_process

ATTACKS = ("scale", "sign_flip", "noise")
# the demo's; with 3 clients per domain partitions 0-2 are photo, 3-5 sketch (held out), 6-8 cartoon, 9-11 painting
DOMAINS = 4


def poison(
    sent: dict[str, np.ndarray], trained: dict[str, np.ndarray], attack: str, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """What a poisoned client sends instead of its trained adapter: the update scaled by 1e6, its opposite, or noise
    as long."""
    delta = {k: trained[k] - sent[k] for k in sent}
    if attack == "scale":
        return {k: sent[k] + 1e6 * d for k, d in delta.items()}
    if attack == "sign_flip":
        return {k: sent[k] - d for k, d in delta.items()}
    noise = {k: rng.standard_normal(d.shape).astype(np.float32) for k, d in delta.items()}
    scale = np.sqrt(sum(np.sum(d**2) for d in delta.values()) / sum(np.sum(n**2) for n in noise.values()))
    return {k: sent[k] + scale * n for k, n in noise.items()}


def poisoned_client_app(attack: str, partitions: set[int], seed: int = 0) -> ClientApp:
    """The real ClientApp's handlers, with the train replies of `partitions` poisoned (after any honest clipping)."""
    rng = np.random.default_rng(seed)

    def attack_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        if (
            msg.metadata.message_type != MessageType.TRAIN
            or int(ctxt.node_config["partition-id"]) not in partitions
            or reply.has_error()
        ):
            return reply
        sent = {k: v.numpy() for k, v in decode(msg.content["arrays"]).items()}
        trained = {k: v.numpy() for k, v in decode(reply.content["arrays"]).items()}
        wire = next(iter(reply.content["arrays"].values())).numpy().dtype
        dtype = next(name for name, d in WIRE_DTYPES.items() if d == wire)
        reply.content["arrays"] = encode(poison(sent, trained, attack, rng), dtype)
        return reply

    app = ClientApp()
    app.query()(client_module.query)
    # as the real app's, the attack inside SecAgg+
    app.train(mods=[secagg_mod, attack_mod, dp_clipping_mod])(client_module.train)
    app.evaluate()(client_module.evaluate)
    return app


def run(overrides: str, client: ClientApp, out: Path, clients_per_domain: int) -> dict:
    """One in-process run of the demo; its summary, plus the held-out accuracy of the last round and the final
    epsilon."""
    folder = Path(tempfile.mkdtemp(dir=out))
    t0 = time.time()
    run_in_process(
        server_app,
        client,
        f"dataset.clients_per_domain={clients_per_domain} output_dir={folder} {overrides}",
        DOMAINS * clients_per_domain,
    )
    [path] = folder.glob("*/summary.json")
    summary = json.loads(path.read_text())
    rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    summary["last_held_out"] = rows[-1][f"acc/{summary['held_out']}"]
    logging.getLogger("benchmark").warning(
        "%.0f s: %s -> held-out %.2f, personalization %.2f",
        time.time() - t0,
        overrides,
        100 * summary["generalization"][summary["held_out"]],
        100 * summary["personalization_mean"],
    )
    return summary


def pct(values: list[float]) -> str:
    values = [100 * v for v in values]
    return f"{values[0]:.2f}" if len(values) == 1 else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


RULES = {  # name in the table -> overrides; f = 2 attackers tolerated where the rule allows it with 9 clients
    "mean, no screening": "strategy.max_norm_ratio=null",
    "mean (default screening)": "",
    "median": "strategy.aggregation=median strategy.num_malicious=2",
    "trimmed_mean (f=2)": "strategy.aggregation=trimmed_mean strategy.num_malicious=2",
    "krum (f=2)": "strategy.aggregation=krum strategy.num_malicious=2",
    "multikrum (f=2)": "strategy.aggregation=multikrum strategy.num_malicious=2",
    "bulyan (f=1: 4f+3 <= 9)": "strategy.aggregation=bulyan strategy.num_malicious=1",
    "mean with SecAgg+ (no update is seen: no screening)": "strategy.secagg.enabled=true",
}


def attacks_table(args: argparse.Namespace) -> None:
    """Each rule's clean run, then 1 and 2 poisoned clients under each attack; means over --seeds."""
    honest = client_module.app
    print(
        f"| rule | attackers | attack | held-out sketch (best round) | personalization | held-out, "
        f"round {args.rounds} |"
    )
    print("|---|---|---|---|---|---|")
    for name, rule in RULES.items():
        if args.rules and not any(name.startswith(r) for r in args.rules):
            continue
        base = [f"training.rounds={args.rounds} seed={seed} {rule}" for seed in args.seeds]
        clean = [run(b, honest, args.out, args.clients_per_domain) for b in base]
        print(f"| {name} | 0 | - | {pct(held(clean))} | {pct(pers(clean))} | {pct(last(clean))} |", flush=True)
        for count in args.attackers:
            for attack in ATTACKS:  # photo#0, then photo#0 and photo#1
                runs = [
                    run(b, poisoned_client_app(attack, set(range(count)), seed), args.out, args.clients_per_domain)
                    for b, seed in zip(base, args.seeds)
                ]
                print(
                    f"| {name} | {count} | {attack} | {pct(held(runs))} ({diff(held(runs), held(clean))}) | "
                    f"{pct(pers(runs))} ({diff(pers(runs), pers(clean))}) | {pct(last(runs))} |",
                    flush=True,
                )


def held(runs: list[dict]) -> list[float]:
    return [s["generalization"]["sketch"] for s in runs]


def pers(runs: list[dict]) -> list[float]:
    return [s["personalization_mean"] for s in runs]


def last(runs: list[dict]) -> list[float]:
    return [s["last_held_out"] for s in runs]


def diff(values: list[float], clean: list[float]) -> str:
    """The difference of the means, in points."""
    return f"{100 * (statistics.mean(values) - statistics.mean(clean)):+.2f}"


def seeds_row(label: str, overrides: str, args: argparse.Namespace, extra=lambda s: "") -> None:
    runs = [
        run(
            f"training.rounds={args.rounds} seed={seed} {overrides}",
            client_module.app,
            args.out,
            args.clients_per_domain,
        )
        for seed in args.seeds
    ]
    print(f"| {label} | {pct(held(runs))} | {pct(pers(runs))} | {extra(runs)} |", flush=True)


def dp_table(args: argparse.Namespace) -> None:
    print(
        f"| central DP (server-side fixed clipping, clip {args.clip}) | held-out sketch | personalization | epsilon "
        f"after {args.rounds} rounds (delta 1e-5) |"
    )
    print("|---|---|---|---|")  # without DP: the float32 row of the dtype table (the same runs)
    for z in args.noise:
        seeds_row(
            f"noise multiplier {z}",
            f"strategy.dp.side=server strategy.dp.noise_multiplier={z} strategy.dp.clipping_norm={args.clip}",
            args,
            lambda runs: f"{runs[0]['dp']['epsilon']:.1f}",
        )


def dtype_table(args: argparse.Namespace) -> None:
    print("| transport | held-out sketch | personalization | bytes down + up per training client per round |")
    print("|---|---|---|---|")
    for dtype in ("float32", "float16", "bfloat16"):
        seeds_row(
            dtype, f"strategy.transport_dtype={dtype}", args, lambda runs: f"{runs[0]['bytes_per_client_per_round']:,}"
        )


def bytes_table(args: argparse.Namespace) -> None:
    """Bytes on the messages with ViT-B/32's adapter and PromptFL context: a CLIP with 1-layer towers and ViT-B/32's
    512-dim projection, 512-wide text tower and 77 text positions (PromptFL: 16 random context vectors)."""
    work = Path(tempfile.mkdtemp(dir=args.out))
    clip = save_tiny_clip(work / "clip", projection_dim=512, text_width=512, text_positions=77)
    data = write_image_folder(work / "data")
    promptfl = "method=promptfl method.init=random method.n_ctx=16"
    print("| transport | bytes down per training client per round | up | down + up |")
    print("|---|---|---|---|")
    for label, extra in (
        ("float32", ""),
        ("float16", "strategy.transport_dtype=float16"),
        ("bfloat16", "strategy.transport_dtype=bfloat16"),
        ("float32, SecAgg+", "strategy.secagg.enabled=true"),
        ("float16, SecAgg+", "strategy.transport_dtype=float16 strategy.secagg.enabled=true"),
        ("PromptFL, float32", promptfl),
        ("PromptFL, float16", f"{promptfl} strategy.transport_dtype=float16"),
        ("PromptFL, float32, SecAgg+", f"{promptfl} strategy.secagg.enabled=true"),
    ):
        if args.rules and not any(label.lower().startswith(r.lower()) for r in args.rules):
            continue
        s = run(
            f"dataset=folder dataset.root={data} dataset.held_out=sketch model.name_or_path={clip} "
            f"training.rounds={args.rounds} "
            f"training.batch_size=8 cache_dir={work / 'cache'} {extra}",
            client_module.app,
            args.out,
            1,
        )
        print(
            f"| {label} | {s['bytes_down_per_client_per_round']:,} | {s['bytes_up_per_client_per_round']:,} | "
            f"{s['bytes_per_client_per_round']:,} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=("attacks", "dp", "dtype", "bytes"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument(
        "--attackers", type=int, nargs="+", default=[1, 2], help="attacks table: numbers of poisoned clients"
    )
    parser.add_argument(
        "--rules",
        nargs="+",
        default=None,
        help="attacks table: only the rules whose name starts so; bytes table: only the rows (default: all)",
    )
    parser.add_argument("--clients-per-domain", type=int, default=3, help="3: 9 training clients; 1: the default demo")
    parser.add_argument("--out", type=Path, default=Path("outputs/trust"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)  # the apps' per-round INFO lines would drown the tables
    {"attacks": attacks_table, "dp": dp_table, "dtype": dtype_table, "bytes": bytes_table}[args.table](args)


if __name__ == "__main__":
    main()
