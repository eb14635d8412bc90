"""The embedded demo: a 4-domain image folder and a small CLIP pretrained on it, built offline.

No multi-domain image set and no pretrained CLIP install offline, so the project makes its
own from real images that installed packages ship: scikit-learn's 1,797 handwritten digits,
drawn in four styles (photo, sketch, cartoon, painting on scikit-image's sample photos).
The digits are split once: one pool pretrains the CLIP, the other (never seen in
pretraining) becomes the federated dataset in the usual ``ROOT/<domain>/<class>/`` layout.
The CLIP is saved as a normal Hugging Face folder and loaded with ``from_pretrained`` like
``openai/clip-vit-base-patch32``.

The pretrained CLIP ships with the app, packed in ``common/demo/demo_clip.json`` (the app bundle that
``flwr run`` sends carries only text files): pretraining takes minutes and floating-point results
differ between CPUs, so every machine unpacks the same bytes instead. ``python -m common.demo
--rebuild-clip`` pretrains it again (one thread, fixed seeds) and rewrites that file. The images are
drawn at first use, a few seconds, from fixed seeds with exact arithmetic only, so they are the same
bytes on every machine with the pinned packages (tests/test_demo.py checks both by hash).

Run ``python -m common.demo`` to build both ahead of time; the apps build them on first use.

- images.py: the styled digit domains (`render`, `write_dataset`);
- clip.py: the tiny CLIP's tokenizer and pretraining, and the packed form of the shipped one;
- build.py: both built on first use into the cache (`demo_dataset_root`, `demo_model_path`).
"""

from common.demo.build import (
    CLIP_KEYS,
    DATASET_KEYS,
    DATASET_VERSION,
    MODEL_VERSION,
    demo_dataset_root,
    demo_model_path,
    rebuild_shipped_clip,
)
from common.demo.clip import (
    GENERIC_CAPTION,
    SHIPPED_CLIP,
    STYLE_CAPTION,
    build_tokenizer,
    pack_clip,
    pretrain_clip,
    pretraining_captions,
    tree_sha256,
    unpack_clip,
)
from common.demo.images import DIGIT_NAMES, STYLES, render, write_dataset

__all__ = [
    "CLIP_KEYS",
    "DATASET_KEYS",
    "DATASET_VERSION",
    "DIGIT_NAMES",
    "GENERIC_CAPTION",
    "MODEL_VERSION",
    "SHIPPED_CLIP",
    "STYLES",
    "STYLE_CAPTION",
    "build_tokenizer",
    "demo_dataset_root",
    "demo_model_path",
    "pack_clip",
    "pretrain_clip",
    "pretraining_captions",
    "rebuild_shipped_clip",
    "render",
    "tree_sha256",
    "unpack_clip",
    "write_dataset",
]
