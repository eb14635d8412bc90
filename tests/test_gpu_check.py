"""The GPU check's own parts that CI can afford: its synthetic PACS folder and its reading of the clients' logs.

The whole check (a Flower deployment with a ViT-B/32-sized CLIP) is run by hand: see
benchmarks/gpu_check.py.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import torch

from common.config import load_config
from common.data import dataset_classes, dataset_domains, domain_folder
from common.features import encode_domain
from common.sources import read_image

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
# registered: its worker function is pickled
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_synthetic_pacs_has_pacs_layout_and_goes_through_the_folder_loader(tmp_path):
    counts = gpu_check.make_dataset(tmp_path / "pacs", scale=0.004, size=224, workers=2)
    assert counts == {"art_painting": 8, "cartoon": 9, "photo": 7, "sketch": 16}
    cfg = load_config(f"dataset=pacs dataset.root={tmp_path / 'pacs'} dataset.held_out=sketch")
    domains = dataset_domains(cfg)
    assert domains == sorted(gpu_check.PACS_DOMAINS)
    classes = dataset_classes(tmp_path / "pacs", domains)
    assert classes == gpu_check.PACS_CLASSES
    for domain in domains:
        folder = domain_folder(tmp_path / "pacs", domain, classes)
        assert len(folder.paths) == counts[domain]
        assert set(folder.labels) == set(range(len(classes)))  # every class in every domain
        assert read_image(folder.paths[0]).size == (224, 224)
    # a second call with the same sizes reuses the folder instead of writing it again
    mtime = folder.paths[0].stat().st_mtime_ns
    gpu_check.make_dataset(tmp_path / "pacs", scale=0.004, size=224, workers=2)
    assert folder.paths[0].stat().st_mtime_ns == mtime


def test_encode_rates_reads_what_the_client_logs(tmp_path, tiny_clip, caplog):
    """The check's encode rate comes from the clients' log lines: it must parse what encode_domain writes."""
    from transformers import CLIPModel, CLIPProcessor

    gpu_check.make_dataset(tmp_path / "pacs", scale=0.004, size=224, workers=1)
    classes = dataset_classes(tmp_path / "pacs", ["photo"])
    folder = domain_folder(tmp_path / "pacs", "photo", classes)
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with caplog.at_level(logging.INFO, logger="common.features"):
        encode_domain(model, processor, folder, ["a picture of a dog"], torch.device("cpu"), batch_size=4)
    log = tmp_path / "supernode-photo.log"
    log.write_text("\n".join(f"2026-01-01 00:00:00,000 INFO {r.getMessage()}" for r in caplog.records))
    rates = gpu_check.encode_rates([log])
    assert list(rates) == ["photo"] and rates["photo"]["images"] == len(folder.paths)
    assert rates["photo"]["images_per_s"] > 0
