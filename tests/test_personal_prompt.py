"""method=personal_prompt: PromptFL's shared context plus a personal part that stays at each site."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from client_app.app import app as client_app
from common.config import config_from_file
from common.features import encode_prompts
from common.local_data import client_data
from common.methods.personal_prompt import PERSONAL, PERSONAL_OPTIMIZER, SITE_PREFIX, PersonalPrompt
from common.methods.promptfl import CONTEXT
from common.model import class_prompts, load_clip
from predict import FedClipClassifier
from server_app.app import app as server_app
from tests.test_kept_state import RestartingGrid
from tests.test_predict import CLASSES, write_coloured_folder
from tests.test_promptfl import run_promptfl

PERSONAL_METHOD = "method=personal_prompt method.lr=0.05 method.personal_lr=0.05 method.class_residual=true"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_coloured_folder(tmp_path_factory.mktemp("data"))


def beside_promptfl(method: str, tiny_clip: Path, data: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The same 3-round run with method=promptfl and with `method` (same seed, same shared options)."""
    promptfl = run_promptfl(tiny_clip, data, tmp_path_factory.mktemp("promptfl"))
    return promptfl, run_promptfl(tiny_clip, data, tmp_path_factory.mktemp("method"), method=method)


@pytest.fixture(scope="module")
def runs(tiny_clip, data, tmp_path_factory) -> tuple[Path, Path]:
    return beside_promptfl(PERSONAL_METHOD, tiny_clip, data, tmp_path_factory)


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("blend_images", [None, 30.0])
def test_an_untrained_personal_part_gives_zero_shot_clip_exactly(tiny_clip, blend_images):
    """Untrained, the personal part changes nothing; with `blend_images` the site's own context (untrained: the global
    one) blended in at any weight leaves every class feature's direction, and so every logit, CLIP's zero-shot."""
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    method = PersonalPrompt(class_residual=True, blend_images=blend_images)
    text = method.prompt_text(model, processor.tokenizer, list(CLASSES), "a picture of a {}")
    ctx = text.initial_context("phrase")
    personal = method.initial_personal(ctx, len(CLASSES), model.config.projection_dim, torch.Generator().manual_seed(0))
    assert set(personal) == {"u", "v", "classes"} | ({"own", "blend"} if blend_images is not None else set())
    if blend_images is not None:
        personal["blend"] = torch.tensor([0.4])
    weights = {CONTEXT: ctx, **{SITE_PREFIX + k: v for k, v in personal.items()}}
    features = method.class_text(weights, model, processor, list(CLASSES), "a picture of a {}")
    zero_shot = encode_prompts(model, processor, class_prompts(list(CLASSES), "a picture of a {}"), torch.device("cpu"))
    if blend_images is not None:
        features, zero_shot = F.normalize(features, dim=-1), F.normalize(zero_shot, dim=-1)
    torch.testing.assert_close(features, zero_shot, rtol=0, atol=1e-6)


def test_a_blend_of_zero_images_is_each_sites_local_only_prompt_and_predict_reproduces_any_blend(
    tiny_clip, data, tmp_path
):
    """`blend_images=0` weights the site's own context 1: its personalization test is local_prompt's (the same
    context, tuned alone) to the bit, every round. With a blend in between,
    the site's folder holds both contexts and the weight, and predict scores its test split as its last test did."""
    local = run_promptfl(tiny_clip, data, tmp_path / "local", method="method=local_prompt method.lr=0.05")
    own = run_promptfl(
        tiny_clip,
        data,
        tmp_path / "own",
        method="method=personal_prompt method.lr=0.05 method.rank=0 method.blend_images=0",
    )
    for a, b in zip(rows_of(local)[1:], rows_of(own)[1:], strict=True):
        for client in ("art", "photo"):
            assert b["evaluate"][f"{client}/personalized-test-acc"] == a["evaluate"][f"{client}/test-acc"]
    blended = run_promptfl(
        tiny_clip, data, tmp_path / "blend", method="method=personal_prompt method.lr=0.05 method.blend_images=30"
    )
    for weights in site_weights(blended).values():
        assert {SITE_PREFIX + "own", SITE_PREFIX + "blend"} <= set(weights)
        assert 0 < weights[SITE_PREFIX + "blend"].item() < 1


def test_the_shared_context_is_promptfls_and_only_it_travels(runs):
    """The personal part changes neither the global context nor what is sent: the held-out accuracy is PromptFL's to
    the bit; the personalization test (global + personal) is the one that moves."""
    promptfl, personal = runs
    assert torch.equal(
        load_file(personal / "prompt_final.safetensors")[CONTEXT],
        load_file(promptfl / "prompt_final.safetensors")[CONTEXT],
    )
    assert set(load_file(personal / "prompt_final.safetensors")) == {CONTEXT}  # the server's folder: global only
    a, b = (json.loads((run / "summary.json").read_text()) for run in runs)
    assert a["generalization"] == b["generalization"] and a["bytes_total"] == b["bytes_total"]
    last = rows_of(personal)[-1]["evaluate"]
    assert "art/personalized-test-acc" in last and "photo/personalized-test-acc" in last
    assert "sketch/personalized-test-acc" not in last  # the held-out domain has no part of its own
    assert b["personalization"] != a["personalization"]


def site_weights(run: Path, weights_name: str = "prompt") -> dict[str, dict[str, torch.Tensor]]:
    """Each training site's own weights after the run, checked: `fedclip-predict --run <its folder> --which final`
    scores its test split as its own last evaluation did; the held-out site has none."""
    key = json.loads((run / "run.json").read_text())["run_key"]
    last, found = rows_of(run)[-1]["evaluate"], {}
    for client in ("art", "photo"):
        site = run.parent / "clients" / key / client
        found[client] = load_file(site / f"{weights_name}_final.safetensors")
        clf = FedClipClassifier.from_run(site, which="final")
        local = client_data(config_from_file(site / "config.yaml"), client, 0, torch.device("cpu"))
        test = torch.as_tensor(local.split.test)
        accuracy = (clf.logits(local.feats.image[test]).argmax(1) == local.feats.labels[test]).float().mean().item()
        assert accuracy == pytest.approx(last[f"{client}/personalized-test-acc"], abs=1e-6)
    assert not (run.parent / "clients" / key / "sketch" / f"{weights_name}_final.safetensors").exists()
    return found


def test_the_site_keeps_global_and_personal_and_predict_reproduces_its_personal_accuracy(runs):
    """After the run each training client's folder holds the final context and its personal part, which predict
    reproduces."""
    _, personal = runs
    for weights in site_weights(personal).values():
        assert set(weights) == {CONTEXT, *(SITE_PREFIX + k for k in ("u", "v", "classes"))}
        assert torch.equal(weights[CONTEXT], load_file(personal / "prompt_final.safetensors")[CONTEXT])


@pytest.mark.parametrize(
    "method, weights_name",
    [
        ("method=promptfl method.lr=0.05", "prompt"),
        (PERSONAL_METHOD, "prompt"),
        ("method=conditioned_prompt method.lr=0.05", "prompt"),
        ("method=fedclip", "adapter"),
    ],
)
def test_what_a_site_fine_tuned_after_the_last_round_is_its_own_and_predict_reproduces_it(
    method, weights_name, tiny_clip, data, tmp_path
):
    """`personalize_epochs`: the weights a site tuned for its last personalization test are not thrown away; its
    folder holds them (the server's, the global ones), and predict scores its test split as that test did."""
    run = run_promptfl(tiny_clip, data, tmp_path, rounds=2, method=f"{method} method.personalize_epochs=2")
    server = load_file(run / f"{weights_name}_final.safetensors")
    for weights in site_weights(run, weights_name).values():
        shared = sorted(set(weights) & set(server))
        assert shared and any(not torch.equal(weights[name], server[name]) for name in shared)  # tuned at the site


def restarted_rows(method: str, tiny_clip: Path, data: Path, tmp_path: Path) -> list[dict]:
    """The evaluation rows of a 3-round run of `method` in which every SuperNode restarts before round 3."""
    overrides = (
        f"{method} dataset=folder dataset.root={data} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds=3 training.batch_size=8 cache_dir={tmp_path / 'cache'} output_dir={tmp_path / 'out'}"
    )
    run_config = {"overrides": overrides}
    server_app(RestartingGrid(client_app, run_config, 3, restart_round=3), Context(1, 0, {}, RecordDict(), run_config))
    [restarted] = (p.parent for p in (tmp_path / "out").glob("*/config.yaml"))
    return [r["evaluate"] for r in rows_of(restarted)]


def test_a_site_restarted_mid_run_ends_as_the_run_uninterrupted(runs, tiny_clip, data, tmp_path):
    """The personal part and both optimisers' moments come back from the site's files after every SuperNode restarts
    before round 3."""
    _, personal = runs
    assert restarted_rows(PERSONAL_METHOD, tiny_clip, data, tmp_path) == [r["evaluate"] for r in rows_of(personal)]


def test_a_personal_part_of_another_shape_is_dropped_with_a_warning(runs, caplog):
    """A damaged or stale personal part (here: one class too many) never crashes the round: the site starts again
    from the global context."""
    _, personal = runs
    site_cfg = next((personal.parent / "clients").glob("*/art/config.yaml"))
    local = client_data(config_from_file(site_cfg), "art", 0, torch.device("cpu"))
    method, ctx = PersonalPrompt(class_residual=True), torch.zeros(4, 32)
    kept = {
        PERSONAL: {"u": torch.zeros(4, 2), "v": torch.zeros(2, 32), "classes": torch.zeros(4, 24)},
        PERSONAL_OPTIMIZER: {"0.step": torch.tensor(3.0)},
    }
    with caplog.at_level(logging.WARNING):
        assert method.kept_personal(local, kept, ctx) is None
    assert "starts from the global one" in caplog.text and not kept
