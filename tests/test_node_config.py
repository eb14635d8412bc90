"""A deployed SuperNode's --node-config: its domain, its own data folder, its cache, device and CPU threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client_app.node import apply_node_config, load_local_data
from common.config import load_config
from common.local_data import LocalData
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
    return (
        "dataset=folder dataset.root=/nonexistent dataset.domains=[art,photo,sketch] dataset.held_out=sketch "
        f"model.name_or_path={tiny_clip}"
    )


def test_node_reads_only_its_own_domain_with_its_cache_and_device(tiny_clip, site, tmp_path, monkeypatch):
    """The run asks for cuda:0 and CUDA looks available; the node's own `device='cpu'` must still win (were the run's
    device used, the CLIP would be moved to a GPU this machine may not have: the test would fail either way)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cache = tmp_path / "node-cache"
    local = node(
        {"domain": "photo", "data-dir": str(site), "cache-dir": str(cache), "device": "cpu", "output-dir": "~/mine"},
        f"{run_overrides(tiny_clip)} device=cuda:0 output_dir={tmp_path / 'the-runs'}",
    )
    assert local.cfg.output_dir == str(Path("~/mine").expanduser())  # where it keeps its state: its own, not the run's
    assert local.domain == "photo" and not local.held_out
    # the corrupt file is skipped
    assert local.images.classes == ["bird", "cat", "dog"] and len(local.feats.labels) == 9
    assert str(local.device) == "cpu" and local.cfg.device == "cpu" and local.cfg.cache_dir == str(cache)
    assert list((cache / "features").glob("*.safetensors"))


def test_node_config_wins_over_the_run_for_device_and_cpu_threads(tiny_clip):
    run = f"{run_overrides(tiny_clip)} device=cpu cpu_threads=8 cache_dir=/run/cache output_dir=/run/out"
    cfg = apply_node_config(load_config(run), {"partition-id": 0, "device": "cuda:1", "cpu-threads": 2})
    assert cfg.device == "cuda:1" and cfg.cpu_threads == 2
    # Flower's simulation: the machine that started the run
    cfg = apply_node_config(load_config(run), {"partition-id": 0})
    assert (cfg.device, cfg.cpu_threads, cfg.cache_dir, cfg.dataset.root) == ("cpu", 8, "/run/cache", "/nonexistent")


def test_a_site_takes_none_of_its_own_settings_from_the_run(tiny_clip, monkeypatch, tmp_path):
    """Data folder, cache, device, CPU threads and output folder: the site's node config, its FEDCLIP_* variables,
    its own
    conf/config.yaml; what the run says of them is ignored, and a site without data-dir is told to give one."""
    monkeypatch.delenv("FEDCLIP_CACHE", raising=False)
    monkeypatch.setenv("FEDCLIP_OUTPUTS", str(tmp_path / "site-out"))
    run = f"{run_overrides(tiny_clip)} device=cuda:3 cpu_threads=8 cache_dir=/run/cache output_dir=/run/out"
    cfg = apply_node_config(load_config(run), {"domain": "photo", "data-dir": "/site/data"})
    assert (cfg.dataset.root, cfg.device, cfg.cpu_threads, cfg.output_dir) == (
        "/site/data",
        "auto",
        None,
        str(tmp_path / "site-out"),
    )
    assert cfg.cache_dir == cfg.demo.cache_dir == "~/.cache/fedclip"  # conf/config.yaml's
    with pytest.raises(ValueError, match="names its domain but not its data folder.*data-dir='DATA_DIR'"):
        apply_node_config(load_config(run), {"domain": "photo"})


@pytest.mark.parametrize(
    "node_config,run,expected",
    [
        ({"cpu-threads": 1}, "cpu_threads=3", [1]),  # the node's setting wins
        ({"cpu-threads": "2"}, "", [2]),  # --node-config "cpu-threads='2'": a string is taken too
        ({}, "cpu_threads=3", []),  # a site never takes the run's
        ({}, "", []),  # null: torch keeps its default (every core)
    ],
)
def test_cpu_threads_sets_torchs_threads_for_the_node(
    node_config, run, expected, tiny_clip, site, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # not this test process's real thread count
    node(
        {"domain": "photo", "data-dir": str(site), "cache-dir": str(tmp_path / "c"), "device": "cpu", **node_config},
        f"{run_overrides(tiny_clip)} {run}",
    )
    assert calls == expected


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
