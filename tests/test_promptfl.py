"""PromptFL: the context vectors through CLIP's frozen text tower, end to end, with the trust options, on the wire,
and in
fedclip-predict and its export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from client_app.app import app as client_app
from common.data import domain_folder
from common.features import encode_prompts
from common.methods.promptfl import CONTEXT, PromptFL
from common.model import class_prompts, load_clip
from predict import FedClipClassifier
from predict.cli import main as predict_main
from predict.export import TEXT_FEATURES, TEXT_FILE, weights_file
from server_app.app import app as server_app
from tests.conftest import save_tiny_clip
from tests.inprocess import run_folder, run_in_process
from tests.test_predict import CLASSES, write_coloured_folder
from tests.test_secagg import QUANTIZATION_STEP

CONTEXT_FILE = weights_file(PromptFL.weights_name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_coloured_folder(tmp_path_factory.mktemp("data"))


def run_promptfl(
    tiny_clip: Path,
    data: Path,
    tmp: Path,
    extra: str = "",
    rounds: int = 3,
    method: str = "method=promptfl method.lr=0.05",
) -> Path:
    """One in-process PromptFL run (3 nodes: art and photo train, sketch held out; `method` another method); its run
    folder."""
    overrides = (
        f"{method} dataset=folder dataset.root={data} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds={rounds} training.batch_size=8 cache_dir={tmp / 'cache'} output_dir={tmp / 'out'} {extra}"
    )
    run_in_process(server_app, client_app, overrides, 3)
    folder = run_folder(tmp / "out")
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
        # the features depend on the context
        assert not torch.allclose(text(ctx + 0.1 * torch.randn(ctx.shape)), zero_shot, atol=1e-3)


def test_random_context_too_long_for_the_text_encoder_is_a_clear_error(tiny_clip):
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    with pytest.raises(ValueError, match="lower method.n_ctx"):
        # 16 positions
        PromptFL(init="random", n_ctx=16).prompt_text(model, processor.tokenizer, list(CLASSES), "a picture of a {}")


@pytest.fixture(scope="module")
def run(tiny_clip, data, tmp_path_factory) -> Path:
    """A real 3-round PromptFL run folder, shared by the tests that only read it."""
    return run_promptfl(tiny_clip, data, tmp_path_factory.mktemp("run"))


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def accuracy(clf: FedClipClassifier, encoded) -> float:
    return (clf.logits(encoded.features).argmax(1) == encoded.labels).float().mean().item()


def test_promptfl_trains_and_sends_only_the_context_and_predict_reproduces_it(run, data):
    summary = summary_of(run)
    width = 32  # the tiny CLIP's text width
    assert summary["method"] == "promptfl" and summary["trained_parameters"] == 4 * width
    assert 4 * 4 * width <= summary["bytes_up_per_client_per_round"] <= 4 * 4 * width + 512  # one float32 context back
    # every readable image once, at discovery: training never encodes images
    assert summary["features_encoded"] == 3 * 3 * 8
    assert set(load_file(run / "prompt_best.safetensors")) == {CONTEXT}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the prompt moved the held-out accuracy
    assert rows[-1]["evaluate"]["sketch/all-acc"] != rows[0]["evaluate"]["sketch/all-acc"]
    clf = FedClipClassifier.from_run(run)
    encoded = clf.encode(domain_folder(data, "sketch", clf.classes))
    assert accuracy(clf, encoded) == pytest.approx(summary["generalization"]["sketch"], abs=1e-6)
    assert accuracy(clf.zero_shot(), encoded) == pytest.approx(summary["zero_shot"]["sketch"], abs=1e-6)


def test_the_command_reproduces_the_runs_held_out_accuracy(run, data, tmp_path, capsys):
    """fedclip-predict on the run folder, then on its export: the held-out row is the run's own result both times."""
    summary, export = summary_of(run), tmp_path / "export"
    for args in (["--run", str(run), str(data), "--export", str(export)], ["--model", str(export), str(data)]):
        assert predict_main(args) == 0
        err = capsys.readouterr().err
        rows = {
            line.split()[0]: line.split() for line in err.splitlines() if line.split()[:1] in (["domain"], ["sketch"])
        }
        header, sketch = rows["domain"], rows["sketch"]
        assert header[2] == "prompt" and sketch[1] == "24"
        assert float(sketch[2]) == pytest.approx(100 * summary["generalization"]["sketch"], abs=0.006)
        assert float(sketch[3]) == pytest.approx(100 * summary["zero_shot"]["sketch"], abs=0.006)
    assert (export / CONTEXT_FILE).is_file()


def test_export_holds_the_context_and_the_class_features_it_gives(run, data, tmp_path, tiny_clip):
    """The export predicts exactly what the run folder predicts; its class features are the context's through the text
    tower; and plain transformers code (CLIP's zero-shot formula with those features) gets the run's held-out
    accuracy."""
    clf = FedClipClassifier.from_run(run)
    folder = clf.export(tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", TEXT_FILE, "config.json", CONTEXT_FILE]
    config = json.loads((folder / "config.json").read_text())
    assert (config["weights"], config["method"]["_target_"], config["classes"]) == (
        "prompt",
        "common.methods.promptfl.PromptFL",
        list(CLASSES),
    )
    assert (
        config["run"]["method"] == "promptfl" and config["run"]["generalization"] == summary_of(run)["generalization"]
    )
    assert "PromptFL prompt context (4 vectors, 128 parameters" in (folder / "README.md").read_text()
    context, text = load_file(folder / CONTEXT_FILE)[CONTEXT], load_file(folder / TEXT_FILE)[TEXT_FEATURES]
    assert torch.equal(context, load_file(run / "prompt_best.safetensors")[CONTEXT])
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    assert torch.equal(text, PromptFL().class_text({CONTEXT: context}, model, processor, CLASSES, "a picture of a {}"))

    loaded = FedClipClassifier.from_pretrained(folder)
    sketch = domain_folder(data, "sketch", clf.classes)
    encoded = clf.encode(sketch)
    assert torch.equal(loaded.logits(encoded.features), clf.logits(encoded.features))
    assert torch.equal(loaded.weights[CONTEXT], context)
    assert accuracy(loaded.zero_shot(), encoded) == pytest.approx(summary_of(run)["zero_shot"]["sketch"], abs=1e-6)

    from transformers import CLIPModel, CLIPProcessor  # what a user without this app writes

    plain, plain_processor = CLIPModel.from_pretrained(config["clip"]), CLIPProcessor.from_pretrained(config["clip"])
    with torch.no_grad():
        pixels = plain_processor(images=[Image.open(p).convert("RGB") for p in sketch.paths], return_tensors="pt")
        image = plain.get_image_features(**pixels).pooler_output
        logits = plain.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    assert torch.equal(logits.argmax(1), clf.logits(encoded.features).argmax(1))
    torch.testing.assert_close(logits, clf.logits(encoded.features), rtol=0, atol=1e-3)


def test_a_clip_of_another_size_is_refused(run, tmp_path):
    """From the run, the method's hook says why the context does not fit; an export (whose class features need no
    text encoder) is refused by the CLIP's fingerprint."""
    folder = FedClipClassifier.from_run(run).export(tmp_path / "export")
    other = save_tiny_clip(tmp_path / "wide", text_width=48)
    with pytest.raises(ValueError, match="does not fit: the context was trained for text width 32, this CLIP's is 48"):
        FedClipClassifier.from_run(run, clip=str(other))
    with pytest.raises(ValueError, match="is not the one the weights were trained with"):
        FedClipClassifier.from_pretrained(folder, clip=str(other))


@pytest.mark.parametrize(
    "extra",
    [
        "strategy.secagg.enabled=true",
        "strategy.dp.side=server strategy.dp.noise_multiplier=0.0",
        "strategy.transport_dtype=bfloat16",
        "strategy.aggregation=median",
        "method.personalize_epochs=1",
    ],
)
def test_promptfl_with_the_trust_options(extra, tiny_clip, data, tmp_path):
    run = run_promptfl(tiny_clip, data, tmp_path, extra, rounds=2)
    summary = json.loads((run / "summary.json").read_text())
    final = load_file(run / "prompt_final.safetensors")[CONTEXT]
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    start = (
        PromptFL().prompt_text(model, processor.tokenizer, list(CLASSES), "a picture of a {}").initial_context("phrase")
    )
    assert not torch.allclose(final, start)  # the context was trained and combined
    assert summary["generalization"]["sketch"] is not None
    if "personalize" in extra:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert "art/personalized-test-acc" in rows[1]["evaluate"]


def context_moved(run: Path, tiny_clip: Path) -> float:
    """The L2 distance of a run's final context from the one every run starts from (the phrase's token embeddings)."""
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    start = (
        PromptFL().prompt_text(model, processor.tokenizer, list(CLASSES), "a picture of a {}").initial_context("phrase")
    )
    return float((load_file(run / "prompt_final.safetensors")[CONTEXT] - start).norm())


def test_secagg_mean_of_the_contexts_equals_the_plain_mean(tiny_clip, data, tmp_path):
    """SecAgg+ masks the context updates; unmasked, their mean is the plain mean within the quantization step."""
    plain = run_promptfl(tiny_clip, data, tmp_path / "plain", rounds=1)
    secure = run_promptfl(tiny_clip, data, tmp_path / "secure", "strategy.secagg.enabled=true", rounds=1)
    a, b = (load_file(run / "prompt_final.safetensors")[CONTEXT] for run in (plain, secure))
    # stochastic rounding: not bit-equal, within one step
    assert 0 < float((a - b).abs().max()) <= 2 * QUANTIZATION_STEP
    assert context_moved(secure, tiny_clip) > 1000 * QUANTIZATION_STEP
    rows = [json.loads(line) for line in (secure / "metrics.jsonl").read_text().splitlines()]
    assert {k: v for k, v in rows[1]["train"].items() if k.endswith("secagg-clipped")} == {
        "art/secagg-clipped": 0.0,
        "photo/secagg-clipped": 0.0,
    }


@pytest.mark.parametrize("side", ["server", "client"])
def test_dp_clips_the_context_updates_and_adds_noise(side, tiny_clip, data, tmp_path):
    """One round: without noise the new context is the mean of updates clipped to L2 norm 0.01; with noise it differs
    from that and epsilon is reported."""
    dp = f"strategy.dp.side={side} strategy.dp.clipping_norm=0.01"
    clean = run_promptfl(tiny_clip, data, tmp_path / "clean", f"{dp} strategy.dp.noise_multiplier=0", rounds=1)
    noisy = run_promptfl(tiny_clip, data, tmp_path / "noisy", f"{dp} strategy.dp.noise_multiplier=1", rounds=1)
    assert 0 < context_moved(clean, tiny_clip) <= 0.01 * (1 + 1e-5)
    a, b = (load_file(run / "prompt_final.safetensors")[CONTEXT] for run in (clean, noisy))
    assert float((a - b).norm()) > 0.001  # noise std 1 x 0.01 / 2 clients on each of 128 numbers
    assert summary_of(noisy)["dp"]["epsilon"] > 0


def test_a_vit_b32_sized_context_is_under_a_fiftieth_of_the_adapter_on_the_wire(data, tmp_path):
    """Bytes counted on the messages of real runs, with a CLIP of ViT-B/32's text width (512), text length (77) and
    projection (512), its towers 1 layer deep: FedCLIP's adapter against PromptFL's 16 random context vectors."""
    clip = save_tiny_clip(tmp_path / "clip", projection_dim=512, text_width=512, text_positions=77)
    fedclip = summary_of(run_promptfl(clip, data, tmp_path / "fedclip", rounds=1, method="method=fedclip"))
    promptfl = summary_of(
        run_promptfl(clip, data, tmp_path / "promptfl", "method.init=random method.n_ctx=16", rounds=1)
    )
    assert (fedclip["trained_parameters"], promptfl["trained_parameters"]) == (2 * (512 * 512 + 512), 16 * 512)
    for key in ("bytes_up_per_client_per_round", "bytes_down_per_client_per_round", "bytes_per_client_per_round"):
        assert 50 * promptfl[key] <= fedclip[key], key
    # one float32 context and its header
    assert 16 * 512 * 4 <= promptfl["bytes_up_per_client_per_round"] <= 16 * 512 * 4 + 512


def test_resume_goes_on_with_the_context(tiny_clip, data, tmp_path):
    first = run_promptfl(tiny_clip, data, tmp_path / "first", rounds=2)
    resumed = run_promptfl(tiny_clip, data, tmp_path / "resumed", f"resume={first}", rounds=3)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert (resumed / "prompt_final.safetensors").exists()
