"""A deployed SuperNode's --node-config: its domain, its own data folder, its cache and device."""

from __future__ import annotations

import pytest

from client_app.node import load_local_data
from common.local_data import LocalData
from common.config import load_config
from tests.conftest import write_image_folder


def node(node_config: dict, overrides: str) -> LocalData:
    """What a SuperNode with this node config builds for a run with these overrides."""
    return load_local_data(load_config(overrides), node_config)


@pytest.fixture
def site(tmp_path):
    """One site's folder: only its own domain, as a SuperNode on its own machine holds it."""
    return write_image_folder(tmp_path / "site", domains=("photo",), classes=("bird", "cat", "dog"), per_class=3)


def run_overrides(tiny_clip) -> str:
    # the run names all domains; the node holds one of them
    return f"dataset=folder dataset.root=/nonexistent dataset.domains=[art,photo,sketch] dataset.held_out=sketch model.name_or_path={tiny_clip}"


def test_node_reads_only_its_own_domain_with_its_cache_and_device(tiny_clip, site, tmp_path):
    cache = tmp_path / "node-cache"
    local = node({"domain": "photo", "data-dir": str(site), "cache-dir": str(cache), "device": "cpu"}, run_overrides(tiny_clip))
    assert local.domain == "photo" and not local.held_out
    assert local.images.classes == ["bird", "cat", "dog"] and len(local.feats.labels) == 9  # the corrupt file is skipped
    assert str(local.device) == "cpu" and local.cfg.cache_dir == str(cache)
    assert list((cache / "features").glob("*.safetensors"))


def test_node_config_errors_say_what_to_pass(tiny_clip, site, tmp_path):
    overrides = run_overrides(tiny_clip)
    with pytest.raises(ValueError, match="unknown --node-config key.*data_dir"):
        node({"domain": "photo", "data_dir": str(site)}, overrides)
    with pytest.raises(ValueError, match="not a domain of this run"):
        node({"domain": "clipart", "data-dir": str(site)}, overrides)
    with pytest.raises(FileNotFoundError, match="no folder .*art.*data-dir"):
        node({"domain": "art", "data-dir": str(site), "cache-dir": str(tmp_path / "c")}, overrides)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        node({"domain": "photo", "data-dir": str(tmp_path / "missing")}, overrides)
