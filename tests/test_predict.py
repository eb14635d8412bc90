"""Using what a FedCLIP run trained (predict/, fedclip-predict) and the fast shared encoding path, on a tiny CLIP.

One real run (ServerApp + ClientApps in this process) makes the run folder every test reads.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client_app.app import app as client_app
from common.data import domain_folder
from common.features import encode_images
from common.model import load_clip
from common.sources import DomainFolder
from predict import FedClipClassifier, push_to_hub
from predict.cli import main as predict_main
from server_app.app import app as server_app
from tests.conftest import save_tiny_clip
from tests.inprocess import run_folder, run_in_process

CLASSES = ("bird", "cat", "dog")  # words the tiny CLIP's tokenizer knows
COLOURS = {"bird": (200, 60, 60), "cat": (60, 200, 60), "dog": (60, 60, 200)}


def write_coloured_folder(root: Path, domains=("art", "photo", "sketch"), per_class=8) -> Path:
    """ROOT/<domain>/<class>/<i>.png whose colour follows the class (something an adapter can learn), one corrupt
    file."""
    rng = np.random.default_rng(0)
    for shift, domain in enumerate(domains):
        for name in CLASSES:
            (root / domain / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.array(COLOURS[name]) + 25 * shift + rng.normal(0, 50, (20, 20, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / domain / name / f"{i}.png")
    (root / domains[0] / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_coloured_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(tiny_clip, data, tmp_path_factory) -> Path:
    """A real FedCLIP run folder (3 rounds, sketch held out)."""
    tmp = tmp_path_factory.mktemp("run")
    overrides = (
        f"dataset=folder dataset.root={data} dataset.held_out=sketch model.name_or_path={tiny_clip} training.rounds=3 "
        f"training.lr=0.01 training.batch_size=8 cache_dir={tmp / 'cache'} output_dir={tmp / 'out'}"
    )
    run_in_process(server_app, client_app, overrides, 3)
    folder = run_folder(tmp / "out")
    return folder


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_run_folder_records_classes_and_clip(run, tiny_clip):
    from common.fingerprint import model_files_fingerprint

    info = json.loads((run / "run.json").read_text())
    assert info.pop("run_key") and info == {
        "classes": list(CLASSES),
        "model_fingerprint": model_files_fingerprint(str(tiny_clip)),
    }


def test_api_accuracy_equals_the_runs_own_evaluation(run, data):
    clf = FedClipClassifier.from_run(run)
    # the held-out domain: all its images, at the best round
    encoded = clf.encode(domain_folder(data, "sketch", clf.classes))
    trained = (clf.logits(encoded.features).argmax(1) == encoded.labels).float().mean().item()
    zero_shot = (clf.zero_shot().logits(encoded.features).argmax(1) == encoded.labels).float().mean().item()
    assert trained == pytest.approx(summary(run)["generalization"]["sketch"], abs=1e-6)
    assert zero_shot == pytest.approx(summary(run)["zero_shot"]["sketch"], abs=1e-6)
    assert trained != zero_shot  # the adapter is applied
    predictions = clf.predict(domain_folder(data, "sketch", clf.classes).paths)
    assert predictions.labels == [clf.classes[i] for i in clf.logits(encoded.features).argmax(1)]
    assert torch.allclose(predictions.probabilities.sum(1), torch.ones(len(predictions.names)))
    without = FedClipClassifier.from_run(run, which=None)  # zero-shot CLIP straight from the run
    assert torch.equal(without.logits(encoded.features), clf.zero_shot().logits(encoded.features))


def test_command_writes_csv_and_accuracy_per_domain(run, data, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert predict_main(["--run", str(run), str(data), "--top-k", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * 3 * 8  # every readable image; the corrupt one is skipped
    assert list(rows[0]) == ["path", "label", "class_1", "probability_1", "class_2", "probability_2"]
    assert all(Path(r["path"]).parent.name == r["label"] for r in rows)
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) for r in rows)
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "broken.jpg" in err
    [sketch] = [line.split() for line in err.splitlines() if line.split()[:1] == ["sketch"]]
    assert sketch[1] == "24"
    assert float(sketch[2]) == pytest.approx(100 * summary(run)["generalization"]["sketch"], abs=0.006)
    assert float(sketch[3]) == pytest.approx(100 * summary(run)["zero_shot"]["sketch"], abs=0.006)
    assert any(line.split()[:1] == ["all"] for line in err.splitlines())


def test_unreadable_image_is_reported_and_skipped(run, data, capsys):
    clf = FedClipClassifier.from_run(run)
    good, broken = data / "art" / "cat" / "0.png", data / "art" / "cat" / "broken.jpg"
    predictions = clf.predict([good, broken, Image.open(good), torch.zeros(3, 20, 20, dtype=torch.uint8)])
    assert predictions.names == [str(good), "image[2]", "image[3]"] and predictions.skipped == [str(broken)]
    assert predictions.labels[0] == predictions.labels[1]  # a path and the same image opened give one answer
    assert predict_main(["--run", str(run), str(broken), str(good)]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable image(s)" in captured.err
    assert len(captured.out.strip().splitlines()) == 2  # header and the readable image


def test_a_different_clip_is_refused(run, tmp_path, capsys):
    other = save_tiny_clip(tmp_path / "other", seed=1)  # same sizes, other weights
    with pytest.raises(ValueError, match="fingerprint"):
        FedClipClassifier.from_run(run, clip=str(other))
    assert predict_main(["--run", str(run), "--clip", str(other), "--export", str(tmp_path / "x")]) == 1
    assert "not the one the weights were trained with" in capsys.readouterr().err
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(other)
    config = model.config
    config.projection_dim = 16
    narrow = tmp_path / "narrow"
    CLIPModel(config).save_pretrained(narrow)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(other / name, narrow / name)
    with pytest.raises(ValueError, match="does not fit: the adapter was trained on 24 features, this CLIP gives 16"):
        FedClipClassifier.from_run(run, clip=str(narrow))


def test_export_then_load_gives_identical_predictions(run, data, tmp_path):
    clf = FedClipClassifier.from_run(run)
    folder = clf.export(tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter.safetensors",
        "class_text_features.safetensors",
        "config.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["classes"] == list(CLASSES) and config["feature_dim"] == 24 and config["prompt"] == "a picture of a {}"
    )
    assert (
        config["run"]["held_out"] == "sketch" and config["run"]["rounds"] == 3 and config["run"]["method"] == "fedclip"
    )
    assert (
        config["run"]["generalization"] == summary(run)["generalization"]
        and config["run"]["bytes_total"] == summary(run)["bytes_total"]
    )
    assert "sketch (held out)" in (folder / "README.md").read_text()
    images = domain_folder(data, "photo", clf.classes).paths
    loaded = FedClipClassifier.from_pretrained(folder)
    assert torch.equal(loaded.predict(images).probabilities, clf.predict(images).probabilities)
    half = FedClipClassifier.from_pretrained(folder, dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16 and half.predict(images).probabilities.shape == (len(images), 3)


def card_results(card) -> dict[tuple[str, str], float]:
    """(domain, metric name) -> value of a card's model-index, as huggingface_hub parses it."""
    return {(r.dataset_config, r.metric_name): r.metric_value for r in card.data.eval_results}


def assert_card_holds_the_runs_results(card, run: Path) -> None:
    s = summary(run)
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert {r.task_type for r in card.data.eval_results} == {"zero-shot-image-classification"}
    expected = {
        ("sketch", "accuracy (%)"): s["generalization"]["sketch"],
        **{(d, "accuracy (%)"): s["personalization"][d] for d in ("art", "photo")},
        **{(d, "zero-shot CLIP accuracy (%)"): s["zero_shot"][d] for d in ("art", "photo", "sketch")},
    }
    assert card_results(card) == {k: round(100 * v, 2) for k, v in expected.items()}
    assert {r.dataset_config: r.dataset_split for r in card.data.eval_results} == {
        "art": "test",
        "photo": "test",
        "sketch": "all",
    }


def test_exported_card_has_no_base_model_and_no_local_path_for_a_clip_with_no_hub_id(run, tiny_clip, tmp_path):
    from huggingface_hub import ModelCard

    folder = FedClipClassifier.from_run(run).export(tmp_path / "export")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None and "no Hugging Face hub id" in card.text
    assert_card_holds_the_runs_results(card, run)
    assert str(tiny_clip) not in card.content and str(tmp_path) not in card.content and "/tmp" not in card.content


@pytest.fixture(scope="module")
def hub_run(tiny_clip, data, tmp_path_factory) -> Path:
    """A run whose model names a hub id (conf/model/clip-vit-b32.yaml) but loads a local copy, as offline users run
    it."""
    tmp = tmp_path_factory.mktemp("hub-run")
    overrides = (
        f"dataset=folder dataset.root={data} dataset.held_out=sketch model=clip-vit-b32 model.name_or_path={tiny_clip} "
        f"model.encode_batch_size=64 training.rounds=2 training.lr=0.01 training.batch_size=8 "
        f"cache_dir={tmp / 'cache'} "
        f"output_dir={tmp / 'out'}"
    )
    run_in_process(server_app, client_app, overrides, 3)
    folder = run_folder(tmp / "out")
    return folder


def test_exported_card_names_the_hub_base_model_and_the_runs_results(hub_run, tiny_clip, tmp_path):
    from huggingface_hub import ModelCard

    export = tmp_path / "export"
    assert predict_main(["--run", str(hub_run), "--export", str(export)]) == 0
    card = ModelCard.load(export / "README.md")
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert_card_holds_the_runs_results(card, hub_run)
    assert str(tiny_clip) not in card.content and str(tmp_path) not in card.content
    assert json.loads((export / "config.json").read_text())["run"]["rounds"] == 2
    # elsewhere, where the run's local copy is not, the export loads its base model from the hub (offline here: a
    # clear error)
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "clip": "/nowhere/clip-copy"}))
    with pytest.raises(RuntimeError, match="could not load the CLIP 'openai/clip-vit-base-patch32'"):
        FedClipClassifier.from_pretrained(export)


def test_push_to_hub_offline_is_a_clear_error(run, tmp_path, capsys):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1
    with pytest.raises(RuntimeError, match="could not push .*HF_HUB_OFFLINE"):
        push_to_hub(tmp_path, "someone/fedclip-adapter")
    export = tmp_path / "export"
    assert predict_main(["--run", str(run), "--export", str(export), "--push-to-hub", "someone/fedclip-adapter"]) == 1
    assert "could not push" in capsys.readouterr().err and (export / "adapter.safetensors").is_file()
    with pytest.raises(RuntimeError, match="neither a folder here nor a hub repository"):
        FedClipClassifier.from_pretrained("someone/fedclip-adapter")


def test_fast_preprocessing_matches_the_pil_clip_image_processor(tiny_clip, tmp_path):
    """The parallel, torchvision-backed path gives the features CLIP's reference (PIL) preprocessing gives."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(
        [(20, 20), (37, 50), (64, 48), (16, 16), (100, 30), (23, 41)] * 2
    ):  # resized and cropped
        small = rng.integers(0, 255, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.{'jpg' if i % 2 else 'png'}")
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(paths[-1])
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    fast, _, _ = encode_images(
        model, processor, DomainFolder("x", ["a"], paths, [0] * len(paths)), torch.device("cpu"), 5
    )
    settings = processor.image_processor.to_dict()
    reference = CLIPImageProcessorPil(
        **{k: settings[k] for k in ("size", "crop_size", "image_mean", "image_std", "resample")}
    )
    pixels = reference(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.nn.functional.cosine_similarity(fast, expected).min() > 0.9999
    assert (fast - expected).abs().max() < 0.05 * expected.abs().mean()


def test_a_run_folder_from_before_methods_named_their_class_still_loads(run, data, tmp_path):
    """Its config.yaml has no method._target_: the class comes from this app's conf/method/<name>.yaml."""
    import yaml

    old = shutil.copytree(run, tmp_path / "old")
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["method"]["_target_"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    images = domain_folder(data, "photo", list(CLASSES)).paths
    assert torch.equal(
        FedClipClassifier.from_run(old).predict(images).probabilities,
        FedClipClassifier.from_run(run).predict(images).probabilities,
    )
