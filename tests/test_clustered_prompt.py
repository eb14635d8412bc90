"""method=clustered_prompt: PromptFL's context for everyone, and cluster contexts averaged over the sites alike."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.config import config_from_file, load_config
from common.features import encode_prompts
from common.local_data import client_data
from common.methods.base import Update, load_method
from common.methods.clustered_prompt import (
    CLUSTER,
    CLUSTER_OPTIMIZER,
    CLUSTERS,
    KEYS,
    MEMBERS,
    ClusteredPrompt,
    nearest_cluster,
)
from common.methods.promptfl import CONTEXT
from common.model import class_prompts, load_clip
from server_app.aggregation import aggregate_adapters
from server_app.options import refuse_options
from tests.test_personal_prompt import beside_promptfl, restarted_rows, rows_of, site_weights
from tests.test_predict import CLASSES, write_coloured_folder

CLUSTERED = "method=clustered_prompt method.lr=0.05 method.clusters=2"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_coloured_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(tiny_clip, data, tmp_path_factory) -> tuple[Path, Path]:
    return beside_promptfl(CLUSTERED, tiny_clip, data, tmp_path_factory)


def test_untrained_every_cluster_context_gives_zero_shot_clip_exactly(tiny_clip):
    model, processor = load_clip(str(tiny_clip), torch.device("cpu"))
    cfg = load_config(f"model.name_or_path={tiny_clip} model.prompt='a picture of a {{}}'")
    weights = ClusteredPrompt(clusters=3).initial_weights(cfg, model.config.projection_dim)
    assert weights[CLUSTERS].shape[0] == 3 and not weights[KEYS].any() and not weights[MEMBERS].any()
    zero_shot = encode_prompts(model, processor, class_prompts(list(CLASSES), "a picture of a {}"), torch.device("cpu"))
    for row in weights[CLUSTERS]:
        features = ClusteredPrompt().class_text({CONTEXT: row}, model, processor, list(CLASSES), "a picture of a {}")
        torch.testing.assert_close(features, zero_shot, rtol=0, atol=1e-6)


def update(client: str, index: int, signature: list[float], value: float, member: bool, k: int = 2) -> Update:
    """A site's update: the global context at `value`, its cluster's row at `value` and its signature in its key row."""
    clusters, keys, members = np.zeros((k, 1, 2), np.float32), np.zeros((k, 2), np.float32), np.zeros(k, np.float32)
    clusters[index], keys[index], members[index] = value, signature, float(member)
    return Update(
        client, {CONTEXT: np.full((1, 2), value, np.float32), CLUSTERS: clusters, KEYS: keys, MEMBERS: members}, 1.0
    )


def mean(updates: list[Update]) -> dict[str, np.ndarray]:
    return aggregate_adapters([u.state for u in updates], [u.num_examples for u in updates], "mean", 0)


def test_round_one_takes_far_apart_signatures_as_keys_and_then_each_cluster_averages_its_own():
    """Round 1 (no keys: every site tuned cluster 0): the keys are the first site's signature and the one least like
    it, and every cluster starts from the mean context. Then each site joins the nearest key, and each cluster's context
    and key are its members' mean, the global context everyone's."""
    method, a, b = ClusteredPrompt(clusters=2), [1.0, 0.0], [0.0, 1.0]
    first = method.aggregate(
        [update("s1", 0, a, 1.0, False), update("s2", 0, [0.9, 0.1], 2.0, False), update("s3", 0, b, 3.0, False)], mean
    )
    np.testing.assert_allclose(first[KEYS], [a, b])
    np.testing.assert_allclose(first[CLUSTERS], np.full((2, 1, 2), 2.0))
    keys = torch.as_tensor(first[KEYS])
    assert [nearest_cluster(keys, torch.tensor(s)) for s in (a, [0.9, 0.1], b)] == [0, 0, 1]
    second = method.aggregate(
        [update("s1", 0, a, 4.0, True), update("s2", 0, [0.8, 0.6], 6.0, True), update("s3", 1, b, 9.0, True)], mean
    )
    np.testing.assert_allclose(second[CONTEXT], [[19 / 3, 19 / 3]], rtol=1e-6)
    np.testing.assert_allclose(second[CLUSTERS][:, 0, 0], [5.0, 9.0])
    np.testing.assert_allclose(second[KEYS], [[0.9, 0.3], b], rtol=1e-6)
    np.testing.assert_allclose(second[MEMBERS], [2 / 3, 1 / 3], rtol=1e-6)


def test_a_cluster_without_members_stays_as_it_was():
    method = ClusteredPrompt(clusters=2)
    updates = [update("s1", 0, [1.0, 0.0], 4.0, True), update("s2", 0, [1.0, 0.0], 6.0, True)]
    for u in updates:
        u.state[CLUSTERS][1], u.state[KEYS][1] = 7.0, [0.0, 1.0]  # what they received for cluster 1
    merged = method.aggregate(updates, mean)
    np.testing.assert_allclose(merged[CLUSTERS][:, 0, 0], [5.0, 7.0])
    np.testing.assert_allclose(merged[KEYS][1], [0.0, 1.0])


def refusing_below_three(updates: list[Update]) -> dict[str, np.ndarray]:
    """A rule that refuses fewer than 3 updates, as bulyan refuses fewer than 4f + 3."""
    if len(updates) < 3:
        raise ValueError("needs 3 updates")
    return mean(updates)


def trimmed_mean(updates: list[Update]) -> dict[str, np.ndarray]:
    """trimmed_mean cutting one update from each end of every coordinate: NaN with 2."""
    return aggregate_adapters([u.state for u in updates], [1.0] * len(updates), "trimmed_mean", 1)


@pytest.mark.parametrize("rule", [trimmed_mean, refusing_below_three])
def test_a_cluster_too_small_for_the_robust_rule_stays_as_it_was(rule, caplog):
    """A cluster with fewer members than the strategy's rule needs keeps what it had (as its non-members sent it
    back), with a warning, and never a NaN."""
    method = ClusteredPrompt(clusters=2)
    updates = [update(f"s{i}", 0, [0.0, 1.0], 1.0 + i, True) for i in range(3)]
    updates += [update("a", 1, [1.0, 0.0], 4.0, True), update("b", 1, [1.0, 0.0], 6.0, True)]
    for u in updates[:3]:
        u.state[CLUSTERS][1], u.state[KEYS][1] = 7.0, [1.0, 0.0]
    with caplog.at_level(logging.WARNING):
        merged = method.aggregate(updates, rule)
    assert all(np.isfinite(v).all() for v in merged.values())
    assert merged[CLUSTERS][1, 0, 0] == 7.0 and merged[CLUSTERS][0, 0, 0] == 2.0
    assert "cluster 1: the rule cannot combine its 2 update(s)" in caplog.text


def test_the_global_context_is_promptfls_and_each_site_predicts_with_its_clusters(runs):
    """The global context trains as PromptFL's (held-out accuracy equal to the bit); the clusters travel and move; a
    site's folder holds its cluster's context in PromptFL's layout, which fedclip-predict reproduces."""
    promptfl, clustered = runs
    final = load_file(clustered / "prompt_final.safetensors")
    assert torch.equal(final[CONTEXT], load_file(promptfl / "prompt_final.safetensors")[CONTEXT])
    a, b = (json.loads((run / "summary.json").read_text()) for run in runs)
    assert a["generalization"] == b["generalization"] and b["bytes_total"] > a["bytes_total"]
    assert final[KEYS].norm(dim=1).min() > 0  # round 1 set both keys (two training sites, two clusters)
    last = rows_of(clustered)[-1]["evaluate"]
    assert "art/personalized-test-acc" in last and "sketch/personalized-test-acc" not in last
    for client, weights in site_weights(clustered).items():
        assert set(weights) == {CONTEXT}
        assert any(torch.equal(weights[CONTEXT], row) for row in final[CLUSTERS]), client


def test_a_site_restarted_mid_run_ends_as_the_run_uninterrupted(runs, tiny_clip, data, tmp_path):
    _, clustered = runs
    assert restarted_rows(CLUSTERED, tiny_clip, data, tmp_path) == [r["evaluate"] for r in rows_of(clustered)]


def test_secagg_is_refused_it_needs_each_sites_cluster():
    cfg = load_config("method=clustered_prompt strategy.secagg.enabled=true")
    with pytest.raises(ValueError, match="method=clustered_prompt's are not"):
        refuse_options(cfg, load_method(cfg))


@pytest.mark.parametrize(
    "record",
    [
        {"index": torch.tensor([0, 1]), "signature": torch.zeros(24)},  # the tiny CLIP's features: 24
        {"index": torch.tensor([5]), "signature": torch.zeros(24)},
        {"index": torch.tensor([0]), "signature": torch.zeros(7)},
        {"signature": torch.zeros(24)},
    ],
)
def test_a_kept_cluster_that_does_not_fit_is_dropped_with_a_warning(runs, record, caplog):
    """A damaged or stale kept cluster (read from the site's file) never fails the round: it is dropped with its
    optimiser's moments, and the site starts afresh."""
    _, clustered = runs
    site_cfg = next((clustered.parent / "clients").glob("*/art/config.yaml"))
    local = client_data(config_from_file(site_cfg), "art", 0, torch.device("cpu"))
    kept = {CLUSTER: record, CLUSTER_OPTIMIZER: {"0.step": torch.tensor(3.0)}}
    with caplog.at_level(logging.WARNING):
        assert ClusteredPrompt(clusters=2).kept_cluster(local, kept) is None
    assert "its kept cluster does not fit" in caplog.text and not kept
    fitting = {CLUSTER: {"index": torch.tensor([1]), "signature": torch.zeros(local.feats.image.shape[1])}}
    assert ClusteredPrompt(clusters=2).kept_cluster(local, fitting) is fitting[CLUSTER]
