"""Nodes that come and go: lost nodes are named and left out, (re)connecting nodes are asked for their domain."""

from __future__ import annotations

import logging
import time

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from common.config import load_config
from server_app.federation import FederationError, discover_nodes, exchange, refresh_nodes

SUPERLINK = 1  # the id the SuperLink answers from for a node it lost (Flower's SUPERLINK_NODE_ID)
CLASSES = ["cat", "dog"]


def query_reply(node: int, domain: str, classes=CLASSES, dim: int = 8) -> dict:
    metrics = {"feature-dim": dim, "num-images": 10, "num-skipped": 0, "num-train": 6, "num-val": 2, "num-test": 2}
    return {"info": ConfigRecord({"domain": domain, "classes": classes}), "metrics": MetricRecord(metrics)}


class FakeGrid:
    """Connected nodes and how each answers: a dict of records, 'lost' (the SuperLink's error), an Error of its own
    or None (silence)."""

    def __init__(self, answers: dict[int, object]) -> None:
        self.answers = answers

    def get_node_ids(self):
        return list(self.answers)

    def push_messages(self, messages):
        self.sent = list(messages)
        for msg in self.sent:
            msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}"  # as the real grid does
        return [msg.metadata.message_id for msg in self.sent]

    def pull_messages(self, message_ids):
        replies = []
        for msg in self.sent:
            dst = msg.metadata.dst_node_id
            answer = self.answers[dst]
            if msg.metadata.message_id not in message_ids or answer is None:
                continue
            src = SUPERLINK if isinstance(answer, str) else dst
            meta = Metadata(
                run_id=1,
                message_id="",
                src_node_id=src,
                dst_node_id=0,
                reply_to_message_id=f"m{dst}",
                group_id="",
                created_at=time.time(),
                ttl=60,
                message_type=msg.metadata.message_type,
            )
            if isinstance(answer, str):  # "lost"
                replies.append(Message(error=Error(code=5, reason="Error: Node Unavailable"), metadata=meta))
            elif isinstance(answer, Error):
                replies.append(Message(error=answer, metadata=meta))
            else:
                replies.append(Message(content=RecordDict(answer), metadata=meta))
        return replies


def train_message(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)


def test_exchange_names_lost_and_silent_nodes_and_keeps_real_replies(caplog):
    grid = FakeGrid({11: {"metrics": MetricRecord({"x": 1.0})}, 12: "lost", 13: None})
    with caplog.at_level(logging.WARNING):
        replies = exchange(
            grid, [train_message(n) for n in (11, 12, 13)], 0.5, {11: "photo", 12: "cartoon", 13: "painting"}
        )
    assert [r.metadata.src_node_id for r in replies] == [11]
    assert "node 12 (cartoon) lost: Error: Node Unavailable" in caplog.text
    assert "node 13 (painting) sent no reply within 0.5s" in caplog.text


def test_refresh_forgets_lost_nodes_and_takes_back_their_domain(caplog):
    cfg = load_config("dataset.held_out=sketch")
    info = {d: MetricRecord(query_reply(0, d)["metrics"]) for d in ("photo", "cartoon", "sketch")}
    node_domains = {1001: "photo", 1002: "cartoon", 1003: "sketch"}
    node_clients = dict(node_domains)  # one client per domain: the client is the domain
    # cartoon's node is gone; 2002 is it restarted under a new id; before it (ids are asked in order)
    # 2000 claims cartoon with other classes and 2001 with another CLIP; 2003 claims a domain already
    # held, 2004 one the run did not start with
    grid = FakeGrid(
        {
            1001: None,
            1003: None,
            2000: query_reply(2000, "cartoon", ["cat"]),
            2001: query_reply(2001, "cartoon", dim=16),
            2002: query_reply(2002, "cartoon"),
            2003: query_reply(2003, "photo"),
            2004: query_reply(2004, "clipart"),
        }
    )
    with caplog.at_level(logging.INFO):
        refresh_nodes(grid, cfg, node_domains, node_clients, info, CLASSES, "", set(), {})
    assert node_domains == node_clients == {1001: "photo", 1003: "sketch", 2002: "cartoon"}
    assert "node 1002 (cartoon) is no longer connected" in caplog.text
    assert "node 2002 (re)joined holding 'cartoon'" in caplog.text
    assert "node 2003 left out: client 'photo' is already held" in caplog.text
    assert "node 2004 left out: client 'clipart' was not in this run" in caplog.text
    assert "node 2000 left out: its classes ['cat'] differ" in caplog.text
    assert "node 2001 left out: its CLIP gives 16 features, the run's 8" in caplog.text


def test_an_idle_node_is_logged_once_and_never_asked_again(caplog):
    cfg = load_config("dataset.held_out=sketch")
    info = {d: MetricRecord(query_reply(0, d)["metrics"]) for d in ("photo", "sketch")}
    node_domains, idle = {1001: "photo", 1003: "sketch"}, set()
    grid = FakeGrid(
        {1001: None, 1003: None, 3000: {"info": ConfigRecord({"idle": "no data in this run: partition-id 7"})}}
    )
    with caplog.at_level(logging.INFO):
        refresh_nodes(grid, cfg, node_domains, dict(node_domains), info, CLASSES, "", idle, {})
        grid.sent = []
        refresh_nodes(grid, cfg, node_domains, dict(node_domains), info, CLASSES, "", idle, {})
    assert idle == {3000} and grid.sent == []  # the second refresh asks nobody
    assert caplog.text.count("node 3000 is idle: no data in this run") == 1
    assert "Traceback" not in caplog.text and "left out" not in caplog.text


def refusal(node: int) -> Error:
    """What a site's warm ClientApp answers for an app it did not approve (gate/warm.py)."""
    return Error(
        code=ErrorCode.INVALID_FAB,
        reason=f"node {node} (photo) refused the app: app fedclip/fedclip 0.1.0 with SHA-256 ab12 is not approved",
    )


def test_a_run_every_site_refuses_stops_at_discovery_naming_each_refusal(caplog):
    cfg = load_config("dataset.held_out=sketch")
    nodes = (5001, 5002, 5003, 5004)
    with (
        caplog.at_level(logging.INFO),
        pytest.raises(FederationError, match=r"4 of 4 node\(s\) refused to run this app.*node 5001 \(photo\) refused"),
    ):
        discover_nodes(FakeGrid({n: refusal(n) for n in nodes}), cfg, "", set(), refused := {})
    assert sorted(refused) == list(nodes)
    for node in nodes:
        assert (
            f"node {node} refused the app: node {node} (photo) refused the app: app fedclip/fedclip 0.1.0 with "
            f"SHA-256 ab12" in caplog.text
        )


def test_a_refusing_node_is_left_out_once_and_the_others_train(caplog):
    cfg = load_config("dataset.held_out=sketch")
    grid = FakeGrid(
        {
            1001: query_reply(1001, "photo"),
            1002: refusal(1002),
            1003: query_reply(1003, "cartoon"),
            1004: query_reply(1004, "sketch"),
        }
    )
    idle, refused = set(), {}
    with caplog.at_level(logging.INFO):
        node_domains, node_clients, info, _, _ = discover_nodes(grid, cfg, "", idle, refused)
        grid.sent = []
        refresh_nodes(grid, cfg, node_domains, node_clients, info, CLASSES, "", idle, refused)
    assert node_domains == {1001: "photo", 1003: "cartoon", 1004: "sketch"} and list(refused) == [1002]
    assert grid.sent == []  # the refusing node is not asked again
    assert caplog.text.count("node 1002 refused the app") == 1
