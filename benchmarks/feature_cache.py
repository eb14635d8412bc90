"""How much the one-off feature cache saves: a local epoch of adapter training with the frozen
CLIP re-encoding every image (the reference code) against the same epoch on cached features.

    python benchmarks/feature_cache.py                 # ViT-B/32-sized CLIP, random weights
    python benchmarks/feature_cache.py --images 512 --device cuda

Prints images/s of the frozen encoder and seconds per local epoch both ways.
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf
from transformers import CLIPConfig, CLIPModel

from common.features import DomainFeatures
from common.model import AttentionAdapter, adapter_loss, class_logits
from common.train import make_optimizer, train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = CLIPModel(CLIPConfig()).to(device).eval().requires_grad_(False)  # ViT-B/32 sizes
    size = model.config.vision_config.image_size
    pixels = torch.randn(args.images, 3, size, size)
    labels = torch.randint(args.classes, (args.images,))
    tokens = torch.randint(1, 1000, (args.classes, 8), device=device)
    with torch.no_grad():
        text = model.get_text_features(input_ids=tokens).pooler_output
    dim = model.config.projection_dim
    cfg = OmegaConf.create(
        {
            "lr": 5e-5,
            "betas": [0.9, 0.98],
            "eps": 1e-6,
            "weight_decay": 0.2,
            "batch_size": args.batch_size,
            "local_epochs": 1,
            "loss": "cross_entropy",
        }
    )
    print(
        f"CLIP {sum(p.numel() for p in model.parameters()):,} parameters, adapter {2 * (dim * dim + dim):,}; "
        f"{args.images} images of {size} px on {device}"
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # the reference code: every batch of every epoch goes through the frozen image encoder
    adapter = AttentionAdapter(dim).to(device)
    optimizer = make_optimizer(adapter, cfg)
    sync()
    t0 = time.perf_counter()
    for start in range(0, args.images, args.batch_size):
        batch = pixels[start : start + args.batch_size].to(device)
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=batch).pooler_output
        loss = adapter_loss(
            class_logits(feats, text, model.logit_scale, adapter),
            labels[start : start + args.batch_size].to(device),
            "cross_entropy",
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync()
    reencode = time.perf_counter() - t0

    # this project: encode once, then every epoch runs on the cached features
    t0 = time.perf_counter()
    with torch.no_grad():
        cached = torch.cat(
            [
                model.get_image_features(pixel_values=pixels[i : i + 256].to(device)).pooler_output
                for i in range(0, args.images, 256)
            ]
        )
    sync()
    encode = time.perf_counter() - t0
    feats = DomainFeatures(cached.cpu(), labels, text.cpu(), model.logit_scale.detach().cpu(), [])
    adapter = AttentionAdapter(dim).to(device)
    optimizer = make_optimizer(adapter, cfg)
    t0 = time.perf_counter()
    train_adapter(adapter, optimizer, feats, torch.arange(args.images), cfg, torch.Generator().manual_seed(0))
    sync()
    cached_epoch = time.perf_counter() - t0

    print(f"frozen image encoder: {args.images / encode:.1f} images/s (one-off, then cached)")
    print(f"local epoch re-encoding every image (reference): {reencode:.3f} s")
    print(
        f"local epoch on cached features (this project):   {cached_epoch:.4f} s  ({reencode / cached_epoch:.0f}x "
        f"faster)"
    )


if __name__ == "__main__":
    main()
