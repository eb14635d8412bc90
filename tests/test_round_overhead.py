"""The round-overhead benchmark's floor sends what FedCLIP sends, and its data is what the app reads.

The floor (benchmarks/noop_app.py) runs here in-process (tests/inprocess.py), not with `flwr run`:
benchmarks/round_overhead.py runs it for real; this checks what it sends.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, Context, MessageType, RecordDict

from benchmarks import noop_app
from benchmarks.round_overhead import DOMAINS, HELD_OUT, make_folder, parse_sizes
from common.config import load_config
from common.demo import DIGIT_NAMES
from common.model import AttentionAdapter
from common.partition import client_images
from tests.inprocess import InProcessGrid


def run_floor(
    tmp_path, clients: int, exchanges: int, fraction: float = 1.0, rounds: int = 3
) -> tuple[list[list], dict]:
    """Run the floor's ServerApp against its ClientApp in this process; the messages of each push, and its results."""
    out = tmp_path / "floor.json"
    run_config = {
        "rounds": rounds,
        "exchanges": exchanges,
        "adapter-dim": 64,
        "domains": ",".join(DOMAINS),
        "clients-per-domain": clients // len(DOMAINS),
        "held-out": HELD_OUT,
        "fraction-train": fraction,
        "fraction-evaluate": fraction,
        "poll-first": 0.0,
        "poll-max": 0.0,
        "timeout": 60,
        "seed": 0,
        "out": str(out),
    }
    grid = InProcessGrid(noop_app.client, run_config, clients)
    pushes, push = [], grid.push_messages

    def recording_push(messages):
        messages = list(messages)
        ids = push(messages)
        pushes.append([(m, grid.replies[i]) for m, i in zip(messages, ids)])
        return ids

    grid.push_messages = recording_push
    noop_app.server(grid, Context(1, 0, {}, RecordDict(), run_config))
    return pushes, json.loads(out.read_text())


def test_floor_sends_fedclip_adapter_each_round_in_one_push(tmp_path):
    pushes, result = run_floor(tmp_path, clients=8, exchanges=1)
    # the query, one push per round, the last evaluation
    assert len(pushes) == 1 + 3 + 1 and len(result["round_seconds"]) == 3
    adapter = {k: tuple(v.shape) for k, v in AttentionAdapter(64).state_dict().items()}
    sent_by_app = ArrayRecord(AttentionAdapter(64).state_dict())  # what the app sends: 2*(64*64+64) float32, serialized
    assert result["adapter_bytes"] == sum(len(a.data) for a in sent_by_app.values())
    assert {m.metadata.message_type for m, _ in pushes[-1]} == {MessageType.EVALUATE} and len(pushes[-1]) == 8
    for round_messages in pushes[1:]:
        types = [m.metadata.message_type for m, _ in round_messages]
        if (
            round_messages is not pushes[-1]
        ):  # a train message also evaluates: evaluate messages go to the 2 held-out of 8
            assert types.count(MessageType.TRAIN) == 6 and types.count(MessageType.EVALUATE) == 2
        for message, reply in round_messages:
            assert {k: tuple(a.shape) for k, a in message.content["arrays"].items()} == adapter
            if message.metadata.message_type == MessageType.TRAIN:  # an adapter-sized reply, as a training client sends
                assert {k: tuple(a.shape) for k, a in reply.content["arrays"].items()} == adapter
            else:
                assert not reply.content.array_records


def test_floor_two_exchanges_and_sampling_always_evaluate_held_out(tmp_path):
    pushes, _ = run_floor(tmp_path, clients=40, exchanges=2, fraction=0.1)
    held_out = {100 + p for p in range(30, 40)}  # partitions 30..39 hold sketch, the 4th domain
    trained = []
    for train, evaluate in zip(pushes[1::2], pushes[2::2]):
        assert {m.metadata.message_type for m, _ in train} == {MessageType.TRAIN}
        assert {m.metadata.message_type for m, _ in evaluate} == {MessageType.EVALUATE}
        train_nodes = {m.metadata.dst_node_id for m, _ in train}
        evaluated = {m.metadata.dst_node_id for m, _ in evaluate}
        assert len(train_nodes) == 3 and not train_nodes & held_out  # 10% of the 30 training clients
        assert held_out <= evaluated and len(evaluated - held_out) == 3
        trained.append(train_nodes)
    assert len({frozenset(t) for t in trained}) > 1  # a new sample each round


def test_floor_one_exchange_with_sampling_evaluates_through_train_messages(tmp_path):
    pushes, _ = run_floor(tmp_path, clients=40, exchanges=1, fraction=0.1)
    held_out = {100 + p for p in range(30, 40)}
    for push in pushes[1:-1]:  # train the sample; only the held-out nodes need an evaluate message
        assert {m.metadata.dst_node_id for m, _ in push if m.metadata.message_type == MessageType.EVALUATE} == held_out
        assert sum(m.metadata.message_type == MessageType.TRAIN for m, _ in push) == 3
    last = {m.metadata.dst_node_id for m, _ in pushes[-1]}  # the last evaluation: held out and 10% of the others
    assert held_out <= last and len(last) == 13


def test_synthetic_folder_gives_each_client_its_images(tmp_path):
    root = make_folder(tmp_path / "data", clients=8, images_per_client=10)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(DOMAINS)
    assert sorted(p.name for p in (root / "photo").iterdir()) == sorted(DIGIT_NAMES)
    cfg = load_config(f"dataset=folder dataset.root={root} dataset.held_out={HELD_OUT} dataset.clients_per_domain=2")
    assert [len(client_images(cfg, d, s)) for d in DOMAINS for s in (0, 1)] == [10] * 8


def test_sizes_parse_and_reject_uneven_federations():
    assert parse_sizes("4,1000@0.1") == [(4, 1.0), (1000, 0.1)]
    with pytest.raises(Exception, match="multiple of 4"):
        parse_sizes("10")
