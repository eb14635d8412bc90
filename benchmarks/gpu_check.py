"""GPU check: the whole FedCLIP federation on one machine with a ViT-B/32-sized CLIP on PACS-sized data.

Builds (benchmarks/synthetic.py) a synthetic folder with PACS's shape (art_painting 2048, cartoon 2344, photo 1670,
sketch 3929 images; 7 classes; 224 px JPEGs) and a CLIP with ViT-B/32's sizes
(`transformers.CLIPConfig()` defaults, random weights: the same cost as the real one, chance
accuracy), then runs the app exactly as a deployment does: one `flower-superlink`, one
`flower-supernode` per domain (node config `domain=... device=...`) and `flwr run` against
them. Flower's deployment engine, not its Ray simulation: this needs no Ray.

Everything is local and INSECURE on purpose (plain gRPC on 127.0.0.1, no TLS, no node
authentication): it measures speed on one machine, it is not a deployment recipe.

    python benchmarks/gpu_check.py --out /tmp/gpucheck                   # GPU, full sizes, 20 rounds
    python benchmarks/gpu_check.py --preset tiny --scale 0.05 --rounds 3 --device cpu --out /tmp/gc

Prints the per-round table of the run, then images/s of the one-off feature encoding (as the
clients saw it, and the model alone), seconds per round, held-out accuracy and wall time, and
writes gpu_check.json, metrics.csv, summary.json and the logs of every process to --out.
Every wait has a timeout; whatever it started is stopped on exit, also on failure or deadline
(rounds finished by then are still reported).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project's modules come from this checkout

from benchmarks.deployment import LocalDeployment  # noqa: E402 - needs the checkout on sys.path
from benchmarks.preprocessing import image_set, preprocessing_rates  # noqa: E402
from benchmarks.synthetic import PACS_CLASSES, PACS_DOMAINS, PRESETS, log, make_clip, make_dataset  # noqa: E402

HELD_OUT = "sketch"
ENCODED = re.compile(r"\[(\w+)\] encoded (\d+)/(\d+) images \((\d+) images/s\)")


# ----------------------------------------------------------------------------- preprocessing and the encoder, in
# this process
# Like everything heavy here, torch and the app's modules are imported inside the functions: make_dataset's workers
# fork before torch is loaded.


def measure_preprocessing(model_dir: Path, root: Path, n: int, device: str) -> dict[str, float]:
    """Images/s from JPEG files to pixel tensors on the device in one process: the app's `image_batches` (decoding in
    threads, torchvision preprocessing on the device; "after") and one thread decoding with PIL, preprocessing on the
    CPU ("before", the app until it decoded in parallel)."""
    import torch
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(model_dir)
    rates = preprocessing_rates(processor, image_set(root / "photo", n), 256, torch.device(device), repeats=1)
    log(
        f"preprocessing ({type(processor.image_processor).__name__}, {torch.get_num_threads()} "
        f"threads): {rates['after']:.0f} images/s "
        f"in one process, {rates['before']:.0f} decoding in one thread ({n} images)"
    )
    return rates


def measure_model(model_dir: Path, device: str, dtype: str, batch: int, seconds: float = 2.0) -> float:
    """Images/s of the frozen image encoder alone (random pixels already on the device), timed for about `seconds`."""
    import torch

    from common.model import load_clip

    model, _ = load_clip(str(model_dir), torch.device(device), getattr(torch, dtype))
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        model.get_image_features(pixel_values=pixels)  # warm-up
        sync()
        t0, batches = time.perf_counter(), 0
        while batches < 3 or time.perf_counter() - t0 < seconds:
            model.get_image_features(pixel_values=pixels)
            batches += 1
            if batches % 10 == 0 or batches <= 3:
                sync()
        sync()
    rate = batch * batches / (time.perf_counter() - t0)
    log(f"image encoder alone: {rate:.0f} images/s ({dtype}, batch {batch}, {batches} batches, {device})")
    del model, pixels
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rate


# ----------------------------------------------------------------------------- results


def encode_rates(node_logs: list[Path]) -> dict[str, dict]:
    """Per domain: images and the final images/s the client logged while encoding its features once."""
    rates = {}
    for path in node_logs:
        for m in ENCODED.finditer(path.read_text(errors="replace")):
            domain, done, total, rate = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
            if done == total:
                rates[domain] = {"images": total, "images_per_s": rate, "seconds": total / max(rate, 1)}
    return rates


def read_rows(run_dir: Path | None) -> list[dict]:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return []
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="vit-b32", help="CLIP sizes (tiny: for CPU trials)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of PACS's images per domain (1.0 = 9,991)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10, help="each round spawns 2 app processes per node: ~10-20 s")
    parser.add_argument("--device", default=None, help="cuda:0 if CUDA is available, else cpu")
    parser.add_argument("--dtype", default=None, help="feature extraction precision; bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--encode-batch-size", type=int, default=256)
    parser.add_argument(
        "--out", type=Path, required=True, help="results and logs (flat: gpu_check.json, metrics.csv, ...)"
    )
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/fedclip-gpu-check"), help="dataset, model, caches, Flower homes"
    )
    parser.add_argument(
        "--base-port", type=int, default=19091, help=f"this and the next {3 + len(PACS_DOMAINS) - 1} ports"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes generating the images")
    parser.add_argument("--deadline", type=float, default=450, help="seconds from start after which the run is stopped")
    parser.add_argument("--startup-timeout", type=float, default=60, help="seconds for the SuperLink to listen")
    parser.add_argument(
        "--round-timeout", type=float, default=300, help="the app's wait for replies (query, train, evaluate)"
    )
    args = parser.parse_args()

    t_start = time.time()
    # so that a stop from outside still stops the Flower processes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out, work = args.out.resolve(), args.work.resolve()
    if " " in str(work):
        raise SystemExit(
            f"--work {work} contains a space: the run's overrides are space separated; choose another folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    domains = list(PACS_DOMAINS)
    deployment = LocalDeployment(work, len(domains), args.base_port)  # checks its ports are free, before any slow step
    root, model_dir = work / "data", work / f"clip-{args.preset}"
    # first: its workers fork before torch is loaded
    counts = make_dataset(root, args.scale, args.image_size, args.workers)

    import flwr
    import torch
    import transformers

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "none"
    log(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"flwr {flwr.__version__}; device {device} ({gpu}), dtype {dtype}; {os.cpu_count()} "
        f"CPUs, {torch.get_num_threads()} torch threads"
    )

    result: dict = {
        "preset": args.preset,
        "device": device,
        "gpu": gpu,
        "dtype": dtype,
        "rounds_asked": args.rounds,
        "cpus": os.cpu_count(),
        "scale": args.scale,
        "complete": False,
    }
    result["images"] = sum(counts.values())
    result["clip_parameters"] = make_clip(model_dir, args.preset)
    preprocessing = measure_preprocessing(model_dir, root, min(1024, counts["photo"]), device)
    result["preprocess_images_per_s_one_process"] = preprocessing["after"]
    result["preprocess_images_per_s_one_thread_before"] = preprocessing["before"]
    result["encoder_images_per_s_model_only"] = measure_model(model_dir, device, dtype, args.encode_batch_size)

    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLIP_")}  # the overrides below say where
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    for stale in ("cache", "flwr", "outputs", "logs"):  # features are encoded afresh: that is what is measured
        shutil.rmtree(work / stale, ignore_errors=True)
    run_dir, code = None, None
    try:
        threads = max(1, (os.cpu_count() or 1) // len(domains))  # four clients share this machine's cores
        deployment.start(
            env, [f"domain='{d}' device='{device}' cpu-threads={threads}" for d in domains], args.startup_timeout
        )
        overrides = " ".join(
            [
                "dataset=folder",
                f"dataset.root={root}",
                f"dataset.domains=[{','.join(domains)}]",
                f"dataset.held_out={HELD_OUT}",
                f"model.name_or_path={model_dir}",
                f"model.dtype={dtype}",
                f"model.encode_batch_size={args.encode_batch_size}",
                f"training.rounds={args.rounds}",
                f"strategy.round_timeout={args.round_timeout:.0f}",
                f"cache_dir={work / 'cache'}",
                f"output_dir={work / 'outputs'}",
            ]
        )
        log(f"flwr run with overrides: {overrides}")
        t_run = time.time()
        code = deployment.run(
            REPO, f'overrides="{overrides}"', work / "logs" / "flwr_run.log", args.deadline - (time.time() - t_start)
        )
        result["flwr_run_seconds"] = round(time.time() - t_run, 1)
    except Exception as err:  # reported below with what was measured so far; the logs say more
        log(f"FAILED: {type(err).__name__}: {err}")
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        deployment.stop()
        runs = sorted((work / "outputs").glob("*/metrics.jsonl"))  # the run folder the ServerApp made, if any
        run_dir = runs[-1].parent if runs else None

    # results, also from a run stopped at the deadline or failed (metrics.jsonl is written every round)
    rows = read_rows(run_dir)
    rates = encode_rates(deployment.node_logs())
    result["encode_per_domain"] = rates
    if rates:  # the clients encode concurrently: the slowest one bounds the wall time
        result["encode_images_per_s"] = round(
            sum(r["images"] for r in rates.values()) / max(r["seconds"] for r in rates.values())
        )
    trained = [r for r in rows if r["round"] >= 1]
    timed = [r["seconds"] for r in trained if r["round"] >= 2] or [r["seconds"] for r in trained]
    result["rounds_done"] = len(trained)
    result["seconds_per_round"] = round(sum(timed) / len(timed), 3) if timed else None
    result["round_seconds"] = [round(r["seconds"], 3) for r in rows]
    summary_path = run_dir / "summary.json" if run_dir else None
    if summary_path and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        result["summary"] = summary
        shutil.copy(summary_path, out / "summary.json")
    if run_dir and (run_dir / "metrics.csv").is_file():
        shutil.copy(run_dir / "metrics.csv", out / "metrics.csv")
    held = [r.get(f"acc/{HELD_OUT}") for r in rows]
    result["held_out_acc_zero_shot"] = held[0] if held else None
    result["held_out_acc_last"] = held[-1] if len(held) > 1 else None
    result["complete"] = code == 0 and len(trained) == args.rounds and "error" not in result
    result["flwr_run_exit_code"] = code
    result["total_seconds"] = round(time.time() - t_start, 1)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    for name in ("superlink.log", "flwr_run.log"):
        if (work / "logs" / name).is_file():
            shutil.copy(work / "logs" / name, out / name)
    with open(out / "supernodes.log", "w") as fh:  # one file: only 8 files come back from the GPU machine
        for path in deployment.node_logs():
            fh.write(f"===== {path.name}\n{path.read_text(errors='replace')}\n")

    print("\nper-domain encoding (one-off, all four clients at once):")
    for domain, r in sorted(rates.items()):
        print(f"  {domain:>12}: {r['images']:5d} images, {r['images_per_s']:6d} images/s, {r['seconds']:.1f} s")
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    status = "complete" if result["complete"] else f"INCOMPLETE ({result.get('error') or f'exit {code}'})"
    print(
        f"GPU CHECK [{status}] on {gpu} ({device}), {args.preset} CLIP, {result['images']:,} images "
        f"of {args.image_size} px:\n"
        f"  encode {result.get('encode_images_per_s', '-')} images/s in the app ({dtype}; encoder alone "
        f"{result['encoder_images_per_s_model_only']:.0f}, "
        f"preprocessing {result['preprocess_images_per_s_one_process']:.0f}/process)\n"
        f"  {result['seconds_per_round'] if result['seconds_per_round'] is not None else '-'} s/round "
        f"(mean of rounds {'2' if len(trained) > 1 else '1'}..{len(trained)}; {len(trained)}/{args.rounds} rounds "
        f"done)\n"
        f"  held-out {HELD_OUT} acc {fmt(result['held_out_acc_zero_shot'])} zero-shot "
        f"-> {fmt(result['held_out_acc_last'])} "
        f"last round (random weights: chance is {100 / len(PACS_CLASSES):.1f}%)\n"
        f"  flwr run {result.get('flwr_run_seconds', '-')} s, total {result['total_seconds']} s; results in {out}"
    )
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
