"""End to end on the in-process grid: one poisoned client of four. Mean is ruined; screening or the median are not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from benchmarks.attacks import poisoned_client_app
from tests.conftest import write_image_folder
from tests.inprocess import run_in_process
from server_app.app import app as server_app


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


@pytest.mark.parametrize("options,damaged", [
    ("strategy.max_norm_ratio=null", True),  # plain mean, no screening
    ("", False),  # the default screening rejects the scaled update
    ("strategy.max_norm_ratio=null strategy.aggregation=median strategy.num_malicious=1", False),
])
def test_one_scaled_update(options, damaged, tiny_clip, folder, tmp_path):
    overrides = (f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} training.rounds=2 "
                 f"training.batch_size=8 dataset.clients_per_domain=2 cache_dir={tmp_path / 'cache'} output_dir={tmp_path / 'out'} {options}")
    run_in_process(server_app, poisoned_client_app("scale", {0}), overrides, 6)  # partition 0: art#0 of art#0/1, photo#0/1 (sketch held out)
    [path] = (tmp_path / "out").glob("*/adapter_final.safetensors")
    largest = max(float(np.abs(v).max()) for v in load_file(path).values())
    assert (largest > 1e3) == damaged, largest
    rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    screened = options == ""  # only the default screening leaves the update out: the median takes it in and outvotes it
    assert [r["rejected"] for r in rows] == [[], ["art#0"], ["art#0"]] if screened else [[]] * 3
