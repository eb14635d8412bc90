"""The demo's images and CLIP, built on first use into the cache folder, once however many processes ask.

Each is a cache folder named after a code version and the `demo` settings it is built from, built into a
temporary folder under a file lock and renamed. The CLIP is the shipped one, unpacked, unless the settings
differ from those it was pretrained with.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.demo.clip import SHIPPED_CLIP, pack_clip, pretrain_clip, unpack_clip
from common.demo.images import write_dataset
from common.files import set_default_mode

log = logging.getLogger(__name__)

DATASET_VERSION = 3  # bump when write_dataset or render change what is drawn
MODEL_VERSION = 2  # bump when pretrain_clip or the shipped CLIP change
DATASET_KEYS = ["seed", "image_size", "num_pretrain_digits"]  # the `demo` settings each part is built from
CLIP_KEYS = DATASET_KEYS + ["pretrain"]


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive file lock, so concurrent clients build the demo once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(target: Path, build) -> Path:
    """Build `target` into a temporary folder and rename it, under a lock; reuse it if present.

    Its files get the mode open() gives (save_pretrained writes the weights 0o600): other users and
    containers share the cache.
    """
    with _locked(target.with_name(target.name + ".lock")):
        if not target.exists():
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("building %s (first use; later runs reuse it)", target)
            build(tmp)
            for path in tmp.rglob("*"):
                if path.is_file():
                    set_default_mode(path)
            tmp.rename(target)
    return target


def _settings(cfg: DictConfig, keys: list[str]) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: container[k] for k in keys}


def _cache_name(kind: str, version: int, settings: dict) -> str:
    """A folder name that changes whenever the code version or the settings it was built from change."""
    digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=6).hexdigest()
    return f"demo-{kind}-v{version}-{digest}"


def demo_dataset_root(cfg: DictConfig) -> Path:
    """The demo image folder for `cfg` (the `demo` config group), built if missing."""
    name = _cache_name("digits", DATASET_VERSION, _settings(cfg, DATASET_KEYS))
    return _build_once(Path(cfg.cache_dir).expanduser() / name, lambda p: write_dataset(p, cfg))


def demo_model_path(cfg: DictConfig) -> Path:
    """The demo CLIP folder for `cfg`: the shipped one, unpacked; pretrained here only for other `demo.pretrain`
    settings."""
    settings = _settings(cfg, CLIP_KEYS)

    def build(out: Path) -> None:
        shipped = json.loads(SHIPPED_CLIP.read_text())
        if shipped["settings"] == settings:
            unpack_clip(shipped, out)
        else:
            log.warning(
                "the demo settings differ from those of the shipped CLIP (%s): pretraining one here, "
                "a few minutes; its weights depend on this machine's CPU",
                SHIPPED_CLIP.name,
            )
            pretrain_clip(out, cfg)

    name = _cache_name("clip", MODEL_VERSION, settings)
    return _build_once(Path(cfg.cache_dir).expanduser() / name, build)


def rebuild_shipped_clip(cfg: DictConfig) -> None:
    """Pretrain the demo CLIP from `cfg` (the `demo` group) and pack it into SHIPPED_CLIP."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pretrain_clip(Path(tmp) / "clip", cfg)
        packed = pack_clip(Path(tmp) / "clip", _settings(cfg, CLIP_KEYS))
    SHIPPED_CLIP.write_text(json.dumps(packed, indent=1) + "\n")
    print(f"wrote {SHIPPED_CLIP} (sha256 of the CLIP folder {packed['sha256']})")
