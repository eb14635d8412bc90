"""One exchange per round reports exactly what two exchanges did: every accuracy and loss of every method.

tests/fixtures/two_exchange_reference.json was recorded on commit 47d4f29, the last with the two-exchange
round (train, then evaluate, then the next round's train), by `python -m tests.test_protocol_equality`
on the tiny CLIP and image folder of the tests. Only time and byte counts may differ; keys added
since (new metrics) are not compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from client_app.app import app as client_app
from server_app.app import app as server_app
from tests.conftest import save_tiny_clip, write_image_folder
from tests.inprocess import run_in_process

REFERENCE = Path(__file__).parent / "fixtures" / "two_exchange_reference.json"
DOMAINS = ("art", "photo", "sketch")
CASES = {  # name: (overrides, nodes)
    "fedclip": ("method=fedclip", 3),
    "fedclip-contrastive-examples": ("method=fedclip training.loss=contrastive strategy.weighting=examples", 3),
    "zero_shot": ("method=zero_shot", 3),
    "local": ("method=local", 3),
    "centralized": ("method=centralized", 3),
    "fedavg": ("method=fedavg", 3),
    "fedprox": ("method=fedprox", 3),
    "personalized": ("method=fedclip method.personalize_epochs=2", 3),
    "two-clients-per-domain": ("method=fedclip dataset.clients_per_domain=2", 6),
}
NOT_COMPARED = ("seconds", "bytes", "run_folder")  # what the protocol is meant to change


def comparable(value):
    """A run's record without its times and byte counts."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if not any(word in k for word in NOT_COMPARED)}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def run_case(name: str, clip: Path, folder: Path, tmp: Path) -> dict:
    overrides, nodes = CASES[name]
    rounds = 1 if "fedavg" in name or "fedprox" in name else 3
    out = tmp / name
    run_in_process(server_app, client_app, f"{overrides} dataset=folder dataset.root={folder} dataset.held_out=sketch "
                   f"model.name_or_path={clip} training.rounds={rounds} training.batch_size=8 cache_dir={tmp / 'cache'} "
                   f"output_dir={out}", nodes)
    [summary] = out.glob("*/summary.json")
    rows = [json.loads(line) for line in (summary.parent / "metrics.jsonl").read_text().splitlines()]
    return comparable({"rows": rows, "summary": json.loads(summary.read_text())})


def assert_same(reference, actual, where: str = "") -> None:
    if isinstance(reference, dict):
        for key, value in reference.items():
            assert key in actual, f"{where}/{key} missing"
            assert_same(value, actual[key], f"{where}/{key}")
    elif isinstance(reference, list):
        assert len(actual) == len(reference), f"{where}: {len(actual)} entries, expected {len(reference)}"
        for i, (r, a) in enumerate(zip(reference, actual)):
            assert_same(r, a, f"{where}[{i}]")
    elif isinstance(reference, float):
        assert actual == pytest.approx(reference, rel=1e-4, abs=1e-6), where
    else:
        assert actual == reference, where


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_clip(tmp_path_factory.mktemp("clip")), write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


@pytest.mark.parametrize("name", list(CASES))
def test_same_metrics_as_two_exchange_rounds(name, data, tmp_path):
    reference = json.loads(REFERENCE.read_text())[name]
    assert_same(reference, run_case(name, *data, tmp_path), name)


if __name__ == "__main__":  # record the reference (only when the reported numbers are meant to change)
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    clip, folder = save_tiny_clip(tmp / "clip"), write_image_folder(tmp / "data", per_class=6)
    names = sys.argv[1:] or list(CASES)
    REFERENCE.write_text(json.dumps({n: run_case(n, clip, folder, tmp) for n in names}, indent=1, sort_keys=True))
    print(f"wrote {REFERENCE}")
