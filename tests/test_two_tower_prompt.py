"""method=two_tower_prompt: PromptFL's context in the text tower and gated prompt tokens in the image tower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.config import config_from_file
from common.data import domain_folder
from common.features import encode_prompts
from common.local_data import client_data
from common.methods.base import load_method
from common.methods.promptfl import CONTEXT
from common.methods.two_tower_prompt import VISION_GATES, VISION_PROMPTS, PromptedImageTower, TwoTowerPrompt
from common.model import class_prompts, load_clip
from predict import FedClipClassifier
from predict.cli import accuracy
from tests.conftest import save_tiny_clip
from tests.test_predict import CLASSES, write_coloured_folder
from tests.test_promptfl import run_promptfl

TWO_TOWER = "method=two_tower_prompt method.lr=0.05 method.vision_lr=0.05 method.vision_depth=2"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_coloured_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """The tiny CLIP with two image layers, so that prompts can start after a frozen one."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), vision_layers=2)


@pytest.fixture(scope="module")
def run(clip, data, tmp_path_factory) -> Path:
    return run_promptfl(clip, data, tmp_path_factory.mktemp("two-tower"), method=TWO_TOWER)


@pytest.mark.parametrize("first", [0, 1])
def test_untrained_image_prompts_give_clips_image_features_exactly(clip, first):
    """Gates at zero: the prompted tower, from the kept inputs of any first layer, is CLIP's frozen image encoder to
    the bit, whatever the prompt tokens hold; a gate that opens changes the features."""
    model, _ = load_clip(str(clip), torch.device("cpu"))
    pixels = torch.randn(5, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.no_grad():
        frozen = model.get_image_features(pixel_values=pixels).pooler_output
        tower = PromptedImageTower(model, first, 1)
        prompts = torch.randn(1, 4, model.config.vision_config.hidden_size)
        assert torch.equal(tower(tower.inputs(pixels), prompts, torch.zeros(1)), frozen)
        assert not torch.allclose(tower(tower.inputs(pixels), prompts, torch.ones(1)), frozen)


def test_an_untrained_two_tower_classifier_is_zero_shot_clip(clip):
    """The initial weights (phrase context, closed gates) predict exactly as zero-shot CLIP, text and image side."""
    model, processor = load_clip(str(clip), torch.device("cpu"))
    method = TwoTowerPrompt(vision_depth=2)
    text = method.prompt_text(model, processor.tokenizer, list(CLASSES), "a picture of a {}")
    weights = {
        CONTEXT: text.initial_context("phrase"),
        VISION_PROMPTS: torch.randn(2, 4, model.config.vision_config.hidden_size),
        VISION_GATES: torch.zeros(2),
    }
    features = method.class_text(weights, model, processor, list(CLASSES), "a picture of a {}")
    zero_shot = encode_prompts(model, processor, class_prompts(list(CLASSES), "a picture of a {}"), torch.device("cpu"))
    torch.testing.assert_close(features, zero_shot, rtol=0, atol=1e-6)
    pixels = torch.randn(3, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.no_grad():
        assert torch.equal(
            method.image_features(weights, model)(pixels), model.get_image_features(pixel_values=pixels).pooler_output
        )


def test_layers_the_clip_does_not_have_are_refused(clip):
    model, _ = load_clip(str(clip), torch.device("cpu"))
    layers = model.config.vision_config.num_hidden_layers
    with pytest.raises(ValueError, match=f"vision_depth=2 do not fit this CLIP's {layers} image layers"):
        PromptedImageTower(model, layers - 1, 2)


def test_both_towers_train_travel_and_predict_reproduces_the_held_out_accuracy(run, data):
    """The context, the image prompts and their gates travel and move; the encoder's passes are counted; predict
    (run folder and export) runs the same prompted image tower and gets the run's held-out accuracy."""
    summary = json.loads((run / "summary.json").read_text())
    final = load_file(run / "prompt_final.safetensors")
    assert set(final) == {CONTEXT, VISION_PROMPTS, VISION_GATES}
    assert final[VISION_PROMPTS].shape[:2] == (2, 4) and bool((final[VISION_GATES] != 0).all())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["evaluate"]["sketch/all-loss"] != rows[0]["evaluate"]["sketch/all-loss"]
    # discovery encodes the 72 readable images once; every round's training and evaluation passes them through again
    assert summary["features_encoded"] > 3 * 3 * 8 * summary["rounds"]
    clf = FedClipClassifier.from_run(run)
    encoded = clf.encode(domain_folder(data, "sketch", clf.classes))
    assert accuracy(clf, encoded) == pytest.approx(summary["generalization"]["sketch"], abs=1e-6)
    assert accuracy(clf.zero_shot(), encoded) == pytest.approx(summary["zero_shot"]["sketch"], abs=1e-6)
    exported = FedClipClassifier.from_pretrained(clf.export(run.parent / "export"))
    assert torch.equal(
        exported.logits(exported.encode(domain_folder(data, "sketch", clf.classes)).features),
        clf.logits(encoded.features),
    )


def test_the_frozen_layers_output_is_kept_in_the_cache_on_disk(run, monkeypatch):
    """A restarted site, another Ray actor or a later run reads the inputs of the first prompted layer back: no image
    passes through the frozen layers again, and what it reads is what they compute."""
    cfg = config_from_file(run / "config.yaml")
    method = load_method(cfg)

    def computed_again(self, pixels):
        raise AssertionError("the frozen layers ran again")

    with monkeypatch.context() as patch:
        patch.setattr(PromptedImageTower, "inputs", computed_again)
        _, kept = method._tower(client_data(cfg, "art", 0, torch.device("cpu")))

    def entries() -> list[Path]:
        found = []
        for path in (Path(cfg.cache_dir) / "features").glob("*.safetensors"):
            with safe_open(str(path), "pt") as fh:
                if (fh.metadata() or {}).get("name") == "image-layer-0-inputs":
                    found.append(path)
        return found

    assert len(entries()) == 3  # one per training client
    for path in entries():
        path.unlink()
    _, fresh = method._tower(client_data(cfg, "art", 0, torch.device("cpu")))
    assert torch.equal(kept, fresh) and len(entries()) == 1  # computed again, and cached again
