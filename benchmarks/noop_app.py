"""Flower's floor: a ServerApp/ClientApp pair that sends FedCLIP's messages and does no work.

benchmarks/round_overhead.py runs it with `flwr run` (simulation and deployment) beside FedCLIP on
the same federation. Like the app, the server first asks every node which domain it holds (a query);
then each round sends an adapter-sized ArrayRecord (`2 * (d*d + d)` float32, the AttentionAdapter's
tensors for feature size d) in a train message to the round's training sample, which replies with an
adapter-sized ArrayRecord, and in an evaluate message to the evaluated nodes, which reply with
metrics only. Samples are FedCLIP's: ceil(fraction * training clients), seeded; the held-out
domain's nodes are always evaluated.
  exchanges=1, the fused round: one push a round; a train message also carries the evaluation of
    the adapter it brings, so evaluate messages go to the held-out nodes (and to more training nodes
    only if fraction-evaluate > fraction-train); after the last round one evaluate-only push, counted
    in the last round.
  exchanges=2, the round before it: train, then evaluate (held-out nodes and the evaluation sample).
Replies are polled as the app polls (`poll-first`, doubling up to `poll-max`). Seconds per round (first push to last
reply) are written as JSON to the run config's `out` file and logged.
"""

from __future__ import annotations

import json
import logging
import math
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


def exchange(grid: Grid, messages: list[Message], poll: tuple[float, float], timeout: float) -> list[Message]:
    """Push the messages and poll for every reply: after poll[0] s, then twice as long each time, at most poll[1] s."""
    pending = {i for i in grid.push_messages(messages) if i}
    replies, deadline, wait = [], time.time() + timeout, poll[0]
    while pending and time.time() < deadline:
        new = list(grid.pull_messages(pending))
        pending -= {r.metadata.reply_to_message_id for r in new}
        replies += new
        if pending:
            time.sleep(wait)
            wait = min(2 * wait, poll[1])
    if pending:
        raise RuntimeError(f"{len(pending)} node(s) sent no reply within {timeout} s")
    if errors := [r.error.reason for r in replies if r.has_error()]:
        raise RuntimeError(f"{len(errors)} error replies, e.g. {errors[0]}")
    return replies


def sample(nodes: list[int], n: int, purpose: str, seed: int, server_round: int) -> list[int]:
    """n of the nodes, seeded by the run's seed, the purpose and the round."""
    return nodes if n >= len(nodes) else sorted(random.Random(f"{seed}/{purpose}/{server_round}").sample(nodes, n))


@server.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    rounds, exchanges, timeout = int(rc["rounds"]), int(rc["exchanges"]), float(rc["timeout"])
    poll = float(rc["poll-first"]), float(rc["poll-max"])
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
    seed, fraction_train, fraction_evaluate = int(rc["seed"]), float(rc["fraction-train"]), float(rc["fraction-evaluate"])

    def messages(node_ids: list[int], message_type: str, server_round: int) -> list[Message]:
        config = ConfigRecord({"server-round": server_round})
        return [Message(RecordDict({"arrays": adapter, "config": config}), dst_node_id=n, message_type=message_type) for n in node_ids]

    def evaluated(server_round: int, riding: list[int]) -> list[int]:
        """Held-out nodes, and training nodes not already evaluated by a train message, up to fraction-evaluate."""
        rest = [n for n in training if n not in riding]
        wanted = max(0, math.ceil(fraction_evaluate * len(training)) - len(riding))
        return held_out + sample(rest, wanted, "evaluate", seed, server_round)

    seconds = []
    for server_round in range(1, rounds + 1):
        t0 = time.time()
        grid.get_node_ids()  # the app refreshes its node list each round
        train_nodes = sample(training, math.ceil(fraction_train * len(training)), "train", seed, server_round)
        if exchanges == 1:  # the previous round's evaluation rides on this round's train messages
            exchange(grid, messages(train_nodes, MessageType.TRAIN, server_round)
                     + messages(evaluated(server_round - 1, train_nodes), MessageType.EVALUATE, server_round - 1), poll, timeout)
            if server_round == rounds:  # the last round's evaluation has no next round to ride on
                exchange(grid, messages(evaluated(server_round, []), MessageType.EVALUATE, server_round), poll, timeout)
        else:
            exchange(grid, messages(train_nodes, MessageType.TRAIN, server_round), poll, timeout)
            exchange(grid, messages(evaluated(server_round, []), MessageType.EVALUATE, server_round), poll, timeout)
        seconds.append(time.time() - t0)
        log.info("noop round %d: %d train node(s), %d exchange(s): %.3f s", server_round, len(train_nodes), exchanges, seconds[-1])
    with open(str(rc["out"]), "w") as fh:
        json.dump({"round_seconds": seconds, "nodes": len(nodes), "adapter_bytes": sum(len(a.data) for a in adapter.values())}, fh)
