"""How fast images become CLIP features, before and after parallel decoding, and how fast fedclip-predict classifies.

    python benchmarks/encoding.py                                # CPU: the demo, and 224-px JPEGs with a
    ViT-B/32-sized CLIP
    python benchmarks/encoding.py --device cuda --images 4096 --encode-images 4096

For two image sets, the demo's photo domain (32-px PNGs, the demo CLIP) and 224-px JPEGs (the GPU
check's PACS-shaped synthetic folder, a CLIP built from `CLIPConfig()`: ViT-B/32's sizes, random
weights), it prints images/s of
- preprocessing: decoding and CLIP preprocessing to pixel tensors on the device, the CPU side of
  the one-off encoding: `before` is main's code until this change (one thread decodes with PIL, the
  processor takes PIL images on the CPU), `after` is `common.features.image_batches` (decoding in
  threads, a batch ahead, the torchvision-backed processor on the device);
- encoding: the same plus the frozen image encoder (`common.features.encode_images` after);
- prediction: `FedClipClassifier.predict` on image paths, adapter included.
Both ways run in the same process, one after the other, best of --repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.preprocessing import best_rate, image_set, preprocessing_rates, serial_batches  # noqa: E402
from benchmarks.synthetic import make_clip, make_dataset  # noqa: E402
from common.config import load_config  # noqa: E402
from common.demo import demo_dataset_root, demo_model_path  # noqa: E402
from common.features import encode_images, image_batches  # noqa: E402
from common.model import AttentionAdapter, load_clip  # noqa: E402
from common.sources import DomainFolder  # noqa: E402
from predict import FedClipClassifier  # noqa: E402


@torch.no_grad()
def encoding_rates(
    model, processor, images: DomainFolder, batch_size: int, device: torch.device, repeats: int
) -> dict[str, float]:
    """Images/s from files to features, encoder included: before and after."""
    dtype = next(model.parameters()).dtype

    def before() -> None:
        for pixels in serial_batches(processor, images, batch_size, device):
            model.get_image_features(pixel_values=pixels.to(dtype)).pooler_output.float().cpu()

    return {
        "before": best_rate(before, len(images), repeats, device),
        "after": best_rate(
            lambda: encode_images(model, processor, images, device, batch_size), len(images), repeats, device
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="images for the preprocessing rates")
    parser.add_argument(
        "--encode-images",
        type=int,
        default=128,
        help="images for the encoding and prediction rates of the ViT-B/32 CLIP",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "fedclip-encoding-bench",
        help="the JPEGs and the CLIP",
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)

    demo = load_config().demo
    make_dataset(args.work / "jpeg224", scale=max(args.images / 9991, 0.01), size=224, workers=2)
    make_clip(args.work / "clip-vit-b32", "vit-b32")
    sets = [
        ("demo (32-px PNG, demo CLIP)", demo_model_path(demo), demo_dataset_root(demo) / "photo", args.images),
        ("224-px JPEG, ViT-B/32-sized CLIP", args.work / "clip-vit-b32", args.work / "jpeg224", args.encode_images),
    ]
    print(
        f"device {device}, {args.dtype}, {torch.get_num_threads()} CPU threads, batch {args.batch_size}, best "
        f"of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'images':>34} | {'n':>5} | {'preprocess before':>17} | {'after':>8} | {'x':>5} | {'encode before':>13} "
        f"| {'after':>8} | {'x':>5} | {'predict':>8}"
    )
    for name, model_dir, folder, n_encode in sets:
        model, processor = load_clip(str(model_dir), device, dtype)
        images = image_set(folder, args.images)
        list(image_batches(processor, image_set(folder, 8), range(8), 8, device))  # warm-up
        pre = preprocessing_rates(processor, images, args.batch_size, device, args.repeats)
        subset = image_set(folder, n_encode)
        enc = encoding_rates(model, processor, subset, args.batch_size, device, args.repeats)
        dim = int(model.config.projection_dim)
        clf = FedClipClassifier(
            model,
            processor,
            ["cat", "dog"],
            "a picture of a {}",
            AttentionAdapter(dim).to(device),
            device,
            args.batch_size,
            {"feature_dim": dim},
        )
        predict = best_rate(lambda clf=clf, subset=subset: clf.predict(subset.paths), len(subset), args.repeats, device)
        print(
            f"{name:>34} | {len(images):>5} | {pre['before']:>17.0f} | {pre['after']:>8.0f} "
            f"| {pre['after'] / pre['before']:>5.2f} | "
            f"{enc['before']:>13.1f} | {enc['after']:>8.1f} | {enc['after'] / enc['before']:>5.2f} | {predict:>8.1f}"
        )
        print(f"{'':>34}   (encode and predict on {len(subset)} images; load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
