"""``python -m common.demo``: build the embedded demo ahead of time, or pretrain the shipped CLIP again."""

from __future__ import annotations

import argparse
import logging

from common.config import load_config
from common.demo.build import demo_dataset_root, demo_model_path, rebuild_shipped_clip
from common.demo.clip import SHIPPED_CLIP


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m common.demo",
        description="Build the embedded demo ahead of time, or pretrain the shipped CLIP again.",
    )
    parser.add_argument(
        "--rebuild-clip", action="store_true", help=f"pretrain the demo CLIP and rewrite {SHIPPED_CLIP.name}"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config()
    if args.rebuild_clip:
        rebuild_shipped_clip(cfg.demo)
    else:
        print("dataset:", demo_dataset_root(cfg.demo))
        print("model:", demo_model_path(cfg.demo))


if __name__ == "__main__":
    main()
