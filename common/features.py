"""Frozen CLIP features, computed once per image and reused by every epoch, round and evaluation.

CLIP never trains, so a client encodes its images (and its class prompts) once. The result is
kept in memory for the life of the process and on disk as safetensors under
``<cache_dir>/features/<key>.safetensors``; the key hashes the model files, the preprocessing,
the precision, the prompts and the image files (path, size, mtime), so a change to any of them
makes a new entry and a later run with the same inputs encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.data import DomainFolder, read_image
from common.model import class_prompts, load_clip, model_unavailable

log = logging.getLogger(__name__)

_MEMORY: dict[str, DomainFeatures] = {}


@dataclass
class DomainFeatures:
    """A domain's cached frozen features: images that could be read, their labels, the class prompts."""

    image: torch.Tensor  # [N, d] projected CLIP image features, not normalized
    labels: torch.Tensor  # [N]
    text: torch.Tensor  # [C, d] projected features of one prompt per class
    logit_scale: torch.Tensor
    skipped: list[str]  # files that could not be read


def model_files_fingerprint(name_or_path: str) -> str:
    """A hash of a CLIP's files (config, processor, tokenizer, weights) without loading the weights."""
    from transformers.utils import cached_file

    try:
        folder = Path(cached_file(name_or_path, "config.json")).parent
    except OSError as err:  # no such folder, and the hub id cannot be fetched
        raise model_unavailable(name_or_path, err) from err
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(folder.iterdir()):
        real = path.resolve()
        if not real.is_file():
            continue
        stat = real.stat()
        h.update(f"{path.name}:{stat.st_size}:".encode())
        h.update(real.read_bytes() if stat.st_size < 1 << 20 else str(stat.st_mtime_ns).encode())
    return h.hexdigest()


def features_key(model_fingerprint: str, folder: DomainFolder, prompts: list[str], dtype: str) -> str:
    """The cache key of one domain's features: model, precision, prompts and every image file."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([model_fingerprint, dtype, prompts, folder.classes]).encode())
    for path, label in zip(folder.paths, folder.labels):
        stat = path.stat()
        h.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{label}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def encode_domain(
    model, processor, folder: DomainFolder, prompts: list[str], device: torch.device, batch_size: int
) -> DomainFeatures:
    """Run the frozen CLIP once over a domain's images and prompts; unreadable images are skipped."""
    dtype = next(model.parameters()).dtype
    feats, labels, skipped = [], [], []
    t0 = time.time()
    for start in range(0, len(folder.paths), batch_size):
        images, batch_labels = [], []
        for path, label in zip(folder.paths[start : start + batch_size], folder.labels[start : start + batch_size]):
            img = read_image(path)
            if img is None:
                skipped.append(str(path))
            else:
                images.append(img)
                batch_labels.append(label)
        if images:
            pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)
            feats.append(model.get_image_features(pixel_values=pixels).pooler_output.float().cpu())
            labels += batch_labels
        done = min(start + batch_size, len(folder.paths))
        log.info("[%s] encoded %d/%d images (%.0f images/s)", folder.domain, done, len(folder.paths), done / (time.time() - t0 + 1e-9))
    if not feats:
        raise RuntimeError(f"none of the {len(folder.paths)} images of domain {folder.domain!r} could be read")
    text_in = processor.tokenizer(prompts, padding=True, return_tensors="pt").to(device)
    text = model.get_text_features(**text_in).pooler_output.float().cpu()
    return DomainFeatures(torch.cat(feats), torch.tensor(labels), text, model.logit_scale.detach().float().cpu(), skipped)


def domain_features(
    name_or_path: str, folder: DomainFolder, prompt: str, cache_dir: Path, device: torch.device, batch_size: int, dtype: str
) -> DomainFeatures:
    """A domain's frozen features from memory, else from the disk cache, else encoded (and cached)."""
    prompts = class_prompts(folder.classes, prompt)
    key = features_key(model_files_fingerprint(name_or_path), folder, prompts, dtype)
    if key in _MEMORY:
        return _MEMORY[key]
    path = Path(cache_dir).expanduser() / "features" / f"{key}.safetensors"
    if path.exists():
        tensors = load_file(path)
        with open(path.with_suffix(".json")) as fh:
            skipped = json.load(fh)["skipped"]
        feats = DomainFeatures(tensors["image"], tensors["labels"], tensors["text"], tensors["logit_scale"], skipped)
        log.info("[%s] reusing cached features of %d images (%s)", folder.domain, len(feats.labels), path)
    else:
        log.info("[%s] encoding %d images once with the frozen CLIP on %s", folder.domain, len(folder.paths), device)
        model, processor = load_clip(name_or_path, device, getattr(torch, dtype))
        feats = encode_domain(model, processor, folder, prompts, device, batch_size)
        del model
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"image": feats.image, "labels": feats.labels, "text": feats.text, "logit_scale": feats.logit_scale}, tmp)
        with open(path.with_suffix(".json"), "w") as fh:
            json.dump({"domain": folder.domain, "model": name_or_path, "prompts": prompts, "skipped": feats.skipped}, fh)
        tmp.rename(path)
    if feats.skipped:
        log.warning("[%s] %d unreadable image(s) skipped", folder.domain, len(feats.skipped))
    _MEMORY[key] = feats
    return feats
