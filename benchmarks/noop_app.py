"""Flower's floor: a ServerApp/ClientApp pair that sends FedCLIP's messages and does no work.

benchmarks/round_overhead.py runs it with `flwr run` (simulation and deployment) beside FedCLIP on
the same federation. Like the app, the server first asks every node which domain it holds (a query),
then each round sends an adapter-sized ArrayRecord (`2 * (d*d + d)` float32, the AttentionAdapter's
tensors for feature size d) to the sampled training nodes, which send an adapter-sized reply, and
an evaluate message with the adapter to the evaluated nodes (held-out domain always), which reply
with metrics only:
  exchanges=1: one push per round (the fused protocol): train and evaluate messages go out together;
  exchanges=2: train, then evaluate (the protocol of main before the fused round).
Replies are polled every `poll-seconds`, as the app polls. Seconds per round (push to the last
reply) are written as JSON to the run config's `out` file and logged.
"""

from __future__ import annotations

import json
import logging
import random
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
log = logging.getLogger(__name__)

server = ServerApp()
client = ClientApp()


def node_domain(context: Context) -> str:
    """The node's domain as FedCLIP reads it: node config `domain`, else partition-id // clients-per-domain."""
    if "domain" in context.node_config:
        return str(context.node_config["domain"])
    domains = str(context.run_config["domains"]).split(",")
    return domains[int(context.node_config["partition-id"]) // int(context.run_config["clients-per-domain"])]


@client.query()
def query(message: Message, context: Context) -> Message:
    return Message(RecordDict({"info": ConfigRecord({"domain": node_domain(context)})}), reply_to=message)


@client.train()
def train(message: Message, context: Context) -> Message:
    """The received adapter goes back unchanged, with the metrics a FedCLIP client reports."""
    metrics = MetricRecord({"train-loss": 0.0, "num-examples": 1, "train-seconds": 0.0, "images-encoded": 0})
    return Message(RecordDict({"arrays": message.content["arrays"], "metrics": metrics}), reply_to=message)


@client.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    metrics = MetricRecord({f"{s}-{m}": 0.0 for s in ("val", "test", "all") for m in ("acc", "loss")})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def exchange(grid: Grid, messages: list[Message], poll_seconds: float, timeout: float) -> list[Message]:
    """Push the messages and poll for every reply."""
    pending = {i for i in grid.push_messages(messages) if i}
    replies, deadline = [], time.time() + timeout
    while pending and time.time() < deadline:
        new = list(grid.pull_messages(pending))
        pending -= {r.metadata.reply_to_message_id for r in new}
        replies += new
        if pending:
            time.sleep(poll_seconds)
    if pending:
        raise RuntimeError(f"{len(pending)} node(s) sent no reply within {timeout} s")
    if errors := [r.error.reason for r in replies if r.has_error()]:
        raise RuntimeError(f"{len(errors)} error replies, e.g. {errors[0]}")
    return replies


def sample(nodes: list[int], fraction: float, rng: random.Random) -> list[int]:
    return sorted(rng.sample(nodes, max(1, round(fraction * len(nodes))))) if fraction < 1 else nodes


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    rounds, exchanges, poll, timeout = int(rc["rounds"]), int(rc["exchanges"]), float(rc["poll-seconds"]), float(rc["timeout"])
    expected = len(str(rc["domains"]).split(",")) * int(rc["clients-per-domain"])
    deadline = time.time() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.time() > deadline:
            raise RuntimeError(f"{len(nodes)} of {expected} nodes connected after {timeout} s")
        time.sleep(1)
    queries = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    domains = {r.metadata.src_node_id: str(r.content["info"]["domain"]) for r in exchange(grid, queries, poll, timeout)}
    held_out = [n for n in nodes if domains[n] == rc["held-out"]]
    training = [n for n in nodes if domains[n] != rc["held-out"]]
    dim = int(rc["adapter-dim"])
    adapter = ArrayRecord({  # AttentionAdapter(dim)'s tensors: fc1 and fc2, Linear(dim, dim) each
        f"{layer}.{p}": Array(np.zeros((dim, dim) if p == "weight" else (dim,), np.float32)) for layer in ("fc1", "fc2") for p in ("weight", "bias")
    })
    rng = random.Random(int(rc["seed"]))
    seconds = []
    for server_round in range(1, rounds + 1):
        t0 = time.time()
        grid.get_node_ids()  # the app refreshes its node list each round
        train_nodes = sample(training, float(rc["fraction-train"]), rng)
        eval_nodes = sorted(set(sample(training, float(rc["fraction-evaluate"]), rng)) | set(held_out))
        config = ConfigRecord({"server-round": server_round})

        def messages(node_ids: list[int], message_type: str) -> list[Message]:
            return [Message(RecordDict({"arrays": adapter, "config": config}), dst_node_id=n, message_type=message_type) for n in node_ids]

        if exchanges == 1:  # a node that trains also evaluates in the same message
            exchange(grid, messages(train_nodes, MessageType.TRAIN) + messages([n for n in eval_nodes if n not in train_nodes],
                                                                              MessageType.EVALUATE), poll, timeout)
        else:
            exchange(grid, messages(train_nodes, MessageType.TRAIN), poll, timeout)
            exchange(grid, messages(eval_nodes, MessageType.EVALUATE), poll, timeout)
        seconds.append(time.time() - t0)
        log.info("noop round %d: %d train + %d evaluate node(s), %d exchange(s): %.3f s", server_round, len(train_nodes),
                 len(eval_nodes), exchanges, seconds[-1])
    with open(str(rc["out"]), "w") as fh:
        json.dump({"round_seconds": seconds, "nodes": len(nodes), "adapter_bytes": sum(len(a.data) for a in adapter.values())}, fh)
