"""Files written into the shared cache (and run folders) get the mode open() gives, not safetensors' 0o600."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.demo.build import _build_once
from common.features import DomainFeatures, _save_cached
from common.files import save_tensors
from common.fingerprint import model_files_fingerprint
from tests.conftest import save_tiny_clip


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_the_demo_clip_built_into_the_cache_is_readable_by_others(tmp_path, umask):
    # save_pretrained, as the demo's pretraining saves
    folder = _build_once(tmp_path / "cache" / "demo-clip", save_tiny_clip)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert "model.safetensors" in [p.name for p in files]
    assert {p.name: mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}  # 0o644 with the usual umask


def test_feature_cache_and_file_hashes_are_readable_by_others(tmp_path, tiny_clip, umask):
    feats = DomainFeatures(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(3, 4), torch.tensor(1.0), 0)
    entry = tmp_path / "features" / "key.safetensors"
    _save_cached(entry, feats, {"skipped": 0})
    model_files_fingerprint(str(tiny_clip), tmp_path)
    written = [entry, entry.with_suffix(".json"), tmp_path / "file-hashes.json"]
    assert [mode(p) for p in written] == [0o666 & ~umask] * 3


def test_run_folder_weights_are_readable_by_others(tmp_path, umask):
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    save_tensors(arrays.to_torch_state_dict(), tmp_path / "adapter_best.safetensors", {"round": "1"})
    assert mode(tmp_path / "adapter_best.safetensors") == 0o666 & ~umask
