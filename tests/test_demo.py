"""The embedded demo is the same bytes on every machine: the shipped CLIP and the drawn images, by hash."""

from __future__ import annotations

import json

import pytest

from common.config import load_config
from common.demo import CLIP_KEYS, SHIPPED_CLIP, demo_dataset_root, demo_model_path, pack_clip, tree_sha256, unpack_clip
from common.demo.build import _settings

# tree_sha256 of the demo built from the default configuration; a change here changes every demo number in the README
DEMO_IMAGES_SHA256 = "e4a5062672b69508a6eb84b52fdc0a4784bee5b2496a5be505ece7d14458ecec"
DEMO_CLIP_SHA256 = "2b71e636f485b51d93ec217345a48de933b08fc7c47268a1e2b63ff614f25968"


def test_shipped_clip_fits_the_default_configuration():
    shipped = json.loads(SHIPPED_CLIP.read_text())
    assert shipped["settings"] == _settings(load_config().demo, CLIP_KEYS), (
        "conf/config.yaml's demo settings changed: run `python -m common.demo --rebuild-clip` and update the hashes "
        "here"
    )
    assert shipped["sha256"] == DEMO_CLIP_SHA256


def test_built_demo_is_bit_identical(tmp_path):
    cfg = load_config(f"cache_dir={tmp_path}").demo
    root = demo_dataset_root(cfg)
    assert sum(1 for _ in root.rglob("*.png")) == 1200
    assert tree_sha256(root) == DEMO_IMAGES_SHA256
    model = demo_model_path(cfg)
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    assert tree_sha256(model) == DEMO_CLIP_SHA256


def test_damaged_packed_clip_is_refused(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    packed = pack_clip(folder, {"seed": 0})
    unpack_clip(packed, tmp_path / "ok")
    assert (tmp_path / "ok" / "model.safetensors").read_bytes() == b"weights"
    packed["files"]["model.safetensors"] = "d2VpZ2h0Cg=="  # "weight\n"
    with pytest.raises(RuntimeError, match="damaged"):
        unpack_clip(packed, tmp_path / "bad")
