"""Screening, robust aggregation and 16-bit transport of the strategy, on hand-made updates."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.methods.fedavg import FedAvg
from common.methods.fedclip import FedClip
from common.methods.local import Local
from common.transport import array_values, decode, encode
from server_app import screening
from server_app.aggregation import AGGREGATIONS, aggregate_adapters, min_clients
from server_app.sampling import sample_clients
from server_app.screening import update_norm
from server_app.strategy import FedClipStrategy
from tests.conftest import reply_from

TEMPLATE = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}


def state(value: float | list, b: float = 0.0) -> dict[str, np.ndarray]:
    return {"w": np.broadcast_to(np.asarray(value, np.float32), (4,)).copy(), "b": np.full(2, b, np.float32)}


def reply(node: int, s: dict[str, np.ndarray], num_examples: int = 10, dtype: str = "float32"):
    return reply_from(
        node,
        RecordDict(
            {
                "arrays": encode(s, dtype),
                "metrics": MetricRecord({"num-examples": num_examples}),
                "info": ConfigRecord({}),
            }
        ),
    )


def make_strategy(num_train: int = 5, **options) -> FedClipStrategy:
    nodes = {n: f"c{n}" for n in range(1, num_train + 1)} | {99: "held"}
    strategy = FedClipStrategy(nodes, "held", TEMPLATE, "equal", 1, FedClip(), **options)
    # the global adapter: zeros
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in TEMPLATE.items()}), ConfigRecord(), None)
    return strategy


def aggregated(strategy: FedClipStrategy, replies) -> dict[str, np.ndarray] | None:
    arrays, _ = strategy.aggregate_train(1, replies)
    return None if arrays is None else {k: v.numpy() for k, v in arrays.items()}


# --- screening ---------------------------------------------------------------------------------------------


def test_update_above_the_absolute_bound_is_rejected_and_logged(caplog):
    strategy = make_strategy(3, max_update_norm=1.0)
    result = aggregated(strategy, [reply(1, state(0.1)), reply(2, state(0.3)), reply(3, state(1e30))])
    np.testing.assert_allclose(result["w"], 0.2, rtol=1e-6)
    assert "update of node 3 (c3) has norm 2e+30 > 1: rejected" in caplog.text


def test_clip_scales_the_update_down_to_the_bound():
    strategy = make_strategy(2, max_update_norm=1.0, on_large_update="clip")
    # norm sqrt(4*9 + 2*16) = sqrt(68)
    result = aggregated(strategy, [reply(1, state(0.0)), reply(2, state(3.0, b=4.0))])
    clipped = {k: v / np.sqrt(68.0) for k, v in state(3.0, b=4.0).items()}
    assert update_norm(clipped, TEMPLATE) == pytest.approx(1.0)
    for k in TEMPLATE:
        np.testing.assert_allclose(result[k], clipped[k] / 2, rtol=1e-5)


def test_an_update_exactly_at_the_bound_is_kept(caplog):
    strategy = make_strategy(2, max_update_norm=1.0)
    result = aggregated(strategy, [reply(1, state(0.5)), reply(2, state(0.0))])  # norms 1.0 (exactly) and 0
    np.testing.assert_allclose(result["w"], 0.25)
    assert "rejected" not in caplog.text


def test_a_client_with_one_example_is_a_client():
    strategy = make_strategy(2)
    strategy.weighting = "examples"
    np.testing.assert_allclose(aggregated(strategy, [reply(1, state(1.0), 1), reply(2, state(4.0), 2)])["w"], 3.0)


def test_each_local_client_is_measured_from_its_own_adapter(caplog):
    """method=local: a client continues its own adapter, so its update is measured from that, not from the global
    one."""
    method = Local()
    nodes = {1: "c1", 2: "c2", 3: "c3", 99: "held"}
    strategy = FedClipStrategy(nodes, "held", TEMPLATE, "equal", 1, method, max_update_norm=1.0)
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in TEMPLATE.items()}), ConfigRecord(), None)
    # c1 moved 20: rejected
    strategy.aggregate_train(1, [reply(1, state(10.0)), reply(2, state(0.2)), reply(3, state(0.3))])
    method.client_states["c1"] = state(10.0)  # as if c1's adapter had been kept at 10
    _, metrics = strategy.aggregate_train(2, [reply(1, state(10.1)), reply(2, state(0.2))])
    # c2 kept its round-1 adapter
    assert metrics["c1/update-norm"] == pytest.approx(0.2, rel=1e-5) and metrics["c2/update-norm"] == 0.0
    # accepted: 0.2 from its own adapter, not 20 from the global one
    assert method.client_states["c1"]["w"][0] == pytest.approx(10.1)


def test_clip_moves_the_update_back_towards_the_weights_it_was_trained_from():
    """A non-zero global adapter: clipping scales the update (state - base), not the state, and keeps float32."""
    strategy = make_strategy(2, max_update_norm=1.0, on_large_update="clip")
    base = {"w": np.full(4, 2.0, np.float32), "b": np.full(2, -1.0, np.float32)}
    strategy.configure_train(2, ArrayRecord({k: Array(v) for k, v in base.items()}), ConfigRecord(), None)
    accepted, _ = strategy.screen(2, [reply(1, state(5.0, b=3.0))])  # update (3, 3, 3, 3 | 4, 4): norm sqrt(68)
    [(_, update)] = accepted
    assert all(v.dtype == np.float32 for v in update.state.values())
    np.testing.assert_allclose(update.state["w"], 2.0 + 3.0 / np.sqrt(68.0), rtol=1e-6)
    np.testing.assert_allclose(update.state["b"], -1.0 + 4.0 / np.sqrt(68.0), rtol=1e-6)
    assert update_norm(update.state, base) == pytest.approx(1.0, rel=1e-6)


def test_relative_bound_catches_a_scaled_update_with_no_absolute_bound(caplog):
    strategy = make_strategy(4, max_norm_ratio=10.0)
    honest = [reply(n, state(0.1 * n)) for n in (1, 2, 3)]
    result = aggregated(strategy, [*honest, reply(4, state(0.1 * 1e6))])
    np.testing.assert_allclose(result["w"], 0.2, rtol=1e-6)
    assert "(c4) has norm" in caplog.text and "rejected" in caplog.text


def test_honest_updates_of_different_lengths_all_pass_the_relative_bound():
    strategy = make_strategy(3, max_norm_ratio=10.0)
    result = aggregated(strategy, [reply(1, state(0.1)), reply(2, state(0.5)), reply(3, state(0.9))])  # 9x the smallest
    np.testing.assert_allclose(result["w"], 0.5, rtol=1e-6)


def test_more_examples_than_reported_at_discovery_is_rejected(caplog):
    strategy = make_strategy(2, client_num_train={"c1": 10, "c2": 10})
    strategy.weighting = "examples"
    result = aggregated(strategy, [reply(1, state(1.0), 10), reply(2, state(5.0), 10**12)])
    np.testing.assert_allclose(result["w"], 1.0)
    assert "num-examples 1000000000000 exceeds the 10 training examples it reported at discovery" in caplog.text


def test_the_example_count_bound_is_what_discovery_reported_exactly(caplog):
    strategy = make_strategy(3, client_num_train={"c1": 10, "c2": 10, "c3": 10})
    strategy.weighting = "examples"
    # 10 is the limit
    result = aggregated(strategy, [reply(1, state(1.0), 10), reply(2, state(2.0), 5), reply(3, state(9.0), 11)])
    np.testing.assert_allclose(result["w"], (10 * 1.0 + 5 * 2.0) / 15)
    assert "node 3 (c3): num-examples 11 exceeds the 10 training examples" in caplog.text and "(c1)" not in caplog.text


def test_the_relative_bound_needs_three_updates_for_its_median():
    """With one or two updates the median is no reference (it is one of them, or their mean): max_norm_ratio does not
    apply, however small; from three updates on it does."""
    strategy = make_strategy(3, max_norm_ratio=1.5)
    np.testing.assert_allclose(aggregated(strategy, [reply(1, state(0.1)), reply(2, state(0.5))])["w"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(aggregated(strategy, [reply(1, state(0.5))])["w"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(
        aggregated(strategy, [reply(1, state(0.1)), reply(2, state(0.2)), reply(3, state(0.5))])["w"], 0.15, rtol=1e-6
    )


def test_all_rejected_leaves_the_adapter_unchanged(caplog):
    strategy = make_strategy(2, max_update_norm=0.5)
    assert aggregated(strategy, [reply(1, state(2.0)), reply(2, state(-3.0))]) is None
    assert "global adapter is unchanged" in caplog.text


# --- robust rules ------------------------------------------------------------------------------------------


def test_each_rule_on_hand_made_updates():
    updates = [state(v) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]  # one outlier
    weights = [1.0] * 5
    expected = {
        "mean": 22.0,
        "median": 3.0,
        "trimmed_mean": 3.0,
        "krum": 2.0,
        "multikrum": 2.5,
    }  # f=1: trim 1 per end; Krum: the most central
    for rule, value in expected.items():
        result = aggregate_adapters(updates, weights, rule, num_malicious=1)
        np.testing.assert_allclose(result["w"], value, rtol=1e-6, err_msg=rule)
        assert result["w"].dtype == np.float32
    seven = [state(v) for v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1000.0)]  # Bulyan needs 4f+3 = 7 for f=1
    # Krum picks 3, 4, 2, 5, 1 (n - 2f = 5); the mean of the 3 (5 - 2f) closest to their median 3 per coordinate
    np.testing.assert_allclose(aggregate_adapters(seven, [1.0] * 7, "bulyan", 1)["w"], 3.0, rtol=1e-6)


def test_trimmed_mean_cuts_exactly_num_malicious_from_each_end_whatever_the_float_rounding():
    """49 updates, f=1: 1/49 x 49 is 0.99999... in floating point, so a cut fraction of f/n would cut nothing."""
    updates = [state(0.0)] * 48 + [state(1000.0)]
    np.testing.assert_allclose(aggregate_adapters(updates, [1.0] * 49, "trimmed_mean", num_malicious=1)["w"], 0.0)
    three = [state(v) for v in (1.0, 2.0, 100.0)]  # the smallest case: one left in the middle
    np.testing.assert_allclose(aggregate_adapters(three, [1.0] * 3, "trimmed_mean", num_malicious=1)["w"], 2.0)


def test_ties():
    # an even count: the median is the mean of the two middle values; identical updates: Krum returns that update
    np.testing.assert_allclose(
        aggregate_adapters([state(v) for v in (1.0, 2.0, 3.0, 9.0)], [1.0] * 4, "median", 0)["w"], 2.5
    )
    same = [state(2.0)] * 3 + [state(7.0)]
    for rule in ("krum", "multikrum", "median"):
        np.testing.assert_allclose(aggregate_adapters(same, [1.0] * 4, rule, 1)["w"], 2.0, err_msg=rule)


def test_the_strategy_hands_num_malicious_to_its_rule():
    """Krum with f=1 through the strategy: the most central of five updates, not what f=0 or no f would pick."""
    strategy = make_strategy(5, aggregation="krum", num_malicious=1)
    result = aggregated(strategy, [reply(n, state(v)) for n, v in zip(range(1, 6), (1.0, 2.0, 3.0, 4.0, 100.0))])
    np.testing.assert_allclose(result["w"], 2.0, rtol=1e-6)
    strategy = make_strategy(7, aggregation="multikrum", num_malicious=2)  # keeps the 5 most central: 1-5
    result = aggregated(
        strategy, [reply(n, state(v)) for n, v in zip(range(1, 8), (1.0, 2.0, 3.0, 4.0, 5.0, 50.0, 100.0))]
    )
    np.testing.assert_allclose(result["w"], 3.0, rtol=1e-6)


def test_robust_rule_is_applied_per_coordinate_to_the_adapter_tensors_only():
    strategy = make_strategy(3, aggregation="median", num_malicious=1)
    arrays, metrics = strategy.aggregate_train(
        1, [reply(1, state([1, 2, 3, 4])), reply(2, state([9, 9, 9, 9])), reply(3, state(0.0))]
    )
    assert set(arrays.keys()) == set(TEMPLATE)
    np.testing.assert_allclose(arrays["w"].numpy(), [1, 2, 3, 4])
    assert metrics["c2/num-examples"] == 10


# each rule's bound from its paper, for f = 2 faulty clients (hard-coded: not computed by the code under test)
NEEDED_FOR_TWO_FAULTY = {"median": 5, "trimmed_mean": 5, "krum": 7, "multikrum": 7, "bulyan": 11}


def test_each_rule_needs_its_papers_number_of_clients():
    assert {rule: min_clients(rule, 2) for rule in AGGREGATIONS} == {"mean": 1, **NEEDED_FOR_TWO_FAULTY}
    assert {rule: min_clients(rule, 0) for rule in AGGREGATIONS} == {
        "mean": 1,
        "median": 1,
        "trimmed_mean": 1,
        "krum": 3,
        "multikrum": 3,
        "bulyan": 3,
    }


@pytest.mark.parametrize("rule", [r for r in AGGREGATIONS if r != "mean"])
def test_too_few_clients_for_a_rule_is_a_clear_error_at_start(rule):
    need = NEEDED_FOR_TWO_FAULTY[rule]
    with pytest.raises(ValueError, match=f"needs at least {need} training clients, this federation has {need - 1}"):
        make_strategy(need - 1, aggregation=rule, num_malicious=2)
    make_strategy(need, aggregation=rule, num_malicious=2)  # enough


def test_a_round_with_fewer_valid_updates_than_min_train_nodes_keeps_the_adapter(caplog):
    nodes = {n: f"c{n}" for n in range(1, 6)} | {99: "held"}
    strategy = FedClipStrategy(nodes, "held", TEMPLATE, "equal", 3, FedClip())
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in TEMPLATE.items()}), ConfigRecord(), None)
    assert aggregated(strategy, [reply(1, state(0.1)), reply(2, state(0.2)), reply_from(3, error="lost")]) is None
    assert "round 1: 2 valid update(s), need 3: the global adapter is unchanged" in caplog.text
    np.testing.assert_allclose(aggregated(strategy, [reply(n, state(0.1 * n)) for n in (1, 2, 3)])["w"], 0.2, rtol=1e-6)


def test_a_round_with_fewer_valid_updates_than_the_rule_needs_keeps_the_adapter(caplog):
    strategy = make_strategy(5, aggregation="krum", num_malicious=1)
    assert aggregated(strategy, [reply(n, state(0.1)) for n in (1, 2, 3, 4)] + [reply_from(5, error="lost")]) is None
    assert "4 valid update(s), need 5" in caplog.text


def test_a_rule_needs_its_clients_in_every_sampled_round_not_only_in_the_federation():
    with pytest.raises(
        ValueError, match="needs at least 5 training clients, this federation has 3 a round"
    ):  # 12 training, 25% a round
        make_strategy(12, aggregation="krum", num_malicious=1, fraction_train=0.25)
    make_strategy(12, aggregation="krum", num_malicious=1, fraction_train=0.5)  # 6 a round: enough


def test_unknown_rule_and_robust_rule_on_a_method_that_does_not_aggregate_are_errors():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "strategy.aggregation must be one of mean, median, trimmed_mean, krum, multikrum, bulyan, got 'average'"
        ),
    ):
        make_strategy(3, aggregation="average")
    with pytest.raises(ValueError, match="method=local has none to combine"):
        FedClipStrategy({1: "a", 2: "b", 3: "c"}, "c", TEMPLATE, "equal", 1, Local(), aggregation="median")


# --- 16-bit transport --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rel", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_16_bit_round_trip_halves_the_bytes_and_is_within_the_dtypes_rounding(dtype, rel):
    rng = np.random.default_rng(0)
    original = {"w": rng.normal(size=(64, 64)).astype(np.float32), "b": rng.normal(size=64).astype(np.float32)}
    wide, narrow = encode(original, "float32"), encode(original, dtype)
    size = lambda record: sum(len(a.data) for a in record.values())  # noqa: E731 - what traffic.message_bytes counts
    # half the payload, the same .npy headers
    assert size(narrow) - 2 * (64 * 64 + 64) == size(wide) - 4 * (64 * 64 + 64)
    for key, value in decode(narrow).items():
        assert value.dtype == torch.float32
        # round to nearest: half an ulp
        assert np.all(np.abs(value.numpy() - original[key]) <= rel * np.abs(original[key]))
        expected = torch.from_numpy(original[key]).to(getattr(torch, dtype)).float()
        assert torch.equal(value, expected)  # exactly torch's own rounding


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint16", "float64", "int64", "bool"])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (64, 64), (2, 0, 3), (1, 2, 3)])
def test_arrays_in_flowers_encoding_are_read_in_place_as_np_load_reads_them(dtype, shape):
    values = np.asarray(np.random.default_rng(0).normal(size=shape) * 100).astype(dtype)
    array = Array(values)
    read = array_values(array)
    assert read.dtype == values.dtype and read.shape == values.shape and np.array_equal(read, values)
    assert not read.flags.writeable  # the message's own bytes: nothing may write into them


@pytest.mark.parametrize(
    "declared,values",
    [
        ((2, 3), np.arange(6, dtype=np.float32)),  # a declared shape the bytes do not have
        ((10**12,), np.arange(6, dtype=np.float32)),  # one far larger than the bytes: nothing is allocated for it
        ((3, 4), np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))),  # not C order
        ((6,), np.arange(6, dtype=">f4")),  # big-endian
    ],
)
def test_arrays_in_any_other_encoding_are_read_by_np_load(declared, values):
    array = Array(dtype="float32", shape=declared, stype="numpy.ndarray", data=Array(values).data)
    read = array_values(array)
    assert read.shape == values.shape and np.array_equal(read, values)  # what the bytes say, as Flower's np.load


def test_server_decodes_16_bit_updates_and_aggregates_in_float32():
    strategy = make_strategy(2, transport_dtype="bfloat16")
    sent = list(
        strategy.configure_train(2, ArrayRecord({k: Array(v + 0.5) for k, v in TEMPLATE.items()}), ConfigRecord(), None)
    )
    assert sent[0].content["arrays"]["w"].numpy().dtype == np.uint16  # the global adapter goes out in bfloat16 bits
    result = aggregated(strategy, [reply(1, state(1.0), dtype="bfloat16"), reply(2, state(2.0), dtype="bfloat16")])
    assert result["w"].dtype == np.float32
    np.testing.assert_allclose(result["w"], 1.5)


def test_update_in_an_unexpected_dtype_is_dropped(caplog):
    strategy = make_strategy(2, transport_dtype="float16")
    result = aggregated(strategy, [reply(1, state(1.0), dtype="float16"), reply(2, state(2.0), dtype="bfloat16")])
    np.testing.assert_allclose(result["w"], 1.0)
    assert "has dtype uint16, expected float16 or float32" in caplog.text


def test_unknown_transport_dtype_is_an_error():
    with pytest.raises(ValueError, match="transport_dtype must be one of float32, float16, bfloat16"):
        make_strategy(2, transport_dtype="int8")


# --- options refused at start, and what each option does to the round ----------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        ({"weighting": "median"}, "strategy.weighting must be 'equal' or 'examples', got 'median'"),
        ({"fraction_evaluate": 0.0}, "strategy.fraction_evaluate must be in (0, 1], got 0.0"),
        ({"fraction_train": 1.01}, "strategy.fraction_train must be in (0, 1], got 1.01"),
        ({"on_large_update": "drop"}, "strategy.on_large_update must be 'clip' or 'reject', got 'drop'"),
        ({"aggregation": "median", "num_malicious": -1}, "strategy.num_malicious must be >= 0, got -1"),
        (
            {"transport_dtype": "float16", "method": FedAvg()},
            "strategy.transport_dtype=float16 narrows what travels to 16 bits; method=fedavg sends float32",
        ),
        (
            {"aggregation": "krum", "num_malicious": 1, "fraction_train": 0.25},
            "strategy.aggregation=krum with strategy.num_malicious=1 needs at least 5 training clients, this "
            "federation has 3 a round (12 training, "
            "strategy.fraction_train=0.25); lower num_malicious, raise fraction_train or choose another rule "
            "(docs/trust.md)",
        ),
    ],
)
def test_options_that_cannot_work_are_refused_with_what_to_change(options, message):
    weighting, method = options.pop("weighting", "equal"), options.pop("method", FedClip())
    nodes = {n: f"c{n}" for n in range(1, 13)} | {99: "held"}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        FedClipStrategy(nodes, "held", TEMPLATE, weighting, 1, method, **options)


def test_unknown_rule_given_to_aggregate_adapters_is_an_error():
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape("strategy.aggregation must be one of mean, median, trimmed_mean, krum, multikrum, bulyan, got"),
    ):
        aggregate_adapters([state(1.0)], [1.0], "average", 0)


def test_the_robust_rules_ignore_the_weights_and_multikrum_uses_them():
    updates = [state(v) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    heavy = [1.0, 1.0, 1.0, 10.0, 1.0]  # an honest client with many examples
    for rule in ("median", "trimmed_mean", "krum"):
        np.testing.assert_allclose(
            aggregate_adapters(updates, heavy, rule, 1)["w"],
            aggregate_adapters(updates, [1.0] * 5, rule, 1)["w"],
            err_msg=rule,
        )
    # multikrum keeps the 4 most central (1-4) and averages them with their weights
    np.testing.assert_allclose(
        aggregate_adapters(updates, heavy, "multikrum", 1)["w"], (1 + 2 + 3 + 40) / 13, rtol=1e-6
    )


def test_a_round_samples_at_least_min_train_nodes_and_draws_reproducibly():
    nodes = {n: f"c{n:02d}" for n in range(1, 31)} | {99: "held"}
    strategy = FedClipStrategy(nodes, "held", TEMPLATE, "equal", 5, FedClip(), fraction_train=0.1, seed=7)
    assert len(strategy.train_sample(1)) == 5  # 10% of 30 is 3, min_train_nodes is 5
    # the draw itself is pinned: a run must sample the same clients on every machine and version
    # (benchmarks/noop_app.py too)
    assert sample_clients([f"c{n:02d}" for n in range(1, 31)], 5, 7, "train", 1) == ["c01", "c12", "c20", "c27", "c29"]
    assert sample_clients(["b", "a", "c"], 5, 7, "train", 1) == ["a", "b", "c"]


def test_a_reply_from_a_node_not_in_the_federation_is_named_by_its_id(caplog):
    strategy = make_strategy(2)
    aggregated(strategy, [reply(1, state(0.1)), reply(42, state(np.nan))])
    assert "dropped the update of node 42 (node-42): w holds NaN or Inf" in caplog.text


def test_a_tensor_that_is_not_float32_is_kept_in_its_own_dtype_whatever_the_transport():
    """Only float32 tensors travel in 16 bits; an integer tensor (a counter, an index) comes back as it went, not
    widened."""
    template = {"w": np.zeros(3, np.float32), "steps": np.zeros(2, np.int64)}
    state, reason = screening.checked_tensors(
        {"w": np.ones(3, np.float16), "steps": np.array([7, 9])}, template, "float16"
    )
    assert reason is None and state["steps"].dtype == np.int64 and state["steps"].tolist() == [7, 9]
    assert state["w"].dtype == np.float32
    _, reason = screening.checked_tensors(
        {"w": np.ones(3, np.float32), "steps": np.array([7.0, 9.0])}, template, "float16"
    )
    assert reason == "steps has dtype float64, expected int64"
