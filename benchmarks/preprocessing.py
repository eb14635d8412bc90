"""Images/s from image files to pixel tensors on the device, before and after parallel decoding.

`before` is main's path until the app decoded in parallel (one thread decodes a batch with PIL, the processor takes
PIL images on the CPU); `after` is the app's `common.features.image_batches`. The GPU check and benchmarks/encoding.py
time both. Like everything the GPU check imports, torch and the app's modules are imported inside the functions: its
dataset workers fork before torch is loaded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from common.sources import DomainFolder


def image_set(root: Path, n: int) -> DomainFolder:
    from common.sources import DomainFolder

    paths = sorted(p for p in root.rglob("*") if p.suffix in {".png", ".jpg"})[:n]
    return DomainFolder(root.name, ["x"], paths, [0] * len(paths))


def serial_batches(processor, images: DomainFolder, batch_size: int, device: torch.device):
    """Main's image_batches until this change: one thread decodes a batch with PIL, the processor takes PIL images
    on the CPU."""
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


def preprocessing_rates(
    processor, images: DomainFolder, batch_size: int, device: torch.device, repeats: int
) -> dict[str, float]:
    """Images/s from files to pixel tensors on the device: main's serial path (before) and image_batches (after)."""
    from common.features import image_batches

    before = best_rate(
        lambda: list(serial_batches(processor, images, batch_size, device)), len(images), repeats, device
    )
    after = best_rate(
        lambda: list(image_batches(processor, images, range(len(images)), batch_size, device)),
        len(images),
        repeats,
        device,
    )
    return {"before": before, "after": after}
