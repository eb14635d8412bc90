"""GPU check: the whole FedCLIP federation on one machine with a ViT-B/32-sized CLIP on PACS-sized data.

Builds a synthetic folder with PACS's shape (art_painting 2048, cartoon 2344, photo 1670,
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
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project's modules come from this checkout

from benchmarks.deployment import LocalDeployment  # noqa: E402 - needs the checkout on sys.path

if TYPE_CHECKING:
    import torch

    from common.data import DomainFolder

PACS_DOMAINS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}  # 9,991 images
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
HELD_OUT = "sketch"
PRESETS = {
    "vit-b32": {},  # transformers.CLIPConfig() defaults are ViT-B/32's sizes (151M parameters)
    "tiny": {  # ViT-B/32's input geometry (224 px, patch 32) and preprocessing, tiny towers: for CPU trials
        "vision_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        "text_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        "projection_dim": 64,
    },
}
ENCODED = re.compile(r"\[(\w+)\] encoded (\d+)/(\d+) images \((\d+) images/s\)")


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- synthetic PACS


def _render(job: tuple[str, int, int, int, int]) -> None:
    """One 224 px JPEG: a class-specific colored grating drawn in a domain-specific style."""
    path, domain_i, class_i, seed, size = job
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = np.pi * class_i / len(PACS_CLASSES) + rng.normal(0, 0.15)
    freq = 2 + class_i + rng.normal(0, 0.3)
    wave = np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    color = np.array([(class_i * 37) % 256, (class_i * 91) % 256, (class_i * 157) % 256], np.float32) / 255
    color = np.clip(color * rng.uniform(0.7, 1.3, 3) + 0.2, 0, 1)
    img = 0.5 + 0.4 * wave[..., None] * color
    if domain_i == 0:  # art_painting: low-frequency color blobs, brushed
        blobs = rng.uniform(-0.3, 0.3, (6, 6, 3)).astype(np.float32)
        img = img + np.kron(blobs, np.ones((size // 6 + 1, size // 6 + 1, 1), np.float32))[:size, :size]
    elif domain_i == 1:  # cartoon: flat, quantized colors
        img = np.round(img * 4) / 4
    elif domain_i == 2:  # photo: a lighting gradient and sensor noise
        img = img * (0.6 + 0.6 * x[..., None]) + rng.normal(0, 0.04, img.shape)
    else:  # sketch: dark strokes on white
        edges = np.abs(np.diff(wave, axis=0, prepend=wave[:1])) * size / (4 * freq)
        img = np.repeat(1 - np.clip(edges, 0, 1)[..., None], 3, axis=2)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, quality=90)


def make_dataset(root: Path, scale: float, size: int, workers: int) -> dict[str, int]:
    """ROOT/<domain>/<class>/<i>.jpg with PACS's domains, classes and (scaled) counts; reused if already there."""
    counts = {d: max(len(PACS_CLASSES), round(n * scale)) for d, n in PACS_DOMAINS.items()}
    spec = {"counts": counts, "classes": PACS_CLASSES, "size": size, "version": 1}
    marker = root / ".gpu_check.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        log(f"dataset: reusing {root} ({sum(counts.values()):,} images)")
        return counts
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for domain_i, (domain, n) in enumerate(counts.items()):
        for class_i, name in enumerate(PACS_CLASSES):
            (root / domain / name).mkdir(parents=True, exist_ok=True)
            per_class = n // len(PACS_CLASSES) + (class_i < n % len(PACS_CLASSES))
            jobs += [(str(root / domain / name / f"{i:05d}.jpg"), domain_i, class_i, len(jobs) + i, size) for i in range(per_class)]
    t0 = time.time()
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # nothing heavy is imported yet: fork is safe
        for _ in pool.imap_unordered(_render, jobs, chunksize=64):
            pass
    marker.write_text(json.dumps(spec))
    log(f"dataset: {len(jobs):,} JPEGs of {size} px in {time.time() - t0:.1f} s with {workers} processes -> {root}")
    return counts


# ----------------------------------------------------------------------------- the CLIP


def make_clip(folder: Path, preset: str) -> int:
    """A CLIP of the preset's sizes with random weights, saved with its processor like a hub checkpoint."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from common.demo import build_tokenizer

    marker = folder / ".gpu_check.json"
    if marker.is_file() and json.loads(marker.read_text())["preset"] == preset:
        log(f"model: reusing {folder}")
        return json.loads(marker.read_text())["parameters"]
    shutil.rmtree(folder, ignore_errors=True)
    tokenizer = build_tokenizer(["a", "picture", "of", *PACS_CLASSES])
    sizes = PRESETS[preset]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config={**sizes.get("text_config", {}), **special},
                        vision_config=sizes.get("vision_config", {}), projection_dim=sizes.get("projection_dim", 512))
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)  # defaults: 224 px
    params = sum(p.numel() for p in model.parameters())
    marker.write_text(json.dumps({"preset": preset, "parameters": params}))
    log(f"model: {preset} CLIP, {params:,} parameters, random weights -> {folder}")
    return params


# ----------------------------------------------------------------------------- preprocessing, before and after
# (benchmarks/encoding.py times these too). Like everything heavy here, torch and the app's modules are imported
# inside the functions: make_dataset's workers fork before torch is loaded.


def image_set(root: Path, n: int) -> DomainFolder:
    from common.data import DomainFolder

    paths = sorted(p for p in root.rglob("*") if p.suffix in {".png", ".jpg"})[:n]
    return DomainFolder(root.name, ["x"], paths, [0] * len(paths))


def serial_batches(processor, images: DomainFolder, batch_size: int, device: torch.device):
    """Main's image_batches until this change: one thread decodes a batch with PIL, the processor takes PIL images on the CPU."""
    for start in range(0, len(images), batch_size):
        batch = [img for i in range(start, min(start + batch_size, len(images))) if (img := images.read(i)) is not None]
        yield processor(images=batch, return_tensors="pt")["pixel_values"].to(device)


def best_rate(run, n: int, repeats: int, device: torch.device) -> float:
    """Images/s of the fastest of `repeats` calls of run() over n images."""
    import torch

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return n / best


def preprocessing_rates(processor, images: DomainFolder, batch_size: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Images/s from files to pixel tensors on the device: main's serial path (before) and image_batches (after)."""
    from common.features import image_batches

    before = best_rate(lambda: list(serial_batches(processor, images, batch_size, device)), len(images), repeats, device)
    after = best_rate(lambda: list(image_batches(processor, images, range(len(images)), batch_size, device)), len(images), repeats, device)
    return {"before": before, "after": after}


def measure_preprocessing(model_dir: Path, root: Path, n: int, device: str) -> dict[str, float]:
    """Images/s from JPEG files to pixel tensors on the device in one process: the app's `image_batches` (decoding in
    threads, torchvision preprocessing on the device; "after") and one thread decoding with PIL, preprocessing on the
    CPU ("before", the app until it decoded in parallel)."""
    import torch
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(model_dir)
    rates = preprocessing_rates(processor, image_set(root / "photo", n), 256, torch.device(device), repeats=1)
    log(f"preprocessing ({type(processor.image_processor).__name__}, {torch.get_num_threads()} threads): {rates['after']:.0f} images/s "
        f"in one process, {rates['before']:.0f} decoding in one thread ({n} images)")
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
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit-b32", help="CLIP sizes (tiny: for CPU trials)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of PACS's images per domain (1.0 = 9,991)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10, help="each round spawns 2 app processes per node: ~10-20 s")
    parser.add_argument("--device", default=None, help="cuda:0 if CUDA is available, else cpu")
    parser.add_argument("--dtype", default=None, help="feature extraction precision; bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--encode-batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True, help="results and logs (flat: gpu_check.json, metrics.csv, ...)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedclip-gpu-check"), help="dataset, model, caches, Flower homes")
    parser.add_argument("--base-port", type=int, default=19091, help=f"this and the next {3 + len(PACS_DOMAINS) - 1} ports")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes generating the images")
    parser.add_argument("--deadline", type=float, default=450, help="seconds from start after which the run is stopped")
    parser.add_argument("--startup-timeout", type=float, default=60, help="seconds for the SuperLink to listen")
    parser.add_argument("--round-timeout", type=float, default=300, help="the app's wait for replies (query, train, evaluate)")
    args = parser.parse_args()

    t_start = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that a stop from outside still stops the Flower processes
    out, work = args.out.resolve(), args.work.resolve()
    if " " in str(work):
        raise SystemExit(f"--work {work} contains a space: the run's overrides are space separated; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    domains = list(PACS_DOMAINS)
    deployment = LocalDeployment(work, len(domains), args.base_port)  # checks its ports are free, before any slow step
    root, model_dir = work / "data", work / f"clip-{args.preset}"
    counts = make_dataset(root, args.scale, args.image_size, args.workers)  # first: its workers fork before torch is loaded

    import torch
    import transformers

    import flwr

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "none"
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"flwr {flwr.__version__}; device {device} ({gpu}), dtype {dtype}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")

    result: dict = {"preset": args.preset, "device": device, "gpu": gpu, "dtype": dtype, "rounds_asked": args.rounds,
                    "cpus": os.cpu_count(), "scale": args.scale, "complete": False}
    result["images"] = sum(counts.values())
    result["clip_parameters"] = make_clip(model_dir, args.preset)
    preprocessing = measure_preprocessing(model_dir, root, min(1024, counts["photo"]), device)
    result["preprocess_images_per_s_one_process"] = preprocessing["after"]
    result["preprocess_images_per_s_one_thread_before"] = preprocessing["before"]
    result["encoder_images_per_s_model_only"] = measure_model(model_dir, device, dtype, args.encode_batch_size)

    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLIP_")}  # the overrides below say where
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for stale in ("cache", "flwr", "outputs", "logs"):  # features are encoded afresh: that is what is measured
        shutil.rmtree(work / stale, ignore_errors=True)
    run_dir, code = None, None
    try:
        threads = max(1, (os.cpu_count() or 1) // len(domains))  # four clients share this machine's cores
        deployment.start(env, [f"domain='{d}' device='{device}' cpu-threads={threads}" for d in domains], args.startup_timeout)
        overrides = " ".join([
            "dataset=folder", f"dataset.root={root}", f"dataset.domains=[{','.join(domains)}]", f"dataset.held_out={HELD_OUT}",
            f"model.name_or_path={model_dir}", f"model.dtype={dtype}", f"model.encode_batch_size={args.encode_batch_size}",
            f"training.rounds={args.rounds}", f"strategy.round_timeout={args.round_timeout:.0f}",
            f"cache_dir={work / 'cache'}", f"output_dir={work / 'outputs'}",
        ])
        log(f"flwr run with overrides: {overrides}")
        t_run = time.time()
        code = deployment.run(REPO, f'overrides="{overrides}"', work / "logs" / "flwr_run.log", args.deadline - (time.time() - t_start))
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
        result["encode_images_per_s"] = round(sum(r["images"] for r in rates.values()) / max(r["seconds"] for r in rates.values()))
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
    print(f"GPU CHECK [{status}] on {gpu} ({device}), {args.preset} CLIP, {result['images']:,} images of {args.image_size} px:\n"
          f"  encode {result.get('encode_images_per_s', '-')} images/s in the app ({dtype}; encoder alone "
          f"{result['encoder_images_per_s_model_only']:.0f}, preprocessing {result['preprocess_images_per_s_one_process']:.0f}/process)\n"
          f"  {result['seconds_per_round'] if result['seconds_per_round'] is not None else '-'} s/round "
          f"(mean of rounds {'2' if len(trained) > 1 else '1'}..{len(trained)}; {len(trained)}/{args.rounds} rounds done)\n"
          f"  held-out {HELD_OUT} acc {fmt(result['held_out_acc_zero_shot'])} zero-shot -> {fmt(result['held_out_acc_last'])} "
          f"last round (random weights: chance is {100 / len(PACS_CLASSES):.1f}%)\n"
          f"  flwr run {result.get('flwr_run_seconds', '-')} s, total {result['total_seconds']} s; results in {out}")
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
