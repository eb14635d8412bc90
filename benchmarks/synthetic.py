"""Stand-ins for PACS and ViT-B/32 that the GPU check and the encoding benchmark run on.

make_dataset: a folder with PACS's shape (its four domains and 7 classes, image counts scaled; 224 px JPEGs of a
class-specific colored grating drawn in a domain-specific style). make_clip: a CLIP of a preset's sizes (vit-b32:
`transformers.CLIPConfig()` defaults) with random weights, the real model's cost at chance accuracy. Both are reused
when already there. torch and the app's modules are imported inside the functions: make_dataset's workers fork
before torch is loaded.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

PACS_DOMAINS = {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929}  # 9,991 images
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
PRESETS = {
    "vit-b32": {},  # transformers.CLIPConfig() defaults are ViT-B/32's sizes (151M parameters)
    "tiny": {  # ViT-B/32's input geometry (224 px, patch 32) and preprocessing, tiny towers: for CPU trials
        "vision_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        "text_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        "projection_dim": 64,
    },
}


def log(msg: str) -> None:
    """A line of the GPU check's progress (these stand-ins are its, and report through it)."""
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
            jobs += [
                (str(root / domain / name / f"{i:05d}.jpg"), domain_i, class_i, len(jobs) + i, size)
                for i in range(per_class)
            ]
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
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = CLIPConfig(
        text_config={**sizes.get("text_config", {}), **special},
        vision_config=sizes.get("vision_config", {}),
        projection_dim=sizes.get("projection_dim", 512),
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)  # defaults: 224 px
    params = sum(p.numel() for p in model.parameters())
    marker.write_text(json.dumps({"preset": preset, "parameters": params}))
    log(f"model: {preset} CLIP, {params:,} parameters, random weights -> {folder}")
    return params
