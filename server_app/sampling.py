"""Who takes part in a round: the nodes that train, each round's train sample and the nodes evaluated.

Nodes are drawn by their client's name from the run's seed, the purpose and the round, so that the same run
draws the same clients whichever node ids they have (benchmarks/noop_app.py draws alike).
"""

from __future__ import annotations

import math
import random

from common.methods.base import Method


def sample_clients(clients: list[str], n: int, seed: int, purpose: str, server_round: int) -> list[str]:
    """n of the client names, sorted: the sorted names sampled by a generator seeded by the run's seed, the purpose
    ("train", "evaluate") and the round; all of them when n >= len(clients). benchmarks/noop_app.py draws the same
    way."""
    clients = sorted(clients)
    if n >= len(clients):
        return clients
    return sorted(random.Random(f"{seed}/{purpose}/{server_round}").sample(clients, n))


class RoundSampling:
    """FedClipStrategy's choice of nodes: strategy.fraction_train of the training nodes train each round (at least
    min_train_nodes), and at least strategy.fraction_evaluate of them are evaluated; held-out nodes always are."""

    node_domains: dict[int, str]
    node_clients: dict[int, str]
    held_out: str
    method: Method
    seed: int
    rounds: int  # the last round: its evaluation has no next round's training to ride on
    min_train_nodes: int
    fraction_train: float
    fraction_evaluate: float

    @property
    def train_nodes(self) -> list[int]:
        """The nodes that train: of every training domain's, those the method trains (in client order)."""
        nodes = sorted(
            (n for n, d in self.node_domains.items() if d != self.held_out), key=lambda n: self.node_clients[n]
        )
        return self.method.train_nodes(nodes)

    def _sample(self, nodes: list[int], n: int, purpose: str, server_round: int) -> list[int]:
        """n of the nodes, drawn by client name (sample_clients), in client order."""
        if n >= len(nodes):
            return nodes
        by_client = {self.node_clients[node]: node for node in nodes}
        return [by_client[client] for client in sample_clients(list(by_client), n, self.seed, purpose, server_round)]

    def train_sample(self, server_round: int) -> list[int]:
        """The nodes that train in a round: strategy.fraction_train of the training nodes (at least min_train_nodes)."""
        nodes = self.train_nodes
        return self._sample(
            nodes, max(self.min_train_nodes, math.ceil(self.fraction_train * len(nodes))), "train", server_round
        )

    def evaluate_sample(self, server_round: int) -> list[int]:
        """The nodes evaluated on round `server_round`'s weights that get an evaluate message: every held-out node,
        and training nodes that do not train in the next round (their train message carries the evaluation),
        drawn so that at least strategy.fraction_evaluate of the training nodes are evaluated."""
        training = [n for n, d in self.node_domains.items() if d != self.held_out]
        riding = set(self.train_sample(server_round + 1)) if server_round < self.rounds else set()
        rest = [n for n in training if n not in riding]
        wanted = max(0, math.ceil(self.fraction_evaluate * len(training)) - len(riding))
        return [n for n, d in self.node_domains.items() if d == self.held_out] + self._sample(
            rest, wanted, "evaluate", server_round
        )
