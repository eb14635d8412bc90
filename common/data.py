"""Image folders in the common ROOT/<domain>/<class>/<image> layout, and the per-domain splits."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class DomainFolder:
    """One domain's image files and labels; labels index into `classes` (shared by all domains)."""

    domain: str
    classes: list[str]
    paths: list[Path]
    labels: list[int]


@dataclass
class DomainSplit:
    """Disjoint train/val/test indices into one domain's images."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def dataset_root(cfg: DictConfig) -> Path:
    """The dataset folder of a run: the built demo for root=demo, else the configured path."""
    if cfg.dataset.root == "demo":
        from common.demo import demo_dataset_root

        return demo_dataset_root(cfg.demo)
    root = Path(cfg.dataset.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset.root={root} is not a folder. Point it at a folder laid out as ROOT/<domain>/<class>/<image>, "
            "e.g. --run-config 'overrides=\"dataset=folder dataset.root=/data/PACS dataset.held_out=sketch\"'"
        )
    return root


def _is_data_dir(path: Path) -> bool:
    """Folders that are domains or classes: not hidden ones, nor macOS archive leftovers."""
    return path.is_dir() and not path.name.startswith(".") and path.name != "__MACOSX"


def dataset_domains(cfg: DictConfig, root: Path, require_held_out: bool = True) -> list[str]:
    """The run's domains, checked against the folder; the held-out one must be among them (unless not required)."""
    found = sorted(p.name for p in root.iterdir() if _is_data_dir(p))
    domains = list(cfg.dataset.domains) if cfg.dataset.domains else found
    unknown = [d for d in domains if d not in found]
    if unknown:
        raise ValueError(f"domain(s) {unknown} not found in {root}; valid domains: {', '.join(found)}")
    if require_held_out and cfg.dataset.held_out not in domains:
        raise ValueError(f"dataset.held_out={cfg.dataset.held_out!r} is not a domain of this run; valid: {', '.join(domains)}")
    return domains


def dataset_classes(root: Path, domains: list[str]) -> list[str]:
    """Class names: the union of class folders over all domains, sorted, so labels agree across clients."""
    return sorted({p.name for d in domains for p in (root / d).iterdir() if _is_data_dir(p)})


def domain_folder(root: Path, domain: str, classes: list[str]) -> DomainFolder:
    """Every image file of one domain, in a stable order (sorted by class, then file name)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = root / domain / name
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"no images under {root / domain}/<class>/ (extensions: {sorted(IMAGE_EXTENSIONS)})")
    return DomainFolder(domain, classes, paths, labels)


def read_image(path: Path) -> Image.Image | None:
    """The image as RGB, or None (logged) when the file is unreadable or truncated."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        log.warning("skipping unreadable image %s: %s", path, err)
        return None


def split_domain(num_images: int, fractions: list[float], seed: int, domain: str) -> DomainSplit:
    """A seeded train/val/test split of one domain (60/20/20 by default), the same on every machine."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"dataset.split must be three fractions summing to 1, got {list(fractions)}")
    order = np.random.default_rng([seed, zlib.crc32(domain.encode())]).permutation(num_images)
    n_train = int(round(fractions[0] * num_images))
    n_val = int(round(fractions[1] * num_images))
    return DomainSplit(order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
