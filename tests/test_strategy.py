import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from common import wire
from common.methods.fedclip import FedClip
from common.model import AttentionAdapter
from server_app import screening
from server_app.strategy import FedClipStrategy
from tests.conftest import reply_from

HELD_OUT_NODE = 4
EVALUATED_ROUND_2 = [
    "d1#1",
    "d1#2",
    "d1#5",
    "d1#8",
    "d2#2",
    "d2#8",
    "d3#4",
    "d3#5",
    "d3#7",
]  # seed 3 (see the test that pins it)
NODES = {1: "art", 2: "photo", 3: "cartoon", HELD_OUT_NODE: "sketch"}


def adapter_arrays(seed: int, dim: int = 6) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.numpy() for k, v in AttentionAdapter(dim).state_dict().items()}


def train_reply(node: int, arrays: dict[str, np.ndarray], num_examples: int = 10):
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"train-loss": 0.5, "num-examples": num_examples}),
            "info": ConfigRecord({"domain": NODES[node]}),
        }
    )
    return reply_from(node, content)


def strategy(weighting: str = "equal", min_train_nodes: int = 1) -> FedClipStrategy:
    return FedClipStrategy(dict(NODES), "sketch", adapter_arrays(0), weighting, min_train_nodes, FedClip())


@pytest.mark.parametrize("weighting,expected", [("equal", (0.5, 0.5)), ("examples", (0.75, 0.25))])
def test_aggregate_train_weighting(weighting, expected):
    a, b = adapter_arrays(1), adapter_arrays(2)
    arrays, metrics = strategy(weighting).aggregate_train(1, [train_reply(1, a, 30), train_reply(2, b, 10)])
    assert set(arrays.keys()) == set(a)  # only the adapter's tensors, nothing else
    for key in a:
        # the exact weighted mean
        np.testing.assert_allclose(arrays[key].numpy(), expected[0] * a[key] + expected[1] * b[key], rtol=1e-6)
        assert arrays[key].numpy().dtype == np.float32
    assert metrics["art/num-examples"] == 30 and metrics["photo/train-loss"] == 0.5


def test_the_mean_is_the_same_to_the_bit_whatever_order_the_replies_arrive_in():
    """Updates are summed in client order, so arrival order (the network's, Ray's) never moves the last bits (summed in
    arrival order, these three differ in the last bits: the test fails without the sort)."""
    rng = np.random.default_rng(0)
    updates = {
        node: {k: v + rng.normal(0, 10.0, v.shape).astype(np.float32) for k, v in adapter_arrays(node).items()}
        for node in (1, 2, 3)
    }
    results = []
    for order in ([1, 2, 3], [3, 1, 2], [2, 3, 1]):
        arrays, _ = strategy("examples").aggregate_train(1, [train_reply(n, updates[n], 7 * n) for n in order])
        results.append({k: v.numpy().tobytes() for k, v in arrays.items()})
    assert results[0] == results[1] == results[2]


def corrupt(kind: str) -> dict[str, np.ndarray]:
    bad = adapter_arrays(3)
    if kind == "missing key":
        del bad["fc2.bias"]
    elif kind == "extra key":
        bad["clip.visual.weight"] = np.zeros((2, 2), np.float32)
    elif kind == "wrong shape":
        bad["fc1.weight"] = np.zeros((7, 6), np.float32)
    elif kind == "wrong dtype":
        bad["fc1.bias"] = bad["fc1.bias"].astype(np.float64)
    elif kind == "nan":
        bad["fc2.weight"][0, 0] = np.nan
    elif kind == "inf":
        bad["fc1.bias"][1] = np.inf
    return bad


@pytest.mark.parametrize(
    "kind,reason",
    [
        ("missing key", "tensor names differ (missing ['fc2.bias'], unexpected [])"),
        ("extra key", "tensor names differ (missing [], unexpected ['clip.visual.weight'])"),
        ("wrong shape", "fc1.weight has shape (7, 6), expected (6, 6)"),
        ("wrong dtype", "fc1.bias has dtype float64, expected float32"),
        ("nan", "fc2.weight holds NaN or Inf"),
        ("inf", "fc1.bias holds NaN or Inf"),
    ],
)
def test_malformed_update_is_dropped_and_the_rest_aggregated(kind, reason, caplog):
    good1, good2 = adapter_arrays(1), adapter_arrays(2)
    replies = [train_reply(1, good1), train_reply(2, corrupt(kind)), train_reply(3, good2)]
    arrays, metrics = strategy().aggregate_train(5, replies)
    for key in good1:
        np.testing.assert_allclose(arrays[key].numpy(), (good1[key] + good2[key]) / 2, rtol=1e-6)
    assert f"round 5: dropped the update of node 2 (photo): {reason}" in caplog.text
    # a dropped reply's metrics are left out too
    assert "photo/train-loss" not in metrics and "art/train-loss" in metrics


@pytest.mark.parametrize(
    "content,reason",
    [
        (RecordDict({"metrics": MetricRecord({"num-examples": 10})}), "no 'arrays' record"),
        (
            RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in adapter_arrays(2).items()})}),
            "no 'metrics' record with 'num-examples'",
        ),
        (
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in adapter_arrays(2).items()}),
                    "metrics": MetricRecord({"train-loss": 1.0}),
                }
            ),
            "no 'metrics' record with 'num-examples'",
        ),
    ],
)
def test_a_reply_without_its_records_is_dropped(content, reason, caplog):
    good = adapter_arrays(1)
    arrays, _ = strategy().aggregate_train(1, [train_reply(1, good), reply_from(2, content)])
    for key in good:
        np.testing.assert_array_equal(arrays[key].numpy(), good[key])
    assert f"dropped the update of node 2 (photo): {reason}" in caplog.text


def test_train_metrics_are_the_replies_own_without_the_evaluation_they_carry():
    fused = train_reply(1, adapter_arrays(1))
    fused.content["metrics"]["evaluation/val-acc"] = 0.5
    _, metrics = strategy().aggregate_train(1, [fused])
    # no update-norm: no round was configured, no base
    assert dict(metrics) == {
        "art/train-loss": 0.5,
        "art/num-examples": 10,
    }


def test_update_norms_are_measured_from_the_weights_sent(caplog):
    s = strategy()
    sent = adapter_arrays(0)
    s.configure_train(1, ArrayRecord({k: Array(v) for k, v in sent.items()}), ConfigRecord(), None)
    moved = {k: v + 0.5 for k, v in sent.items()}
    _, metrics = s.aggregate_train(1, [train_reply(1, moved), train_reply(2, sent)])
    assert metrics["art/update-norm"] == pytest.approx(0.5 * np.sqrt(sum(v.size for v in sent.values())))
    assert metrics["photo/update-norm"] == 0.0


@pytest.mark.parametrize(
    "reply,reason",
    [
        (reply_from(1, error="Node Unavailable", message_type=MessageType.QUERY), "the query failed: Node Unavailable"),
        (
            reply_from(1, RecordDict({"info": ConfigRecord({"domain": "art"})}), message_type=MessageType.QUERY),
            "its query reply lacks 'info' or the metrics ['feature-dim', 'num-images', 'num-skipped', 'num-test', "
            "'num-train', 'num-val']",
        ),
        (
            reply_from(
                1,
                RecordDict({"metrics": MetricRecord({k: 1 for k in wire.QUERY_METRICS})}),
                message_type=MessageType.QUERY,
            ),
            "its query reply lacks 'info'",
        ),
        (
            reply_from(
                1,
                RecordDict({"info": ConfigRecord({"domain": "art"}), "metrics": MetricRecord({"num-images": 3})}),
                message_type=MessageType.QUERY,
            ),
            "its query reply lacks 'info' or the metrics",
        ),
        (
            reply_from(
                1,
                RecordDict(
                    {
                        "info": ConfigRecord({"domain": "art"}),
                        "metrics": MetricRecord({k: 1 for k in wire.QUERY_METRICS}),
                    }
                ),
                message_type=MessageType.QUERY,
            ),
            None,
        ),
        (
            reply_from(
                1, RecordDict({"info": ConfigRecord({"idle": "no data in this run"})}), message_type=MessageType.QUERY
            ),
            None,
        ),
    ],
)
def test_discovery_answers_are_checked(reply, reason):
    found = screening.query_answer(reply)
    assert found == reason if reason is None else found.startswith(reason)


def test_an_evaluate_reply_with_only_evaluation_prefixed_metrics_has_no_evaluation(caplog):
    odd = reply_from(
        2, RecordDict({"metrics": MetricRecord({"evaluation/val-acc": 0.5})}), message_type=MessageType.EVALUATE
    )
    lost = reply_from(3, error="Node Unavailable", message_type=MessageType.EVALUATE)
    assert dict(strategy().aggregate_evaluate(4, [odd, lost])) == {}
    assert "round 4: evaluation of node 2 (photo) left out: no evaluation metrics" in caplog.text
    assert "round 4: evaluation of node 3 (cartoon) left out: Node Unavailable" in caplog.text


@pytest.mark.parametrize("num_examples", [0, -5, float("inf"), float("nan")])
def test_error_replies_and_bad_example_counts_are_dropped(num_examples, caplog):
    good = adapter_arrays(1)
    replies = [
        train_reply(1, good, 7),
        reply_from(2, error="CUDA out of memory"),
        train_reply(3, adapter_arrays(2), num_examples),
    ]
    arrays, _ = strategy("examples").aggregate_train(2, replies)
    for key in good:
        np.testing.assert_allclose(arrays[key].numpy(), good[key])
    assert "CUDA out of memory" in caplog.text and "num-examples must be a positive finite number" in caplog.text


@pytest.mark.parametrize("payload", ["lying shape", "garbage bytes"])
def test_payload_that_does_not_match_its_declared_shape_is_dropped(payload, caplog):
    good = adapter_arrays(1)
    record = ArrayRecord({k: Array(v) for k, v in adapter_arrays(2).items()})
    real = record["fc1.bias"]
    if payload == "lying shape":  # declares the right shape, carries a smaller array
        small = Array(np.zeros(3, np.float32))
        record["fc1.bias"] = Array(dtype=real.dtype, shape=real.shape, stype=small.stype, data=small.data)
    else:
        record["fc1.bias"] = Array(dtype=real.dtype, shape=real.shape, stype=real.stype, data=b"not an array")
    content = RecordDict(
        {"arrays": record, "metrics": MetricRecord({"num-examples": 10}), "info": ConfigRecord({"domain": "photo"})}
    )
    arrays, _ = strategy().aggregate_train(1, [train_reply(1, good), reply_from(2, content)])
    for key in good:
        np.testing.assert_allclose(arrays[key].numpy(), good[key])
    assert "dropped the update of node 2 (photo): fc1.bias" in caplog.text


def test_evaluation_reply_without_metrics_is_left_out(caplog):
    ok = reply_from(1, RecordDict({"metrics": MetricRecord({"val-acc": 0.5})}), message_type=MessageType.EVALUATE)
    empty = reply_from(2, RecordDict({"info": ConfigRecord({"domain": "photo"})}), message_type=MessageType.EVALUATE)
    metrics = strategy().aggregate_evaluate(
        1, [ok, empty, reply_from(3, error="lost", message_type=MessageType.EVALUATE)]
    )
    assert dict(metrics) == {"art/val-acc": 0.5}
    assert "node 2 (photo) left out: no 'metrics' record" in caplog.text


def test_a_train_reply_carries_its_evaluation_in_its_metrics(caplog):
    fused = reply_from(1, RecordDict({"metrics": MetricRecord({"train-loss": 1.0, "evaluation/val-acc": 0.25})}))
    train_only = reply_from(2, RecordDict({"metrics": MetricRecord({"train-loss": 1.0, "val-acc": 0.9})}))
    metrics = strategy().aggregate_evaluate(1, [fused, train_only])
    assert dict(metrics) == {"art/val-acc": 0.25}  # train metrics are never taken for an evaluation
    assert "node 2 (photo) left out: its train reply carries no evaluation" in caplog.text


def test_sampling_is_seeded_and_keeps_every_held_out_node():
    nodes = {i: f"d{i % 4}" for i in range(40)}  # d0 is held out: 10 nodes; 30 training nodes
    clients = {i: f"d{i % 4}#{i // 4}" for i in nodes}  # 10 clients per domain
    sampled = FedClipStrategy(
        nodes,
        "d0",
        adapter_arrays(0),
        "equal",
        1,
        FedClip(),
        node_clients=clients,
        fraction_train=0.1,
        fraction_evaluate=0.2,
        seed=3,
        rounds=5,
    )
    again = FedClipStrategy(
        dict(nodes),
        "d0",
        adapter_arrays(0),
        "equal",
        1,
        FedClip(),
        node_clients=dict(clients),
        fraction_train=0.1,
        fraction_evaluate=0.2,
        seed=3,
        rounds=5,
    )
    assert sampled.train_sample(2) == again.train_sample(2)  # the same run draws the same clients
    assert len(sampled.train_sample(2)) == 3 and all(nodes[n] != "d0" for n in sampled.train_sample(2))
    assert len({tuple(sampled.train_sample(r)) for r in range(1, 6)}) > 1  # and other ones each round
    # round 2's weights: the 3 nodes training in round 3 evaluate on their train message; 3 more get an evaluate message
    evaluated = sampled.evaluate_sample(2)
    assert {n for n in evaluated if nodes[n] == "d0"} == {n for n in nodes if nodes[n] == "d0"}
    others = [n for n in evaluated if nodes[n] != "d0"]
    assert len(others) == 3 and not set(others) & set(sampled.train_sample(3))
    # the last round's weights have no next round to ride on: 6 training nodes get an evaluate message
    assert len([n for n in sampled.evaluate_sample(5) if nodes[n] != "d0"]) == 6
    for server_round in (2, 3):  # the train messages go to that round's draw
        sent = list(
            sampled.configure_train(
                server_round, ArrayRecord({k: Array(v) for k, v in adapter_arrays(0).items()}), ConfigRecord(), None
            )
        )
        assert [m.metadata.dst_node_id for m in sent] == sampled.train_sample(server_round)


def test_every_round_evaluates_the_training_nodes_that_do_not_carry_it_on_their_train_message():
    nodes = {i: f"d{i % 4}" for i in range(40)}
    clients = {i: f"d{i % 4}#{i // 4}" for i in nodes}
    s = FedClipStrategy(
        nodes,
        "d0",
        adapter_arrays(0),
        "equal",
        1,
        FedClip(),
        node_clients=clients,
        fraction_train=0.2,
        fraction_evaluate=0.5,
        seed=3,
        rounds=6,
    )
    for r in range(1, 6):
        others = [n for n in s.evaluate_sample(r) if nodes[n] != "d0"]
        # round r's weights are evaluated by round r+1's training nodes on their train message
        riding = set(s.train_sample(r + 1))
        assert len(riding) == 6 and len(others) == 15 - 6 and not set(others) & riding, r
    # the draw is pinned, as the training draw: the same run evaluates the same clients everywhere
    assert sorted(clients[n] for n in s.evaluate_sample(2) if nodes[n] != "d0") == EVALUATED_ROUND_2


def test_no_evaluate_message_to_a_training_node_when_the_riders_are_enough():
    s = FedClipStrategy(
        dict(NODES),
        "sketch",
        adapter_arrays(0),
        "equal",
        1,
        FedClip(),
        fraction_train=0.5,
        fraction_evaluate=0.1,
        rounds=3,
    )
    # 2 riders >= 10% of 3: no one else
    assert len(s.train_sample(2)) == 3 - 1 and s.evaluate_sample(1) == [HELD_OUT_NODE]


def test_full_participation_evaluates_the_non_training_nodes_only():
    s = FedClipStrategy(dict(NODES), "sketch", adapter_arrays(0), "equal", 1, FedClip(), rounds=3)
    assert sorted(s.train_sample(1)) == [1, 2, 3]
    assert s.evaluate_sample(1) == [HELD_OUT_NODE]  # the others evaluate on round 2's train message
    assert sorted(s.evaluate_sample(3)) == [1, 2, 3, HELD_OUT_NODE]  # the last evaluation


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_a_fraction_outside_0_1_is_an_error(fraction):
    with pytest.raises(ValueError, match="fraction_train"):
        FedClipStrategy(dict(NODES), "sketch", adapter_arrays(0), "equal", 1, FedClip(), fraction_train=fraction)
