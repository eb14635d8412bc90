"""method=conditioned_prompt: PromptFL's context plus a shared generator from a site's image signature to a context
offset; the signature never leaves the site."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict
from safetensors.torch import load_file

from common import wire
from common.config import config_from_file
from common.features import encode_prompts
from common.local_data import client_data
from common.methods.conditioned_prompt import GENERATOR, ConditionedPrompt
from common.methods.promptfl import CONTEXT
from common.model import class_prompts, load_clip
from common.transport import encode
from tests.test_personal_prompt import beside_promptfl, restarted_rows, rows_of, site_weights
from tests.test_predict import CLASSES, write_coloured_folder

CONDITIONED = "method=conditioned_prompt method.lr=0.05 method.generator_lr=0.2 method.rank=2"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_coloured_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tiny_clip, data, tmp_path_factory) -> tuple[Path, Path]:
    return beside_promptfl(CONDITIONED, tiny_clip, data, tmp_path_factory)


def test_an_untrained_generator_gives_zero_shot_clip_exactly(tiny_clip):
    """A starts at zero: whatever a site's signature, its prompt is the phrase's, CLIP's zero-shot features."""
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    method = ConditionedPrompt()
    text = method.prompt_text(model, processor.tokenizer, list(CLASSES), "a picture of a {}")
    ctx = text.initial_context("phrase")
    generator = {GENERATOR[0]: torch.zeros(4 * 2, 24), GENERATOR[1]: torch.randn(2, 32)}
    offset = method.offset(generator, torch.nn.functional.normalize(torch.randn(24), dim=0), len(ctx))
    assert torch.equal(offset, torch.zeros_like(ctx))
    with torch.no_grad():
        features = text(ctx + offset)
    zero_shot = encode_prompts(model, processor, class_prompts(list(CLASSES), "a picture of a {}"), torch.device("cpu"))
    torch.testing.assert_close(features, zero_shot, rtol=0, atol=1e-6)


def test_the_context_is_promptfls_and_the_generator_travels(runs):
    """The context trains as PromptFL's (held-out accuracy equal to the bit); the generator is averaged and moves;
    the personalization test (context + the site's generated offset + its own part) differs."""
    promptfl, conditioned = runs
    final = load_file(conditioned / "prompt_final.safetensors")
    assert torch.equal(final[CONTEXT], load_file(promptfl / "prompt_final.safetensors")[CONTEXT])
    assert set(final) == {CONTEXT, *GENERATOR} and final[GENERATOR[0]].abs().sum() > 0
    a, b = (json.loads((run / "summary.json").read_text()) for run in runs)
    assert a["generalization"] == b["generalization"]
    assert b["bytes_total"] > a["bytes_total"]  # the generator travels
    last = rows_of(conditioned)[-1]["evaluate"]
    assert "art/personalized-test-acc" in last and "sketch/personalized-test-acc" not in last
    assert b["personalization"] != a["personalization"]


def test_a_site_predicts_with_its_own_prompt_and_the_signature_stays(runs):
    """The site's folder holds its prompt (context + generated offset) and personal part, never the signature or the
    generator; fedclip-predict on it reproduces the site's personalized accuracy."""
    _, conditioned = runs
    for weights in site_weights(conditioned).values():
        assert set(weights) == {CONTEXT, "personal/u", "personal/v"}
        assert not torch.equal(weights[CONTEXT], load_file(conditioned / "prompt_final.safetensors")[CONTEXT])


def test_a_site_restarted_mid_run_ends_as_the_run_uninterrupted(runs, tiny_clip, data, tmp_path):
    """The signature, the personal part and the optimisers' moments come back from the site's files."""
    _, conditioned = runs
    assert restarted_rows(CONDITIONED, tiny_clip, data, tmp_path) == [r["evaluate"] for r in rows_of(conditioned)]


def test_a_sites_generator_update_gives_the_server_its_image_signature(runs):
    """What docs/security.md says the shared part reveals: the generator's gradient is an outer product with the site's
    signature, so the leading right singular vector of one site's update of A is close to its signature (up to sign).
    SecAgg+ leaves the server the mean over sites only."""
    _, conditioned = runs
    site_cfg = next((conditioned.parent / "clients").glob("*/art/config.yaml"))
    local = client_data(config_from_file(site_cfg), "art", 0, torch.device("cpu"))
    method = ConditionedPrompt(generator_lr=0.2)
    sent = method.initial_weights(local.cfg, local.feats.image.shape[1])
    content = RecordDict({wire.ARRAYS: encode(sent, "float32")})
    trained, _ = method.train(local, content, {}, 1)
    delta = trained[GENERATOR[0]] - sent[GENERATOR[0]]
    leading = torch.linalg.svd(delta).Vh[0]
    mean = torch.nn.functional.normalize(local.feats.image[local.split.train], dim=-1).mean(0)
    assert abs(float(leading @ torch.nn.functional.normalize(mean, dim=0))) > 0.8  # 0.83 here; AdamW blurs it a little
