"""Seconds per round of FedCLIP against Flower's floor, on the same federation, machine and run.

    flock /tmp/fedclip-flwr.lock python -m benchmarks.round_overhead --sizes 4,100,1000,1000@0.1 --deployment
    flock /tmp/fedclip-flwr.lock python -m benchmarks.round_overhead --sizes 4 --rounds 3      # a quick look

For each setting it runs, back to back, Flower's floor (benchmarks/noop_app.py: the same messages,
no work) in its one-exchange form (train and evaluate messages pushed together, as FedCLIP's fused
round does) and its two-exchange form (train, then evaluate), then FedCLIP, and reports the mean
seconds per round of rounds 2..R-1 (FedCLIP's: the `seconds` column of its metrics.csv; the floor's:
measured the same way, from the round's first push to its last reply) and their ratio.

- Simulation (`flwr run`, Ray, through benchmarks/sweep.py's flwr_run) at each `--sizes` entry:
  N clients, 4 domains of N/4 clients each (sketch held out); `N@F` samples a fraction F of the
  training clients per round for training and for evaluation (strategy.fraction_train /
  strategy.fraction_evaluate; the held-out clients are always evaluated).
- `--deployment`: a real SuperLink and 4 SuperNodes (benchmarks/deployment.py, insecure, localhost).

The data is a synthetic folder built here (outside the repo, under --work): 4 domains x 10 classes,
--images-per-client 32 px PNGs per client; the CLIP is the demo's (built on first use in the
FedCLIP cache), so the adapter, and the floor's ArrayRecord, is 2*(64*64+64) float32 (33 KiB).
Writes round_overhead.json and round_overhead.csv to --out and prints the table with the load
average (the machine may be shared: compare ratios, which are measured back to back). With every run it
samples the peak memory (VmHWM, once a second) of the server's process (flwr-simulation, where the
ServerApp runs) and of each Ray client actor, and FedCLIP's discovery seconds (its summary.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.deployment import LocalDeployment
from benchmarks.sweep import REPO, flwr_run
from common.config import load_config
from common.demo import DIGIT_NAMES
from common.model import model_name_or_path

try:
    from server_app.federation import POLL_SECONDS
except ImportError:  # a checkout from before server_app/federation.py (run against older commits)
    from server_app.app import POLL_SECONDS

DOMAINS = ["cartoon", "painting", "photo", "sketch"]  # the demo's names, so the demo CLIP's tokenizer knows them
HELD_OUT = "sketch"
# the floor polls for replies as the app does: a fixed interval, or (first wait, longest wait) doubling in between
POLL = POLL_SECONDS if isinstance(POLL_SECONDS, tuple) else (POLL_SECONDS, POLL_SECONDS)
NOOP_MODULE = REPO / "benchmarks" / "noop_app.py"
NOOP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedclip-noop"
version = "1.0.0"
description = "Flower's floor for FedCLIP's rounds: the same messages, no work (benchmarks/round_overhead.py)"
license = "MIT"
dependencies = ["flwr[simulation]==1.28.0", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedclip"

[tool.flwr.app.components]
serverapp = "noop_app:server"
clientapp = "noop_app:client"

[tool.flwr.app.config]
rounds = 5
exchanges = 1
adapter-dim = 64
domains = "cartoon,painting,photo,sketch"
clients-per-domain = 1
held-out = "sketch"
fraction-train = 1.0
fraction-evaluate = 1.0
min-train-nodes = 1
poll-first = 0.2
poll-max = 0.2
timeout = 600
seed = 0
out = ""
"""


def load_average() -> float:
    return os.getloadavg()[0]


def make_folder(root: Path, clients: int, images_per_client: int) -> Path:
    """ROOT/<domain>/<class>/<i>.png: 4 domains, 10 classes, images_per_client * clients / 4 small PNGs per domain."""
    spec = {"clients": clients, "images_per_client": images_per_client, "size": 32, "version": 1}
    marker = root / ".round_overhead.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    per_domain = images_per_client * clients // len(DOMAINS)
    for d, domain in enumerate(DOMAINS):
        for c, name in enumerate(DIGIT_NAMES):
            (root / domain / name).mkdir(parents=True)
            tint = np.array([(c * 37 + d * 11) % 256, (c * 91) % 256, (c * 157 + d * 53) % 256], np.float32)
            for i in range(per_domain // len(DIGIT_NAMES) + (c < per_domain % len(DIGIT_NAMES))):
                pixels = np.clip(tint * 0.6 + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / domain / name / f"{i:05d}.png")
    marker.write_text(json.dumps(spec))
    return root


def noop_app(folder: Path) -> Path:
    """A Flower app folder holding benchmarks/noop_app.py and its pyproject.toml (a FAB ships .py and .toml files)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(NOOP_MODULE, folder / "noop_app.py")
    (folder / "pyproject.toml").write_text(NOOP_PYPROJECT)
    return folder


def noop_run_config(
    rounds: int, exchanges: int, adapter_dim: int, clients_per_domain: int, fraction: float, out: Path
) -> str:
    return (
        f'rounds={rounds} exchanges={exchanges} adapter-dim={adapter_dim} domains="{",".join(DOMAINS)}" '
        f'clients-per-domain={clients_per_domain} held-out="{HELD_OUT}" fraction-train={fraction} '
        f"fraction-evaluate={fraction} "
        f'poll-first={POLL[0]} poll-max={POLL[1]} seed=0 out="{out}"'
    )


def fedclip_overrides(
    root: Path, clients_per_domain: int, fraction: float, rounds: int, model: str, cache: Path
) -> str:
    overrides = (
        f"dataset=folder dataset.root={root} dataset.domains=[{','.join(DOMAINS)}] dataset.held_out={HELD_OUT} "
        f"dataset.clients_per_domain={clients_per_domain} model.name_or_path={model} cache_dir={cache} "
        f"training.rounds={rounds} cpu_threads=1"
    )
    if fraction < 1:
        overrides += f" strategy.fraction_train={fraction} strategy.fraction_evaluate={fraction}"
    return overrides


def steady_rounds(seconds: list[float]) -> float | None:
    """Mean seconds of rounds 2..R-1: round 1 warms up (imports, actors, caches) and, in the fused round, the
    last round also carries the run's final evaluation-only exchange, paid once per run, not per round."""
    steady = seconds[1:-1] if len(seconds) > 2 else seconds[1:]
    return sum(steady) / len(steady) if steady else None


def noop_seconds(out: Path) -> list[float]:
    return json.loads(out.read_text())["round_seconds"] if out.is_file() else []


def fedclip_seconds(outputs: Path, rounds: int) -> tuple[list[float], Path | None]:
    """Seconds of rounds 1..rounds from the run folder's metrics.jsonl (round 0, zero-shot, is left out)."""
    runs = sorted(outputs.glob("*/metrics.jsonl"))
    if not runs:
        return [], None
    rows = [json.loads(line) for line in runs[-1].read_text().splitlines() if line.strip()]
    return [float(r["seconds"]) for r in rows if 1 <= r["round"] <= rounds], runs[-1].parent


class PeakMemory:
    """Peak resident memory (VmHWM) of a run's processes, sampled once a second from /proc while it runs: the server
    (`flwr-simulation`, whose process runs the ServerApp) and each Ray client actor (`ray::ClientAppActor`)."""

    ROLES = {"server": "flwr-simulation", "actor": "ray::ClientAppActor"}

    def __init__(self, every: float = 1.0) -> None:
        self.every, self.peaks = every, {}  # pid -> (role, MiB)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _sample(self) -> None:
        while not self.stop.wait(self.every):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    role = next((r for r, name in self.ROLES.items() if name in command), None)
                    if role is None:
                        continue
                    status = (proc / "status").read_text()
                except OSError:  # it ended meanwhile
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        mib = int(line.split()[1]) / 1024
                        self.peaks[proc.name] = (role, max(mib, self.peaks.get(proc.name, (role, 0))[1]))

    def figures(self, key: str) -> dict:
        """The run's peaks: the server's, the largest actor's, and how many actors ran."""
        actors = [mib for role, mib in self.peaks.values() if role == "actor"]
        server = [mib for role, mib in self.peaks.values() if role == "server"]
        return {
            f"{key}_server_peak_mib": round(max(server), 1) if server else None,
            f"{key}_actor_peak_mib": round(max(actors), 1) if actors else None,
            f"{key}_actors": len(actors),
        }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work, self.out = args.work.resolve(), args.out.resolve()
        self.cfg = load_config()
        self.model = model_name_or_path(self.cfg)  # builds the demo CLIP on first use (FEDCLIP_CACHE)
        self.adapter_dim = int(json.loads((Path(self.model) / "config.json").read_text())["projection_dim"])
        self.rows: list[dict] = []
        # the code measured, as it started
        self.commit = (
            _git("rev-parse", "HEAD"),
            _git("rev-parse", "--abbrev-ref", "HEAD"),
        )

    def setting(self, mode: str, clients: int, fraction: float) -> dict:
        # no '@': Flower's database path is a URL
        name = f"{mode}-{clients}" + (f"-sampled{fraction:g}" if fraction < 1 else "")
        folder = self.work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        root = make_folder(self.work / "data" / f"clients{clients}", clients, self.args.images_per_client)
        k = clients // len(DOMAINS)
        rounds = self.args.rounds if mode == "simulation" else self.args.deployment_rounds
        row = {
            "setting": name,
            "mode": mode,
            "clients": clients,
            "fraction": fraction,
            "rounds": rounds,
            "load_before": round(load_average(), 2),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        print(
            f"\n== {name}: {clients} clients ({k} per domain, {HELD_OUT} held out), fraction {fraction:g}, {rounds} "
            f"rounds; "
            f"load average {row['load_before']:.2f}",
            flush=True,
        )
        t0 = time.time()
        overrides = fedclip_overrides(root, k, fraction, rounds, self.model, self.work / "cache")
        overrides = f"{overrides} {self.args.overrides}".strip()
        runs = [(f"floor_{e}x", lambda f, e=e: self.noop(mode, clients, k, fraction, rounds, e, f)) for e in (1, 2)]
        runs.append(("fedclip", lambda f: self.fedclip(mode, clients, overrides, rounds, f)))
        for key, run in runs:
            t_run = time.time()
            with PeakMemory() as memory:
                seconds, code, detail = run(folder / key)
            if (
                not seconds and code != 124
            ):  # measured nothing, not for lack of time (a failure the log did not name): once more
                print(f"   {key}: no round measured (exit {code}; log {folder / key}); running it again", flush=True)
                shutil.move(folder / key, folder / f"{key}-failed")
                with PeakMemory() as memory:
                    seconds, code, detail = run(folder / key)
            row.update(memory.figures(key))
            row[f"{key}_seconds"] = [round(s, 4) for s in seconds]
            row[f"{key}_s_per_round"] = steady_rounds(seconds)
            row[f"{key}_exit_code"] = code
            row[f"{key}_wall_s"] = round(time.time() - t_run, 1)
            row.update(detail)
            per_round = "-" if row[f"{key}_s_per_round"] is None else f"{row[f'{key}_s_per_round']:.3f}"
            print(
                f"   {key}: {per_round} s/round in rounds 2..R-1 (rounds: {', '.join(f'{s:.2f}' for s in seconds)}); "
                f"exit {code}; {row[f'{key}_wall_s']:.0f} s",
                flush=True,
            )
        for e in (1, 2):
            floor, app = row[f"floor_{e}x_s_per_round"], row["fedclip_s_per_round"]
            row[f"ratio_{e}x"] = app / floor if app and floor else None
        row["load_after"] = round(load_average(), 2)
        row["wall_s"] = round(time.time() - t0, 1)
        self.rows.append(row)
        self.write()
        return row

    def noop(self, mode: str, clients: int, k: int, fraction: float, rounds: int, exchanges: int, folder: Path):
        app = noop_app(self.work / "noop-app")
        out = folder.parent / f"{folder.name}.json"  # outside `folder`: flwr_run wants an empty one
        out.unlink(missing_ok=True)
        run_config = noop_run_config(rounds, exchanges, self.adapter_dim, k, fraction, out)
        if mode == "simulation":
            code, _ = flwr_run(
                folder,
                num_supernodes=clients,
                client_cpus=self.args.client_cpus,
                timeout=self.args.run_timeout,
                app=app,
                run_config=run_config,
            )
        else:
            folder.mkdir(parents=True)
            code = self.deployment.run(app, run_config, folder / "flwr.log", self.args.run_timeout, echo=False)
        return noop_seconds(out), code, {}

    def fedclip(self, mode: str, clients: int, overrides: str, rounds: int, folder: Path):
        if mode == "simulation":
            code, _ = flwr_run(
                folder,
                overrides,
                num_supernodes=clients,
                client_cpus=self.args.client_cpus,
                env={"HF_HUB_OFFLINE": "1"},
                timeout=self.args.run_timeout,
            )
        else:
            folder.mkdir(parents=True)
            code = self.deployment.run(
                REPO,
                f'overrides="{overrides} output_dir={folder}"',
                folder / "flwr.log",
                self.args.run_timeout,
                echo=False,
            )
        seconds, run_dir = fedclip_seconds(folder, rounds)
        summary = run_dir / "summary.json" if run_dir else None
        discovery = json.loads(summary.read_text()).get("discovery_seconds") if summary and summary.is_file() else None
        return seconds, code, {"fedclip_run_folder": str(run_dir) if run_dir else None, "discovery_s": discovery}

    def deployed(self, clients: int, warm: bool = False) -> dict:
        """The deployment setting: one SuperLink and a SuperNode per domain, shared by the three runs;
        warm: each SuperNode's messages handled by one `fedclip-clientapp` process (gate/warm.py)."""
        self.deployment = LocalDeployment(self.work / "deployment", clients, warm=warm)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLIP_")}  # the overrides say where
        env.update(HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # the apps run from the FAB `flwr run` ships
        shutil.rmtree(self.work / "deployment", ignore_errors=True)
        try:
            self.deployment.start(env, [f"domain='{d}' device='cpu' cpu-threads=1" for d in DOMAINS])
            return self.setting("deployment-warm" if warm else "deployment", clients, 1.0)
        finally:
            self.deployment.stop()

    def write(self) -> None:
        meta = {
            "flwr": _version("flwr"),
            "git_commit": self.commit[0],
            "git_branch": self.commit[1],
            "cpus": os.cpu_count(),
            "adapter_dim": self.adapter_dim,
            "adapter_parameters": 2 * (self.adapter_dim**2 + self.adapter_dim),
            "images_per_client": self.args.images_per_client,
            "client_cpus": self.args.client_cpus,
            "poll_seconds": POLL,
            "command": " ".join(sys.argv),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "round_overhead.json").write_text(json.dumps({**meta, "settings": self.rows}, indent=2) + "\n")
        columns = [
            "setting",
            "mode",
            "clients",
            "fraction",
            "rounds",
            "floor_1x_s_per_round",
            "floor_2x_s_per_round",
            "fedclip_s_per_round",
            "ratio_1x",
            "ratio_2x",
            "load_before",
            "load_after",
            "wall_s",
        ]
        with open(self.out / "round_overhead.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def table(rows: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "| setting | clients | per round | floor s/round (1 exchange) | floor s/round (2 exchanges) | FedCLIP "
        "s/round | "
        "FedCLIP / floor (1) | FedCLIP / floor (2) | load avg |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sampled = "all" if r["fraction"] >= 1 else f"{r['fraction']:.0%} sampled"
        lines.append(
            f"| {r['mode']} | {r['clients']:,} | {sampled} | {fmt(r['floor_1x_s_per_round'], '.3f')} | "
            f"{fmt(r['floor_2x_s_per_round'], '.3f')} | {fmt(r['fedclip_s_per_round'], '.3f')} "
            f"| {fmt(r['ratio_1x'], '.2f')}x | "
            f"{fmt(r['ratio_2x'], '.2f')}x | {r['load_before']:.1f} -> {r['load_after']:.1f} |"
        )
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    """Discovery seconds and peak memory (MiB) of the floor's one-exchange run and FedCLIP's, per setting."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "| setting | clients | per round | FedCLIP discovery s | server peak MiB (floor / FedCLIP) "
        "| largest actor peak MiB (floor / FedCLIP) | actors |",
        "|---|---:|---|---:|---|---|---:|",
    ]
    for r in rows:
        sampled = "all" if r["fraction"] >= 1 else f"{r['fraction']:.0%} sampled"
        lines.append(
            f"| {r['mode']} | {r['clients']:,} | {sampled} | {fmt(r.get('discovery_s'), '.1f')} | "
            f"{fmt(r.get('floor_1x_server_peak_mib'), '.0f')} / {fmt(r.get('fedclip_server_peak_mib'), '.0f')} | "
            f"{fmt(r.get('floor_1x_actor_peak_mib'), '.0f')} / {fmt(r.get('fedclip_actor_peak_mib'), '.0f')} | "
            f"{r.get('fedclip_actors', 0)} |"
        )
    return "\n".join(lines)


def parse_sizes(text: str) -> list[tuple[int, float]]:
    sizes = []
    for item in filter(None, text.split(",")):
        clients, _, fraction = item.partition("@")
        n, f = int(clients), float(fraction or 1)
        if n % len(DOMAINS) or not 0 < f <= 1:
            raise argparse.ArgumentTypeError(
                f"{item!r}: clients must be a multiple of {len(DOMAINS)}, the fraction in (0, 1]"
            )
        sizes.append((n, f))
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("4,100,1000,1000@0.1"),
        help="simulation settings: clients, or clients@fraction sampled per round (empty: none)",
    )
    parser.add_argument(
        "--deployment", action="store_true", help="also a real SuperLink and 4 SuperNodes (insecure, localhost)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of each simulation run (rounds 2..R-1 are measured)"
    )
    parser.add_argument(
        "--deployment-warm",
        action="store_true",
        help="also the deployment with warm ClientApps (--isolation process + fedclip-clientapp per SuperNode)",
    )
    parser.add_argument("--deployment-rounds", type=int, default=5)
    parser.add_argument("--images-per-client", type=int, default=20)
    parser.add_argument(
        "--client-cpus", type=float, default=1, help="client-resources-num-cpus of the simulation (Ray)"
    )
    parser.add_argument(
        "--overrides",
        default="",
        help="more overrides for the FedCLIP runs, e.g. strategy.secagg.enabled=true "
        "(the floor stays one plain exchange a round)",
    )
    parser.add_argument("--run-timeout", type=float, default=3600, help="seconds one `flwr run` may take")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/fedclip-round-overhead"), help="data, feature cache, runs"
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "outputs" / "round_overhead", help="round_overhead.json and .csv"
    )
    args = parser.parse_args()
    if args.rounds < 3 or args.deployment_rounds < 3:
        parser.error("at least 3 rounds: rounds 2..R-1 are measured")

    t0 = time.time()
    bench = Bench(args)
    print(
        f"round overhead: flwr {_version('flwr')}, {os.cpu_count()} CPUs, load average {load_average():.2f}; "
        f"adapter {bench.adapter_dim}-dim ({2 * (bench.adapter_dim**2 + bench.adapter_dim):,} float32); "
        f"work {bench.work}",
        flush=True,
    )
    for clients, fraction in args.sizes:
        bench.setting("simulation", clients, fraction)
    if args.deployment:
        bench.deployed(len(DOMAINS))
    if args.deployment_warm:
        bench.deployed(len(DOMAINS), warm=True)
    print(
        f"\n{table(bench.rows)}\n\n{memory_table(bench.rows)}\n\n"
        f"seconds per round: mean of rounds 2..R-1; {args.images_per_client} images per "
        f"client; "
        f"total {time.time() - t0:.0f} s; load average now {load_average():.2f} on {os.cpu_count()} CPUs; "
        f"results: {bench.out / 'round_overhead.json'} and .csv"
    )
    return 0 if all(r["fedclip_exit_code"] == 0 and r["ratio_1x"] for r in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
