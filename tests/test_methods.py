"""Every method end to end (ServerApp main + ClientApps in this process) on a tiny CLIP and a small folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from client_app.app import app as client_app
from server_app.app import app as server_app
from tests.conftest import write_image_folder
from tests.inprocess import run_in_process

DOMAINS = ("art", "photo", "sketch")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


def run_method(method: str, tiny_clip: Path, folder: Path, tmp_path: Path, extra: str = "", rounds: int = 2) -> dict:
    overrides = (f"method={method} dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
                 f"training.rounds={rounds} training.batch_size=8 cache_dir={tmp_path / 'cache'} output_dir={tmp_path / 'out'} {extra}")
    run_in_process(server_app, client_app, overrides, len(DOMAINS))
    [summary] = (tmp_path / "out").glob("*/summary.json")
    assert (summary.parent / "accuracy.png").is_file()  # every run folder, every method
    return json.loads(summary.read_text())


def test_zero_shot_trains_nothing_and_sends_nothing(tiny_clip, folder, tmp_path):
    first = run_method("zero_shot", tiny_clip, folder, tmp_path / "first")
    assert first["features_encoded"] == len(DOMAINS) * 3 * 6  # every readable image once, at the query
    summary = run_method("zero_shot", tiny_clip, folder, tmp_path)
    assert summary["rounds"] == 0 and summary["trained_parameters"] == 0 and summary["bytes_total"] == 0
    assert summary["generalization"]["sketch"] == summary["zero_shot"]["sketch"]
    assert summary["features_encoded"] == 0  # the first run encoded them; this one reuses them


@pytest.mark.parametrize("method", ["fedclip", "centralized", "local"])
def test_adapter_methods_train_only_the_adapter(method, tiny_clip, folder, tmp_path):
    summary = run_method(method, tiny_clip, folder, tmp_path)
    adapter_params = 2 * (24 * 24 + 24)  # projection dim 24
    assert summary["method"] == method and summary["rounds"] == 2
    assert summary["trained_parameters"] == adapter_params
    assert 4 * adapter_params <= summary["bytes_up_per_client_per_round"] <= 4 * adapter_params + 1024  # one float32 adapter back (+ .npy headers)
    assert summary["features_encoded"] == 0  # cached features only
    assert set(summary["personalization"]) == {"art", "photo"} and summary["generalization"]["sketch"] is not None
    folder_out = Path(summary["run_folder"])
    assert (folder_out / "adapter_best.safetensors").exists() == (method != "local")


@pytest.mark.parametrize("method", ["fedavg", "fedprox"])
def test_encoder_baselines_send_the_image_encoder(method, tiny_clip, folder, tmp_path):
    from transformers import CLIPModel

    summary = run_method(method, tiny_clip, folder, tmp_path, rounds=1)
    model = CLIPModel.from_pretrained(tiny_clip)
    encoder = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    assert summary["trained_parameters"] == sum(v.numel() for v in encoder.values())
    assert summary["bytes_up_per_client_per_round"] >= 4 * summary["trained_parameters"]
    assert summary["features_encoded"] > 0  # the encoder changes, so images go through it again
    saved = load_file(Path(summary["run_folder"]) / "encoder_final.safetensors")
    assert set(saved) == set(encoder)
    assert any((saved[k] != encoder[k]).any() for k in encoder)  # it was fine-tuned


def test_personalization_fine_tunes_locally(tiny_clip, folder, tmp_path):
    summary = run_method("fedclip", tiny_clip, folder, tmp_path, extra="method.personalize_epochs=2")
    rows = [json.loads(line) for line in (Path(summary["run_folder"]) / "metrics.jsonl").read_text().splitlines()]
    assert all("art/personalized-test-acc" in r["evaluate"] for r in rows[1:])
    assert "sketch/personalized-test-acc" not in rows[1]["evaluate"]  # the held-out domain never trains


def test_unknown_method_is_a_clear_error(tiny_clip, folder, tmp_path):
    with pytest.raises(Exception, match="method"):
        run_method("fedsgd", tiny_clip, folder, tmp_path)


def test_several_clients_per_domain(tiny_clip, folder, tmp_path):
    overrides = (f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} training.rounds=1 "
                 f"dataset.clients_per_domain=2 cache_dir={tmp_path / 'cache'} output_dir={tmp_path / 'out'}")
    run_in_process(server_app, client_app, overrides, 2 * len(DOMAINS))
    [path] = (tmp_path / "out").glob("*/summary.json")
    summary = json.loads(path.read_text())
    row = json.loads((path.parent / "metrics.jsonl").read_text().splitlines()[1])
    assert {k.split("/")[0] for k in row["train"]} == {"art#0", "art#1", "photo#0", "photo#1"}  # 4 training clients
    # a domain's accuracy pools its clients' test images
    acc = [(row["evaluate"][f"art#{s}/test-acc"], row["evaluate"][f"art#{s}/num-test"]) for s in (0, 1)]
    assert summary["personalization"]["art"] == pytest.approx(sum(a * n for a, n in acc) / sum(n for _, n in acc))
    assert set(summary["zero_shot"]) == {"art", "photo", "sketch"}
