"""PromptFL: the context vectors through CLIP's frozen text tower, end to end, with the trust options, and in fedclip-predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from safetensors.torch import load_file

from client_app.app import app as client_app
from client_app.predict import FedClipClassifier
from common.data import domain_folder
from common.features import encode_prompts
from common.methods.promptfl import CONTEXT, PromptFL
from common.model import AttentionAdapter, class_prompts, load_clip
from server_app.app import app as server_app
from server_app.report import message_bytes
from tests.inprocess import run_in_process
from tests.test_predict import CLASSES, write_coloured_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_coloured_folder(tmp_path_factory.mktemp("data"))


def run_promptfl(tiny_clip: Path, data: Path, tmp: Path, extra: str = "", rounds: int = 3) -> Path:
    overrides = (f"method=promptfl dataset=folder dataset.root={data} dataset.held_out=sketch model.name_or_path={tiny_clip} "
                 f"training.rounds={rounds} training.batch_size=8 method.lr=0.05 cache_dir={tmp / 'cache'} output_dir={tmp / 'out'} {extra}")
    run_in_process(server_app, client_app, overrides, 3)
    [folder] = (tmp / "out").iterdir()
    return folder


@pytest.mark.parametrize("template", ["a picture of a {}", "a picture of a {} cat"])
def test_context_set_to_the_prompts_words_gives_zero_shot_clip(tiny_clip, template):
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    text = PromptFL().prompt_text(model, processor.tokenizer, list(CLASSES), template)
    ctx = text.initial_context("phrase")
    assert ctx.shape == (4, model.config.text_config.hidden_size)  # "a picture of a": 4 tokens
    with torch.no_grad():
        prompted = text(ctx)
    zero_shot = encode_prompts(model, processor, class_prompts(list(CLASSES), template), torch.device("cpu"))
    torch.testing.assert_close(prompted, zero_shot, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(text(ctx + 0.1 * torch.randn(ctx.shape)), zero_shot, atol=1e-3)  # the features depend on the context


def test_random_context_too_long_for_the_text_encoder_is_a_clear_error(tiny_clip):
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    with pytest.raises(ValueError, match="lower method.n_ctx"):
        PromptFL(init="random", n_ctx=16).prompt_text(model, processor.tokenizer, list(CLASSES), "a picture of a {}")  # 16 positions


def test_promptfl_trains_and_sends_only_the_context_and_predict_reproduces_it(tiny_clip, data, tmp_path):
    run = run_promptfl(tiny_clip, data, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    width = 32  # the tiny CLIP's text width
    assert summary["method"] == "promptfl" and summary["trained_parameters"] == 4 * width
    assert 4 * 4 * width <= summary["bytes_up_per_client_per_round"] <= 4 * 4 * width + 512  # one float32 context back
    assert summary["features_encoded"] == 3 * 3 * 8  # every readable image once, at discovery: training never encodes images
    assert set(load_file(run / "prompt_best.safetensors")) == {CONTEXT}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["evaluate"]["sketch/all-acc"] != rows[0]["evaluate"]["sketch/all-acc"]  # the prompt moved the held-out accuracy
    clf = FedClipClassifier.from_run(run)
    encoded = clf.encode(domain_folder(data, "sketch", clf.classes))
    trained = (clf.logits(encoded.features).argmax(1) == encoded.labels).float().mean().item()
    zero_shot = (clf.zero_shot().logits(encoded.features).argmax(1) == encoded.labels).float().mean().item()
    assert trained == pytest.approx(summary["generalization"]["sketch"], abs=1e-6)
    assert zero_shot == pytest.approx(summary["zero_shot"]["sketch"], abs=1e-6)
    with pytest.raises(ValueError, match="PromptFL"):
        clf.export(tmp_path / "export")


@pytest.mark.parametrize("extra", ["strategy.secagg.enabled=true", "strategy.dp.side=server strategy.dp.noise_multiplier=0.0",
                                   "strategy.transport_dtype=bfloat16", "strategy.aggregation=median", "method.personalize_epochs=1"])
def test_promptfl_with_the_trust_options(extra, tiny_clip, data, tmp_path):
    run = run_promptfl(tiny_clip, data, tmp_path, extra, rounds=2)
    summary = json.loads((run / "summary.json").read_text())
    final = load_file(run / "prompt_final.safetensors")[CONTEXT]
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    start = PromptFL().prompt_text(model, processor.tokenizer, list(CLASSES), "a picture of a {}").initial_context("phrase")
    assert not torch.allclose(final, start)  # the context was trained and combined
    assert summary["generalization"]["sketch"] is not None
    if "personalize" in extra:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert "art/personalized-test-acc" in rows[1]["evaluate"]


def test_a_vit_b32_sized_context_is_under_a_fiftieth_of_the_adapter_on_the_wire():
    context = ArrayRecord({CONTEXT: torch.zeros(16, 512)})  # 16 context vectors, text width 512
    adapter = ArrayRecord(AttentionAdapter(512).state_dict())  # ViT-B/32's projection dim
    down = lambda record: message_bytes(Message(RecordDict({"arrays": record}), dst_node_id=1, message_type="train"))  # noqa: E731
    assert down(context) * 50 <= down(adapter)
    assert np.isclose(down(adapter) / down(context), 2 * (512 * 512 + 512) / (16 * 512), rtol=0.01)


def test_resume_goes_on_with_the_context(tiny_clip, data, tmp_path):
    first = run_promptfl(tiny_clip, data, tmp_path / "first", rounds=2)
    resumed = run_promptfl(tiny_clip, data, tmp_path / "resumed", f"resume={first}", rounds=3)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert (resumed / "prompt_final.safetensors").exists()

