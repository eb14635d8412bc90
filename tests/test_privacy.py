"""Central DP through Flower's wrappers around FedClipStrategy, and the privacy spent."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MessageType, MetricRecord, RecordDict
from flwr.common.differential_privacy_constants import KEY_CLIPPING_NORM, KEY_NORM_BIT
from omegaconf import OmegaConf

from client_app.app import app as client_app
from common.config import load_config
from common.methods.fedclip import FedClip
from common.methods.local import Local
from common.transport import encode
from server_app import screening
from server_app.app import app as server_app
from server_app.privacy import (
    ClientSideAdaptiveClipping,
    ScreenedReplies,
    ServerSideFixedClipping,
    privacy_spent,
    with_privacy,
)
from server_app.strategy import FedClipStrategy
from tests.conftest import reply_from, write_image_folder
from tests.inprocess import InProcessGrid, run_in_process

SIZE = 20_000
TEMPLATE = {"w": np.zeros(SIZE, np.float32)}


def dp_options(**changes) -> OmegaConf:
    dp = load_config().strategy.dp
    dp.side = "server"
    for key, value in changes.items():
        dp[key] = value
    return dp


def reply(node: int, value: float | np.ndarray, shape=(SIZE,)):
    arrays = ArrayRecord({"w": Array(np.broadcast_to(np.asarray(value, np.float32), shape).copy())})
    return reply_from(
        node, RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5}), "info": ConfigRecord({})})
    )


def private_round(noise_multiplier: float, seed: int, replies=None, **strategy_options):
    strategy = FedClipStrategy(
        {1: "a", 2: "b", 3: "c", 4: "held"}, "held", TEMPLATE, "equal", 1, FedClip(), **strategy_options
    )
    wrapped = with_privacy(strategy, dp_options(noise_multiplier=noise_multiplier, clipping_norm=1.0))
    list(wrapped.configure_train(1, ArrayRecord({"w": Array(TEMPLATE["w"])}), ConfigRecord(), None))
    np.random.seed(seed)  # Flower draws the noise from numpy's global generator
    # the third is longer than the clip
    replies = replies if replies is not None else [reply(1, 0.001), reply(2, 0.002), reply(3, 1.0)]
    arrays, metrics = wrapped.aggregate_train(1, replies)
    return arrays["w"].numpy(), metrics


def test_noise_is_added_with_the_calibrated_spread_to_the_clipped_mean():
    clipped_third = 1.0 / np.sqrt(SIZE)  # each coordinate of an update of norm sqrt(SIZE) clipped to norm 1
    clean_mean = (0.001 + 0.002 + clipped_third) / 3
    exact, _ = private_round(0.0, 0)
    np.testing.assert_allclose(exact, clean_mean, rtol=1e-5)  # no noise: exactly the mean of the clipped updates
    noisy0, metrics = private_round(1.0, 0)
    noisy0_again, _ = private_round(1.0, 0)
    noisy1, _ = private_round(1.0, 1)
    # two seeds differ, and differ from the clean run
    assert not np.allclose(noisy0, noisy1) and not np.allclose(noisy0, exact)
    np.testing.assert_array_equal(noisy0, noisy0_again)
    assert np.std(noisy0 - exact) == pytest.approx(1.0 * 1.0 / 3, rel=0.03)  # noise_multiplier x clip / clients
    assert metrics["dp-epsilon"] == pytest.approx(privacy_spent(1.0, 1, 1e-5))


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_server_side_dp_screens_each_update_once(clipping, monkeypatch):
    """Screening runs ahead of Flower's wrapper; the strategy it wraps only combines what reaches it."""
    checked, real = [], screening.checked_update
    monkeypatch.setattr(screening, "checked_update", lambda content, *a: checked.append(content) or real(content, *a))
    strategy = FedClipStrategy({1: "a", 2: "b", 3: "c", 4: "held"}, "held", TEMPLATE, "equal", 1, FedClip())
    wrapped = with_privacy(strategy, dp_options(clipping=clipping, noise_multiplier=0.0, clipping_norm=1.0))
    list(wrapped.configure_train(1, ArrayRecord({"w": Array(TEMPLATE["w"])}), ConfigRecord(), None))
    replies = [reply(1, 0.001), reply(2, 0.002), reply(3, 1.0)]
    arrays, metrics = wrapped.aggregate_train(1, replies)
    assert len(checked) == 3 and {id(c) for c in checked} == {id(r.content) for r in replies}  # each update once
    assert arrays is not None and set(metrics) >= {f"{c}/update-norm" for c in "abc"}


def test_malformed_update_is_dropped_before_flowers_clipping(caplog):
    result, _ = private_round(0.0, 0, [reply(1, 0.001), reply(2, 0.003), reply(3, 0.5, shape=(7,))])
    np.testing.assert_allclose(result, 0.002, rtol=1e-5)  # the mean of the 2 updates left
    assert "dropped the update of node 3 (c): w has shape (7,)" in caplog.text


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_is_calibrated_to_the_clients_actually_averaged(seed):
    """Three training clients, one update dropped: the noise's std is noise_multiplier x clip / 2, not / 3 (the
    sensitivity of a mean of 2 clipped updates to one client is clip / 2; / 3 would under-noise it by a third)."""
    replies = [reply(1, 0.001), reply(2, 0.003), reply(3, 0.5, shape=(7,))]  # the third is malformed: dropped
    noisy, _ = private_round(2.0, seed, replies)
    noise = noisy - 0.002  # the mean of the 2 updates left (checked exactly without noise above)
    assert np.std(noise) == pytest.approx(2.0 * 1.0 / 2, rel=0.03)  # 20,000 draws: the estimate is within 0.5% (1 sd)
    assert abs(np.mean(noise)) < 5 * 1.0 / np.sqrt(SIZE)  # centred on the clean mean (5 standard errors)


def secure_private_round(
    noise_multiplier: float, seed: int, mean: float, replies
) -> tuple[np.ndarray | None, MetricRecord]:
    """A SecAgg+ round of client-side fixed-clipping DP on 4 training clients: the unmasked mean plus Flower's noise."""
    strategy = FedClipStrategy(
        {1: "a", 2: "b", 3: "c", 4: "d", 5: "held"}, "held", TEMPLATE, "equal", 1, FedClip(), secagg=True
    )
    wrapped = with_privacy(strategy, dp_options(side="client", noise_multiplier=noise_multiplier, clipping_norm=1.0))
    list(wrapped.configure_train(1, ArrayRecord({"w": Array(TEMPLATE["w"])}), ConfigRecord(), None))
    np.random.seed(seed)
    arrays, metrics = wrapped.aggregate_secure(1, replies, {"w": np.full(SIZE, mean)})  # SecAgg+ unmasks to float64
    return (None if arrays is None else arrays["w"].numpy()), metrics


def secure_reply(node: int):
    """A SecAgg+ round's train reply as the server gets it: metrics, no tensor in the clear."""
    return reply_from(
        node, RecordDict({"metrics": MetricRecord({"num-examples": 5, "train-loss": 1.0}), "info": ConfigRecord({})})
    )


def test_noise_under_secagg_has_the_scale_of_the_clients_in_the_sum():
    """Four training clients, one lost (an error reply): the sum holds 3 clipped updates, so the std is z x C / 3."""
    replies = [secure_reply(1), secure_reply(2), secure_reply(3), reply_from(4, error="lost")]
    exact, _ = secure_private_round(0.0, 0, 0.01, replies)
    np.testing.assert_allclose(exact, 0.01, rtol=1e-6)  # no noise: the global adapter (zeros) plus the unmasked mean
    noisy, metrics = secure_private_round(1.5, 0, 0.01, replies)
    assert np.std(noisy - exact) == pytest.approx(1.5 * 1.0 / 3, rel=0.03)
    assert abs(np.mean(noisy - exact)) < 5 * 0.5 / np.sqrt(SIZE)
    assert metrics["dp-epsilon"] == pytest.approx(privacy_spent(1.5, 1, 1e-5))
    assert set(metrics) >= {f"{c}/train-loss" for c in "abc"}


def test_a_halted_secure_round_adds_no_noise_and_still_counts_as_spent():
    arrays, metrics = secure_private_round(1.0, 0, 0.01, [secure_reply(1)])  # one update collected: no mean
    assert arrays is None
    # an upper bound: as if it had been released
    assert metrics["dp-epsilon"] == pytest.approx(privacy_spent(1.0, 1, 1e-5))


# dp-accounting 0.6.0's RdpAccountant (its default orders), computed once on 2026-12-03: every client in every round
# (sampling is not credited: with strategy.fraction_train < 1 the figure is an upper bound). Issue 20 quotes the first.
REFERENCE_EPSILONS = [
    (1.0, 40, 1e-5, 48.80169),
    (1.0, 20, 1e-5, 30.12663),
    (1.1, 10, 1e-5, 16.85668),
    (2.0, 1, 1e-5, 2.16572),
]


@pytest.mark.parametrize("noise_multiplier,rounds,delta,epsilon", REFERENCE_EPSILONS)
def test_epsilon_matches_fixed_reference_values(noise_multiplier, rounds, delta, epsilon):
    assert privacy_spent(noise_multiplier, rounds, delta) == pytest.approx(epsilon, abs=1e-4)


def test_epsilon_lies_between_the_closed_form_bounds():
    """Independent of dp-accounting: T Gaussian rounds have RDP T a / (2 z^2) at order a. Converted with Balle et al.
    2020 (what dp-accounting uses) over every order, it is a lower bound for the accountant's (which tries fewer
    orders); Mironov 2017's looser conversion is an upper bound."""
    z, rounds, delta = 1.0, 40, 1e-5
    orders = [1 + x / 100 for x in range(1, 20_000)]
    balle = min(
        rounds * a / (2 * z * z) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for a in orders
    )
    mironov = min(rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in orders)
    assert balle <= privacy_spent(z, rounds, delta) <= balle + 0.1 < mironov


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert privacy_spent(1.1, 0, 1e-5) == 0.0
    values = [privacy_spent(1.1, rounds, 1e-5) for rounds in (1, 2, 10)]
    assert values[0] < values[1] < values[2]
    assert privacy_spent(2.0, 10, 1e-5) < values[2] < privacy_spent(1.1, 10, 1e-6)


NEEDS_MEAN = (
    "strategy.dp needs a method whose new weights are the mean of the clients' updates (conf/method/ says which: "
    "method={}'s "
    "{}), strategy.aggregation=mean and strategy.weighting=equal: the noise is calibrated to the "
    "equal-weight mean of clipped updates, whose sensitivity to one client is clip / clients"
)
SECAGG_NEEDS_CLIENT_FIXED = (
    "strategy.dp with strategy.secagg.enabled needs strategy.dp.side=client and strategy.dp.clipping=fixed: the server "
    "sees only the sum, so the clients clip and the server adds the noise to the unmasked mean (docs/trust.md)"
)


@pytest.mark.parametrize(
    "option,dp,message",
    [
        ({"aggregation": "median"}, {}, NEEDS_MEAN.format("fedclip", "are")),
        ({"weighting": "examples"}, {}, NEEDS_MEAN.format("fedclip", "are")),
        ({"method": Local()}, {}, NEEDS_MEAN.format("local", "are not")),
        (
            {"transport_dtype": "bfloat16"},
            {"side": "client"},
            "strategy.dp.side=client clips on the clients with Flower's mods, which need "
            "strategy.transport_dtype=float32",
        ),
        ({"secagg": True}, {"side": "server"}, SECAGG_NEEDS_CLIENT_FIXED),
        ({"secagg": True}, {"side": "client", "clipping": "adaptive"}, SECAGG_NEEDS_CLIENT_FIXED),
    ],
)
def test_dp_with_what_it_cannot_account_for_is_an_error(option, dp, message):
    """Each refusal, with its whole message (what to change, and why)."""
    strategy = FedClipStrategy(
        {1: "a", 2: "b", 3: "c", 4: "held"},
        "held",
        TEMPLATE,
        option.pop("weighting", "equal"),
        1,
        option.pop("method", FedClip()),
        **option,
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        with_privacy(strategy, dp_options(**dp))


def test_16_bit_updates_are_clipped_on_the_server_after_decoding():
    """Server-side DP takes 16-bit updates (screening decodes them before Flower clips); only client-side clipping
    cannot."""
    strategy = FedClipStrategy(
        {1: "a", 2: "b", 3: "c", 4: "held"}, "held", TEMPLATE, "equal", 1, FedClip(), transport_dtype="bfloat16"
    )
    wrapped = with_privacy(strategy, dp_options(noise_multiplier=0.0, clipping_norm=1.0))
    list(wrapped.configure_train(1, ArrayRecord({"w": Array(TEMPLATE["w"])}), ConfigRecord(), None))
    replies = [
        reply_from(
            n,
            RecordDict(
                {
                    "arrays": encode({"w": np.full(SIZE, 0.5 * n, np.float32)}, "bfloat16"),
                    "metrics": MetricRecord({"num-examples": 5}),
                }
            ),
        )
        for n in (1, 2, 3)
    ]
    arrays, _ = wrapped.aggregate_train(1, replies)
    # each clipped to norm 1: the mean of three equal ones
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0 / np.sqrt(SIZE), rtol=1e-3)


@pytest.mark.parametrize("side,clipping", [("both", "fixed"), ("server", "median")])
def test_unknown_dp_side_or_clipping_is_an_error(side, clipping):
    strategy = FedClipStrategy({1: "a", 2: "b", 3: "c", 4: "held"}, "held", TEMPLATE, "equal", 1, FedClip())
    with pytest.raises(
        ValueError,
        match=f"^strategy.dp.side must be null, server or client and strategy.dp.clipping fixed or adaptive, "
        f"got '{side}', '{clipping}'$",
    ):
        with_privacy(strategy, dp_options(side=side, clipping=clipping))


def test_dp_off_is_the_strategy_itself():
    strategy = FedClipStrategy({1: "a", 2: "b", 3: "c", 4: "held"}, "held", TEMPLATE, "equal", 1, FedClip())
    assert with_privacy(strategy, load_config().strategy.dp) is strategy


def test_a_wrapper_without_its_strategy_has_no_attributes_rather_than_recursing():
    """The wrappers hand unknown attributes to `strategy`; before it is set (copy, pickle) they must say
    AttributeError."""
    for cls in (ScreenedReplies, ServerSideFixedClipping):
        with pytest.raises(AttributeError, match="strategy"):
            getattr(cls.__new__(cls), "train_nodes")  # noqa: B009 - the attribute access is what raises


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


def run_rows(tiny_clip: Path, folder: Path, tmp_path: Path, extra: str, rounds: int = 3) -> tuple[list[dict], dict]:
    overrides = (
        f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds={rounds} "
        f"training.batch_size=8 dataset.clients_per_domain=2 cache_dir={tmp_path / 'cache'} "
        f"output_dir={tmp_path / 'out'} {extra}"
    )
    run_in_process(server_app, client_app, overrides, 6)
    [path] = (tmp_path / "out").glob("*/summary.json")
    return [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()], json.loads(
        path.read_text()
    )


def test_server_side_dp_run_reports_epsilon_every_round(tiny_clip, folder, tmp_path):
    rows, summary = run_rows(tiny_clip, folder, tmp_path, "strategy.dp.side=server strategy.dp.noise_multiplier=2.0")
    epsilons = [row["dp_epsilon"] for row in rows[1:]]
    assert epsilons == [privacy_spent(2.0, r, 1e-5) for r in (1, 2, 3)]
    assert summary["dp"]["epsilon"] == epsilons[-1] and summary["dp"]["side"] == "server"


def test_client_side_dp_clips_on_the_clients(tiny_clip, folder, tmp_path):
    rows, summary = run_rows(
        tiny_clip,
        folder,
        tmp_path,
        "strategy.dp.side=client strategy.dp.clipping_norm=0.01 strategy.dp.noise_multiplier=0.5",
        rounds=2,
    )
    norms = [v for k, v in rows[2]["train"].items() if k.endswith("/update-norm")]
    assert len(norms) == 4 and max(norms) <= 0.01 * (1 + 1e-4)  # what reached the server was clipped by Flower's mod
    assert summary["dp"]["epsilon"] == pytest.approx(privacy_spent(0.5, 2, 1e-5))


@pytest.mark.parametrize("value,factor", [(0.001, math.exp(-0.2 * 0.5)), (1.0, math.exp(0.2 * 0.5))])
def test_server_side_adaptive_clipping_moves_the_norm_towards_the_median_update(value, factor):
    strategy = FedClipStrategy({1: "a", 2: "b", 3: "c", 4: "held"}, "held", TEMPLATE, "equal", 1, FedClip())
    # no noise, so that the clipped count is exact (the noisy count is Flower's, tested there)
    wrapped = with_privacy(
        strategy, dp_options(clipping="adaptive", noise_multiplier=0.0, clipping_norm=1.0, clip_norm_lr=0.2)
    )
    list(wrapped.configure_train(1, ArrayRecord({"w": Array(TEMPLATE["w"])}), ConfigRecord(), None))
    # norms 0.14-0.42 (none clipped) or 141-424 (all)
    arrays, _ = wrapped.aggregate_train(1, [reply(n, value * n) for n in (1, 2, 3)])
    assert arrays is not None
    # none clipped: the norm shrinks towards the median; all clipped: it grows
    assert wrapped.clipping_norm == pytest.approx(factor)


def test_client_side_adaptive_drops_a_reply_without_the_norm_bit(caplog):
    strategy = FedClipStrategy({1: "a", 2: "b", 3: "c", 4: "held"}, "held", TEMPLATE, "equal", 1, FedClip())
    wrapped = with_privacy(
        strategy, dp_options(side="client", clipping="adaptive", noise_multiplier=0.0, clipped_count_stddev=2.0)
    )
    list(wrapped.configure_train(1, ArrayRecord({"w": Array(TEMPLATE["w"])}), ConfigRecord(), None))
    replies = [reply(1, 0.001), reply(2, 0.003), reply(3, 0.5)]
    for r in replies[:2]:
        r.content["metrics"]["norm_bit"] = 1
    arrays, _ = wrapped.aggregate_train(1, replies)  # Flower's wrapper alone would raise on reply 3
    np.testing.assert_allclose(arrays["w"].numpy(), 0.002, rtol=1e-5)
    assert "dropped the update of node 3 (c): no 'norm_bit'" in caplog.text


@pytest.mark.parametrize(
    "side,clipping", [("server", "adaptive"), ("client", "adaptive"), ("server", "fixed"), ("client", "fixed")]
)
def test_a_round_with_no_usable_update_keeps_the_adapter_and_the_norm(side, clipping, caplog):
    """Every reply lost or malformed: nothing is released, the adapter and the clipping norm stay (Flower's adaptive
    wrappers alone would divide the clipped count by zero replies and stop the run), and the round counts as spent."""
    strategy = FedClipStrategy({1: "a", 2: "b", 3: "c", 4: "held"}, "held", TEMPLATE, "equal", 1, FedClip())
    wrapped = with_privacy(
        strategy,
        dp_options(side=side, clipping=clipping, noise_multiplier=1.0, clipping_norm=0.5, clipped_count_stddev=2.0),
    )
    list(wrapped.configure_train(1, ArrayRecord({"w": Array(TEMPLATE["w"])}), ConfigRecord(), None))
    arrays, metrics = wrapped.aggregate_train(4, [reply_from(1, error="lost"), reply(2, 0.1, shape=(3,))])
    assert arrays is None and wrapped.clipping_norm == 0.5
    assert metrics["dp-epsilon"] == pytest.approx(privacy_spent(1.0, 4, 1e-5))
    assert "round 4: no update to aggregate" in caplog.text


class NormRecordingGrid(InProcessGrid):
    """The in-process grid, keeping the clipping norm each round's train messages carry to the clients."""

    def __init__(self, client_app, run_config: dict, num_nodes: int) -> None:
        super().__init__(client_app, run_config, num_nodes)
        self.norms_sent: dict[int, set[float]] = {}

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            config = msg.content.config_records.get("config", {})
            if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in config:
                self.norms_sent.setdefault(config["server-round"], set()).add(config[KEY_CLIPPING_NORM])
        return super().push_messages(messages)


def test_client_side_adaptive_dp_run_adapts_the_norm_the_clients_clip_to(tiny_clip, folder, tmp_path, monkeypatch):
    counts = []  # (unclipped count, replies, noisy fraction) each round, as Flower's wrapper draws them
    noisy_fraction = ClientSideAdaptiveClipping._noisy_fraction

    def recorded(self, count: int, total: int) -> float:
        counts.append((count, total, noisy_fraction(self, count, total)))
        return counts[-1][2]

    monkeypatch.setattr(ClientSideAdaptiveClipping, "_noisy_fraction", recorded)
    rounds, lr, quantile = 3, 0.2, 0.5
    overrides = (
        f"dataset=folder dataset.root={folder} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds={rounds} "
        f"training.batch_size=8 dataset.clients_per_domain=2 cache_dir={tmp_path / 'cache'} "
        f"output_dir={tmp_path / 'out'} "
        f"strategy.dp.side=client strategy.dp.clipping=adaptive strategy.dp.clipping_norm=0.001 "
        f"strategy.dp.noise_multiplier=0.5 "
        f"strategy.dp.clipped_count_stddev=0.5 strategy.dp.clip_norm_lr={lr} "
        f"strategy.dp.target_clipped_quantile={quantile}"
    )
    grid = NormRecordingGrid(client_app, {"overrides": overrides}, 6)
    server_app(grid, Context(1, 0, {}, RecordDict(), {"overrides": overrides}))
    [path] = (tmp_path / "out").glob("*/summary.json")
    rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads(path.read_text())
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert all(len(grid.norms_sent[r]) == 1 for r in range(1, rounds + 1))  # every client of a round gets the same norm
    norms = [grid.norms_sent[r].pop() for r in range(1, rounds + 1)]
    assert norms[0] == 0.001
    for r in range(1, rounds + 1):
        train = rows[r]["train"]
        bits = {k: v for k, v in train.items() if k.endswith(f"/{KEY_NORM_BIT}")}
        update_norms = {k: v for k, v in train.items() if k.endswith("/update-norm")}
        # every training client's reply carries adaptiveclipping_mod's norm bit
        assert len(bits) == len(update_norms) == 4
        # and what reached the server was clipped to the norm sent
        assert max(update_norms.values()) <= norms[r - 1] * (1 + 1e-4)
        count, total, fraction = counts[r - 1]
        # Flower counted our replies' bits (1: the mod scaled the update down)
        assert (count, total) == (
            sum(bits.values()),
            4,
        )
        if r < rounds:  # the next round's norm: Andrew et al.'s geometric update on the noisy clipped fraction
            assert norms[r] == pytest.approx(norms[r - 1] * math.exp(lr * (fraction - quantile)))
    # 0.001 clips every update: the norm grows towards the median update
    assert counts[0][0] == 4 and norms[1] > norms[0]
    assert [r["dp_epsilon"] for r in rows[1:]] == [privacy_spent(0.5, r, 1e-5) for r in range(1, rounds + 1)]
    assert summary["dp"]["epsilon"] == rows[-1]["dp_epsilon"] and summary["dp"]["clipping"] == "adaptive"
