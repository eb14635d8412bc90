"""Flower's floor: a ServerApp/ClientApp pair that sends FedCLIP's messages and does no work.

benchmarks/round_overhead.py runs it with `flwr run` (simulation and deployment) beside FedCLIP on the
same federation. Like the app, the server first asks every node which domain and client it holds (a
query); then each round sends an adapter-sized ArrayRecord (`2 * (d*d + d)` float32, the
AttentionAdapter's tensors for feature size d) in a train message to the round's training sample, which
replies with an adapter-sized ArrayRecord, and in an evaluate message to the evaluated nodes, which
reply with metrics only. Samples are FedCLIP's, client for client: drawn by client name as FedCLIP's
strategy draws them (`sample_clients` here copies server_app/sampling.py's, and the sizes are its
train_sample's and evaluate_sample's: max(min-train-nodes, ceil(fraction-train * training clients))
train; at least ceil(fraction-evaluate * training clients) evaluated, those training next round on their
train message; tests/test_noop_sampling.py checks both choose the same clients); the held-out domain's
nodes are always evaluated. A node's client name is FedCLIP's (common.partition.client_name): its domain, or
"<domain>#<shard>" with several clients per domain, the shard being node config `shard` (deployment) or
partition-id % clients-per-domain (simulation). This file imports none of FedCLIP's code: it is also run
against older checkouts, so what it shares with the app is copied, not imported.
  exchanges=1, the fused round: one push a round; a train message also carries the evaluation of
    the adapter it brings, so evaluate messages go to the held-out nodes (and to more training nodes
    only if fraction-evaluate > fraction-train); after the last round one evaluate-only push, counted
    in the last round.
  exchanges=2, the round before it: train, then evaluate (held-out nodes and the evaluation sample).
Replies are polled as the app polls (`poll-first`, doubling up to `poll-max`): exchange() mirrors
server_app/federation.py's exchange() deliberately, so that the floor pays the app's polling. Seconds per
round (first push to last reply) are written as JSON to the run config's `out` file and logged.
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


def node_client(context: Context) -> str:
    """The node's client name as FedCLIP's (common.partition.client_name): the domain with one client per domain, else
    "<domain>#<shard>", the shard being node config `shard` (default 0) where `domain` is set, else partition-id %
    clients-per-domain."""
    k = int(context.run_config["clients-per-domain"])
    shard = (
        int(context.node_config.get("shard", 0))
        if "domain" in context.node_config
        else int(context.node_config["partition-id"]) % k
    )
    return node_domain(context) if k == 1 else f"{node_domain(context)}#{shard}"


@client.query()
def query(message: Message, context: Context) -> Message:
    return Message(
        RecordDict({"info": ConfigRecord({"domain": node_domain(context), "client": node_client(context)})}),
        reply_to=message,
    )


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
    """Push the messages and poll for every reply: after poll[0] s, then twice as long each time, at most poll[1] s.

    It mirrors server_app/app.py's exchange() deliberately (pushes, then pulls with the same backoff): the floor
    must wait for replies as the app waits, or the ratio would measure polling, not the app's work.
    """
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


def sample_clients(clients: list[str], n: int, seed: int, purpose: str, server_round: int) -> list[str]:
    """n of the client names, sorted, as FedCLIP draws them (a copy of server_app.sampling.sample_clients): the sorted
    names sampled by a generator seeded by the run's seed, the purpose and the round; all of them when n >=
    len(clients)."""
    clients = sorted(clients)
    if n >= len(clients):
        return clients
    return sorted(random.Random(f"{seed}/{purpose}/{server_round}").sample(clients, n))


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
    queries = [
        Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
    ]
    info = {r.metadata.src_node_id: r.content["info"] for r in exchange(grid, queries, poll, timeout)}
    # client name -> node id: the samples are drawn by name, as FedCLIP's
    node_of = {str(i["client"]): n for n, i in info.items()}
    if len(node_of) < len(info):
        raise RuntimeError(
            f"{len(info)} nodes hold only {len(node_of)} distinct clients: each node must hold its own domain/shard"
        )
    held_out = sorted(c for c, n in node_of.items() if info[n]["domain"] == rc["held-out"])
    training = sorted(c for c, n in node_of.items() if info[n]["domain"] != rc["held-out"])
    dim = int(rc["adapter-dim"])
    adapter = ArrayRecord(
        {  # AttentionAdapter(dim)'s tensors: fc1 and fc2, Linear(dim, dim) each
            f"{layer}.{p}": Array(np.zeros((dim, dim) if p == "weight" else (dim,), np.float32))
            for layer in ("fc1", "fc2")
            for p in ("weight", "bias")
        }
    )
    seed, fraction_train, fraction_evaluate = (
        int(rc["seed"]),
        float(rc["fraction-train"]),
        float(rc["fraction-evaluate"]),
    )
    # FedCLIP's strategy.min_train_nodes (an older pyproject lacks the key)
    min_train = int(rc.get("min-train-nodes", 1))

    def messages(clients: list[str], message_type: str, server_round: int) -> list[Message]:
        config = ConfigRecord({"server-round": server_round})
        return [
            Message(
                RecordDict({"arrays": adapter, "config": config}), dst_node_id=node_of[c], message_type=message_type
            )
            for c in clients
        ]

    def evaluated(server_round: int, riding: list[str]) -> list[str]:
        """Held-out clients, and training clients not already evaluated by a train message, up to fraction-evaluate."""
        rest = [c for c in training if c not in riding]
        wanted = max(0, math.ceil(fraction_evaluate * len(training)) - len(riding))
        return held_out + sample_clients(rest, wanted, seed, "evaluate", server_round)

    seconds = []
    for server_round in range(1, rounds + 1):
        t0 = time.time()
        grid.get_node_ids()  # the app refreshes its node list each round
        train_clients = sample_clients(
            training, max(min_train, math.ceil(fraction_train * len(training))), seed, "train", server_round
        )
        if exchanges == 1:  # the previous round's evaluation rides on this round's train messages
            exchange(
                grid,
                messages(train_clients, MessageType.TRAIN, server_round)
                + messages(evaluated(server_round - 1, train_clients), MessageType.EVALUATE, server_round - 1),
                poll,
                timeout,
            )
            if server_round == rounds:  # the last round's evaluation has no next round to ride on
                exchange(grid, messages(evaluated(server_round, []), MessageType.EVALUATE, server_round), poll, timeout)
        else:
            exchange(grid, messages(train_clients, MessageType.TRAIN, server_round), poll, timeout)
            exchange(grid, messages(evaluated(server_round, []), MessageType.EVALUATE, server_round), poll, timeout)
        seconds.append(time.time() - t0)
        log.info(
            "noop round %d: %d training client(s), %d exchange(s): %.3f s",
            server_round,
            len(train_clients),
            exchanges,
            seconds[-1],
        )
    with open(str(rc["out"]), "w") as fh:
        json.dump(
            {
                "round_seconds": seconds,
                "nodes": len(nodes),
                "adapter_bytes": sum(len(a.data) for a in adapter.values()),
            },
            fh,
        )
