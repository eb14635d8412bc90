"""The upper bound: one adapter trained on the pooled train splits of every training client, on one node.

Needs every client's data on that node's machine (simulation); one epoch of the pool per round.
"""

from __future__ import annotations

from common.local_data import LocalData
from common.methods.fedclip import FedClip


class Centralized(FedClip):
    combines_updates = False
    averages_updates = False

    def __init__(self, name: str = "centralized", personalize_epochs: int = 0) -> None:
        super().__init__(name, personalize_epochs)

    def train_nodes(self, nodes: list[int]) -> list[int]:
        return nodes[:1]

    def max_examples(self, client: str, num_train: dict[str, int]) -> int | None:
        return sum(num_train.values()) or None

    def train_rows(self, local: LocalData) -> tuple:
        return local.pooled_train()
