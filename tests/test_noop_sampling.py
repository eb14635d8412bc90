"""The round-overhead floor (benchmarks/noop_app.py) trains and evaluates the clients FedCLIP's strategy does.

The floor copies the app's sampling rather than importing it (it runs against older checkouts too);
these tests hold the copy to the original: for the same seed, clients and round, the same client
names, in the floor's in-process run and in FedClipStrategy's train_sample / evaluate_sample.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict

from benchmarks import noop_app
from common.methods.fedclip import FedClip
from common.partition import client_name
from server_app.sampling import sample_clients
from server_app.strategy import FedClipStrategy
from tests.inprocess import InProcessGrid

TEMPLATE = {"fc1.weight": np.zeros((2, 2), np.float32)}
# (domains, clients per domain, held out): 4, 10 and 100 clients
FEDERATIONS = {
    4: ("cartoon,painting,photo,sketch", 1, "sketch"),
    10: ("a,b,c,d,e", 2, "c"),
    100: ("cartoon,painting,photo,sketch", 25, "photo"),
}


def federation(clients: int) -> tuple[dict[int, str], dict[int, str], str, int]:
    """The app's view of the in-process nodes (node 100 + p holds partition p): node -> domain, node -> client name."""
    domains, k, held_out = FEDERATIONS[clients]
    names = domains.split(",")
    node_domains = {100 + p: names[p // k] for p in range(clients)}
    # the app's naming (common/partition.py)
    node_clients = {100 + p: client_name(names[p // k], p % k, k) for p in range(clients)}
    return node_domains, node_clients, held_out, k


def floor_samples(
    clients: int, fraction_train: float, fraction_evaluate: float, seed: int, rounds: int, min_train: int
) -> tuple[list[tuple[set[int], set[int]]], set[int]]:
    """Run the floor (one exchange a round) in this process: each round's (train, evaluate) destination nodes, and
    the last evaluation's."""
    domains, k, held_out = FEDERATIONS[clients]
    run_config = {
        "rounds": rounds,
        "exchanges": 1,
        "adapter-dim": 4,
        "domains": domains,
        "clients-per-domain": k,
        "held-out": held_out,
        "fraction-train": fraction_train,
        "fraction-evaluate": fraction_evaluate,
        "min-train-nodes": min_train,
        "poll-first": 0.0,
        "poll-max": 0.0,
        "timeout": 60,
        "seed": seed,
        "out": "/dev/null",
    }
    grid = InProcessGrid(noop_app.client, run_config, clients)
    pushes, push = [], grid.push_messages

    def recording_push(messages):
        messages = list(messages)
        pushes.append(messages)
        return push(messages)

    grid.push_messages = recording_push
    noop_app.server(grid, Context(1, 0, {}, RecordDict(), run_config))
    assert len(pushes) == 1 + rounds + 1  # the query, one push a round, the last evaluation
    to = lambda msgs, kind: {m.metadata.dst_node_id for m in msgs if m.metadata.message_type == kind}  # noqa: E731
    return [(to(p, MessageType.TRAIN), to(p, MessageType.EVALUATE)) for p in pushes[1:-1]], to(
        pushes[-1], MessageType.EVALUATE
    )


@pytest.mark.parametrize("clients", [4, 10, 100])
@pytest.mark.parametrize(
    "fraction_train, fraction_evaluate, min_train",
    [(0.1, 0.1, 1), (0.3, 0.5, 1), (0.5, 0.2, 1), (1.0, 1.0, 1), (0.1, 0.2, 3)],
)
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_floor_trains_and_evaluates_the_clients_fedclip_samples(
    clients, fraction_train, fraction_evaluate, min_train, seed
):
    rounds = 4
    node_domains, node_clients, held_out, _ = federation(clients)
    strategy = FedClipStrategy(
        node_domains,
        held_out,
        TEMPLATE,
        "equal",
        min_train,
        FedClip(),
        node_clients=node_clients,
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        seed=seed,
        rounds=rounds,
    )
    names = lambda nodes: sorted(node_clients[n] for n in nodes)  # noqa: E731
    per_round, last = floor_samples(clients, fraction_train, fraction_evaluate, seed, rounds, min_train)
    for server_round, (train, evaluate) in enumerate(per_round, start=1):
        # round r's push trains round r's sample and evaluates round r-1's weights on the nodes that do not train now
        assert names(train) == names(strategy.train_sample(server_round)), f"round {server_round}: train"
        assert names(evaluate) == names(strategy.evaluate_sample(server_round - 1)), f"round {server_round}: evaluate"
    assert names(last) == names(strategy.evaluate_sample(rounds))  # the last round's weights
    trained = [frozenset(names(t)) for t, _ in per_round]
    if fraction_train < 1 and clients > 4:
        assert len(set(trained)) > 1  # a new draw each round: the comparison is not of one constant sample


def test_floor_sample_clients_is_the_strategys():
    rng = random.Random(0)
    for _ in range(300):
        count = rng.choice([1, 3, 4, 10, 30, 100, 250])
        names = [client_name(f"d{rng.randrange(8)}", shard, 3) for shard in range(count)]
        names = list(dict.fromkeys(names)) or ["solo"]
        rng.shuffle(names)  # either sorts them first
        n, seed, purpose, server_round = (
            rng.randrange(len(names) + 2),
            rng.randrange(10**6),
            rng.choice(["train", "evaluate"]),
            rng.randrange(50),
        )
        ours = noop_app.sample_clients(list(names), n, seed, purpose, server_round)
        assert ours == sample_clients(list(names), n, seed, purpose, server_round)
        assert ours == sorted(ours) and len(ours) == min(n, len(names))


@pytest.mark.parametrize("k", [1, 3])
def test_floor_names_each_node_as_the_app_does(k):
    domains = ["cartoon", "painting", "photo", "sketch"]
    run_config = {"domains": ",".join(domains), "clients-per-domain": k}
    for p in range(len(domains) * k):  # simulation: partition p is shard p % k of domain p // k
        context = Context(1, 100 + p, {"partition-id": p, "num-partitions": len(domains) * k}, RecordDict(), run_config)
        assert noop_app.node_client(context) == client_name(domains[p // k], p % k, k)
    # deployment: node config domain (and shard)
    deployed = {"domain": "photo", "shard": k - 1} if k > 1 else {"domain": "photo"}
    assert noop_app.node_client(Context(1, 7, deployed, RecordDict(), run_config)) == client_name("photo", k - 1, k)
