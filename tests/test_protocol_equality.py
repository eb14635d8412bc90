"""One exchange per round reports exactly what two exchanges did: every accuracy and loss of every method; and what
each method's run must hold beyond the reference numbers (CHECKS: what travels, what is saved), on the same run.

tests/fixtures/two_exchange_reference.json was recorded on commit 47d4f29, the last with the two-exchange
round (train, then evaluate, then the next round's train), by `python -m tests.test_protocol_equality`
on the tiny CLIP and image folder of the tests. Only time and byte counts may differ; keys added
since (new metrics) are not compared. Each case now starts with no features in the process's memory (as in a fresh
process), so its images are encoded once at the query whatever case ran before: `features_encoded` of the cases the
recording had run after one that encoded the same images was raised by those 54 images (0 -> 54, fedavg/fedprox 76
-> 130).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from client_app.app import app as client_app
from common import features
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
    """A case's run: its rows and summary (as run.json and metrics.jsonl hold them)."""
    overrides, nodes = CASES[name]
    rounds = 1 if "fedavg" in name or "fedprox" in name else 3
    out = tmp / name
    run_in_process(
        server_app,
        client_app,
        f"{overrides} dataset=folder dataset.root={folder} dataset.held_out=sketch "
        f"model.name_or_path={clip} training.rounds={rounds} training.batch_size=8 cache_dir={tmp / 'cache'} "
        f"output_dir={out} selection=val_mean",
        nodes,
    )  # the reference chose its best round by validation
    [summary] = out.glob("*/summary.json")
    rows = [json.loads(line) for line in (summary.parent / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "summary": json.loads(summary.read_text())}


ADAPTER_PARAMETERS = 2 * (24 * 24 + 24)  # the tiny CLIP's projection dim is 24


def adapter_method(run: dict, clip: Path) -> None:
    """fedclip, centralized, local: only the adapter is trained and travels (one float32 adapter back, plus .npy
    headers);
    the global methods keep their best adapter, local (no global one) keeps none."""
    summary = run["summary"]
    # (features_encoded, the images encoded once at the query, is compared above)
    assert summary["trained_parameters"] == ADAPTER_PARAMETERS
    assert 4 * ADAPTER_PARAMETERS <= summary["bytes_up_per_client_per_round"] <= 4 * ADAPTER_PARAMETERS + 1024
    assert (Path(summary["run_folder"]) / "adapter_best.safetensors").exists() == (summary["method"] != "local")


def encoder_method(run: dict, clip: Path) -> None:
    """fedavg, fedprox: the CLIP's image encoder is trained and sent, saved fine-tuned."""
    from safetensors.torch import load_file
    from transformers import CLIPModel

    summary = run["summary"]
    encoder = {
        k: v
        for k, v in CLIPModel.from_pretrained(clip).state_dict().items()
        if k.startswith(("vision_model.", "visual_projection."))
    }
    assert summary["trained_parameters"] == sum(v.numel() for v in encoder.values())
    assert summary["bytes_up_per_client_per_round"] >= 4 * summary["trained_parameters"]
    saved = load_file(Path(summary["run_folder"]) / "encoder_final.safetensors")
    assert set(saved) == set(encoder) and any((saved[k] != encoder[k]).any() for k in encoder)  # fine-tuned


def personalized(run: dict, clip: Path) -> None:
    """Local fine-tuning: every trained round has the training clients' personalized accuracy, never the held-out
    one's."""
    for row in run["rows"][1:]:
        assert "art/personalized-test-acc" in row["evaluate"] and "sketch/personalized-test-acc" not in row["evaluate"]


def two_clients_per_domain(run: dict, clip: Path) -> None:
    """Four training clients; a domain's accuracy pools its clients' test images."""
    summary = run["summary"]
    assert all(
        {k.split("/")[0] for k in row["train"]} == {"art#0", "art#1", "photo#0", "photo#1"} for row in run["rows"][1:]
    )
    best = run["rows"][summary["best_round"]]["evaluate"]
    pooled = [(best[f"art#{s}/test-acc"], best[f"art#{s}/num-test"]) for s in (0, 1)]
    assert summary["personalization"]["art"] == pytest.approx(sum(a * n for a, n in pooled) / sum(n for _, n in pooled))
    assert set(summary["zero_shot"]) == {"art", "photo", "sketch"}


CHECKS = {
    "fedclip": adapter_method,
    "centralized": adapter_method,
    "local": adapter_method,
    "fedavg": encoder_method,
    "fedprox": encoder_method,
    "personalized": personalized,
    "two-clients-per-domain": two_clients_per_domain,
}


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


@pytest.fixture(autouse=True)
def cold_feature_memory(monkeypatch) -> None:
    """No features in this process's memory: a case reports the same whatever ran before it (in any order)."""
    monkeypatch.setattr(features, "_MEMORY", {})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_clip(tmp_path_factory.mktemp("clip")), write_image_folder(
        tmp_path_factory.mktemp("data"), per_class=6
    )


@pytest.mark.parametrize("name", list(CASES))
def test_same_metrics_as_two_exchange_rounds(name, data, tmp_path):
    reference = json.loads(REFERENCE.read_text())[name]
    run = run_case(name, *data, tmp_path)
    assert_same(reference, comparable(run), name)
    if name in CHECKS:
        CHECKS[name](run, data[0])


if __name__ == "__main__":  # record the reference (only when the reported numbers are meant to change)
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    clip, folder = save_tiny_clip(tmp / "clip"), write_image_folder(tmp / "data", per_class=6)
    names = sys.argv[1:] or list(CASES)
    REFERENCE.write_text(
        json.dumps({n: comparable(run_case(n, clip, folder, tmp)) for n in names}, indent=1, sort_keys=True)
    )
    print(f"wrote {REFERENCE}")
