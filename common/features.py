"""Frozen CLIP features, computed once per image and reused by every epoch, round and evaluation.

CLIP never trains, so a client encodes its images (and its class prompts) once. The result is
kept in memory for the life of the process and on disk as safetensors under
``<cache_dir>/features/<key>.safetensors``; the key hashes the model files' contents (preprocessing included),
the precision, the prompts and the images' fingerprint (each file's path, size and mtime for a folder; the
Arrow dataset's fingerprint and rows for the hub), so a change to any of them makes a new entry and a later
run with the same inputs encodes nothing. One entry per client: a domain, or one client's shard of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import torch
from safetensors.torch import load_file

from common.files import save_tensors
from common.fingerprint import model_files_fingerprint
from common.model import class_prompts, shared_clip
from common.sources import ImageSource

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 5  # while encoding, a progress line at most this often (and one at the end)
FEATURES_VERSION = 2  # bump when what is computed or stored changes, so old cache entries are not reused
DECODE_AHEAD = 2  # batches being decoded while one is preprocessed and encoded
_MEMORY: dict[str, DomainFeatures] = {}
_ENCODED = {"images": 0}  # images this process has run through a CLIP image encoder in encode_domain


def images_encoded() -> int:
    """How many images this process has encoded so far (a client reports the difference a call made)."""
    return _ENCODED["images"]


class Progress:
    """Log lines while a long job goes on: done of total, the rate and the time left, at most every `every` seconds
    and once
    at the end. Plain logging, so each client's lines reach its log also under Ray and in a deployment; `clock` for
    tests."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "images",
        every: float = PROGRESS_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit, self.every, self.clock = label, total, unit, every, clock
        self.done, self.start = 0, clock()
        self.last = self.start

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.done < self.total and now - self.last < self.every:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        left = (
            f", about {duration((self.total - self.done) / rate)} left" if self.done < self.total and rate > 0 else ""
        )
        log.info(
            "[%s] encoded %d/%d %s (%.0f %s/s)%s", self.label, self.done, self.total, self.unit, rate, self.unit, left
        )


def duration(seconds: float) -> str:
    """A time span for a log line: 42 s, 3m05s, 2h07m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


@dataclass
class DomainFeatures:
    """A client's cached frozen features: images that could be read, their labels, the class prompts."""

    image: torch.Tensor  # [N, d] projected CLIP image features, not normalized
    labels: torch.Tensor  # [N]
    text: torch.Tensor  # [C, d] projected features of one prompt per class
    logit_scale: torch.Tensor
    skipped: list[str]  # images that could not be read


def features_key(model_fingerprint: str, images: ImageSource, prompts: list[str], dtype: str) -> str:
    """The cache key of one client's features: model, precision, prompts and every image with its label."""
    return _cache_key(model_fingerprint, dtype, prompts, images.classes, images.fingerprint())


def _cache_key(*parts: object) -> str:
    """A cache entry's name: the hash of what it was computed from (and of FEATURES_VERSION)."""
    return hashlib.blake2b(json.dumps([FEATURES_VERSION, *parts]).encode(), digest_size=16).hexdigest()


def _cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir).expanduser() / "features" / f"{key}.safetensors"


def _decoded(images: ImageSource, rows: list[int]) -> list[torch.Tensor | None]:
    """Images as uint8 [3, H, W] tensors, None where unreadable. PIL decodes and numpy copies without the GIL, so
    threads
    run in parallel (a torch copy here would start an OpenMP team per thread)."""
    return [
        None
        if (img := images.read(i)) is None
        else torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))
        for i in rows
    ]


def image_batches(
    processor,
    images: ImageSource,
    indices,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    skipped: list[str] | None = None,
    workers: int | None = None,
):
    """(pixel_values, labels) batches of images[indices]; unreadable ones are left out (and named in `skipped`).

    `workers` threads (default: torch's CPU threads, which cpu_threads sets) decode the next DECODE_AHEAD batches
    while one is preprocessed and encoded; the processor (torchvision backend) resizes, crops and normalizes a
    whole batch on `device`, so on a GPU the CPU only decodes.
    """
    indices, workers = list(indices), workers or torch.get_num_threads()
    chunks = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    pool, pending = ThreadPoolExecutor(workers), deque()
    try:
        for chunk in chunks:
            step = -(-len(chunk) // workers)  # each thread decodes one slice of the batch
            pending.append(
                (chunk, [pool.submit(_decoded, images, chunk[s : s + step]) for s in range(0, len(chunk), step)])
            )
            if len(pending) > DECODE_AHEAD:
                yield from _preprocessed(processor, images, *pending.popleft(), device, dtype, skipped)
        while pending:
            yield from _preprocessed(processor, images, *pending.popleft(), device, dtype, skipped)
    finally:  # a consumer that stops early does not wait for batches it will never take
        pool.shutdown(cancel_futures=True)


def _preprocessed(
    processor,
    images: ImageSource,
    chunk: list[int],
    decoding: list,
    device: torch.device,
    dtype: torch.dtype,
    skipped: list[str] | None,
):
    """The pixel values and labels of one decoded batch (nothing when none of it could be read)."""
    batch, labels = [], []
    for i, pixels in zip(chunk, [pixels for future in decoding for pixels in future.result()]):
        if pixels is None:
            if skipped is not None:
                skipped.append(images.name(i))
            continue
        batch.append(pixels)
        labels.append(images.labels[i])
    if batch:
        pixel_values = processor(images=batch, return_tensors="pt", device=device)["pixel_values"]
        yield pixel_values.to(device, dtype), torch.tensor(labels, device=device)


@torch.no_grad()
def encode_images(
    model,
    processor,
    images: ImageSource,
    device: torch.device,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    image_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features, labels, skipped) of a client's images through CLIP's image encoder, decoded batch by batch.

    `progress` is called with the number of images (read or skipped) each batch got through; `image_features` is a
    method's own image path from pixel values (Method.image_features), instead of the frozen encoder's.
    """
    dtype = next(model.parameters()).dtype
    feats, labels, skipped = [], [], []
    done, logged = 0, Progress(images.domain, len(images))
    for pixels, batch_labels in image_batches(
        processor, images, range(len(images)), batch_size, device, dtype, skipped
    ):
        encoded = (
            image_features(pixels)
            if image_features is not None
            else model.get_image_features(pixel_values=pixels).pooler_output
        )
        feats.append(encoded.float().cpu())
        labels.append(batch_labels.cpu())
        _ENCODED["images"] += len(batch_labels)
        now = sum(len(b) for b in labels) + len(skipped)
        if progress is not None:
            progress(now - done)
        logged.update(now - done)
        done = now
    if not feats:
        raise RuntimeError(f"none of the {len(images)} images of domain {images.domain!r} could be read")
    return torch.cat(feats), torch.cat(labels), skipped


@torch.no_grad()
def encode_prompts(model, processor, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Projected text features [C, d] of one prompt per class."""
    text_in = processor.tokenizer(prompts, padding=True, return_tensors="pt").to(device)
    return model.get_text_features(**text_in).pooler_output.float().cpu()


@torch.no_grad()
def encode_domain(
    model, processor, images: ImageSource, prompts: list[str], device: torch.device, batch_size: int
) -> DomainFeatures:
    """Run the frozen CLIP once over a client's images and prompts; unreadable images are skipped."""
    image, labels, skipped = encode_images(model, processor, images, device, batch_size)
    text = encode_prompts(model, processor, prompts, device)
    return DomainFeatures(image, labels, text, model.logit_scale.detach().float().cpu(), skipped)


def _load_cached(path: Path) -> DomainFeatures | None:
    """A cache entry, or None (logged) if it cannot be read, so that it is encoded again."""
    try:
        tensors = load_file(path)
        skipped = json.loads(path.with_suffix(".json").read_text())["skipped"]
        return DomainFeatures(tensors["image"], tensors["labels"], tensors["text"], tensors["logit_scale"], skipped)
    except (OSError, KeyError, ValueError, safetensors.SafetensorError) as err:
        log.warning("unreadable feature cache entry %s (%s): encoding again", path, err)
        return None


def _save_cached(path: Path, feats: DomainFeatures, meta: dict) -> None:
    """Write a cache entry atomically: the metadata first, the tensors last (their presence marks it complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta))
    tmp.rename(path.with_suffix(".json"))
    save_tensors(
        {"image": feats.image, "labels": feats.labels, "text": feats.text, "logit_scale": feats.logit_scale}, tmp
    )
    tmp.rename(path)


def cached_image_tensor(
    name: str, name_or_path: str, images: ImageSource, cache_dir: Path, dtype: str, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """A tensor computed from a client's images by the frozen CLIP other than its features (two_tower_prompt's inputs
    of its first prompted image layer: `name` says which), from the disk cache, else computed and cached. Keyed like
    the features: the model files, the precision, every image with its label, and `name`; an entry that cannot be read
    is computed again."""
    fingerprint = model_files_fingerprint(name_or_path, cache_dir)
    path = _cache_path(cache_dir, _cache_key(fingerprint, dtype, images.classes, images.fingerprint(), name))
    if path.exists():
        try:
            return load_file(path)["values"]
        except (OSError, KeyError, safetensors.SafetensorError) as err:
            log.warning("unreadable cache entry %s (%s): computing it again", path, err)
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}")
    save_tensors({"values": values}, tmp, {"name": name, "domain": images.domain, "model": name_or_path})
    tmp.rename(path)
    return values


def domain_features(
    name_or_path: str,
    images: ImageSource,
    prompt: str,
    cache_dir: Path,
    device: torch.device,
    batch_size: int,
    dtype: str,
) -> DomainFeatures:
    """A client's frozen features from memory, else from the disk cache, else encoded (and cached)."""
    prompts = class_prompts(images.classes, prompt)
    fingerprint = model_files_fingerprint(name_or_path, cache_dir)
    key = features_key(fingerprint, images, prompts, dtype)
    if key in _MEMORY:
        return _MEMORY[key]
    path = _cache_path(cache_dir, key)
    feats = _load_cached(path) if path.exists() else None
    if feats is not None:
        log.debug("[%s] reusing cached features of %d images (%s)", images.domain, len(feats.labels), path)
    else:
        log.info("[%s] encoding %d images once with the frozen CLIP on %s", images.domain, len(images), device)
        model, processor = shared_clip(name_or_path, fingerprint, device, getattr(torch, dtype))
        feats = encode_domain(model, processor, images, prompts, device, batch_size)
        _save_cached(
            path, feats, {"domain": images.domain, "model": name_or_path, "prompts": prompts, "skipped": feats.skipped}
        )
    if feats.skipped:
        log.warning("[%s] %d unreadable image(s) skipped", images.domain, len(feats.skipped))
    _MEMORY[key] = feats
    return feats
