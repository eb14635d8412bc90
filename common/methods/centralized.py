"""The upper bound: one set of weights trained on the pooled train splits of every training client, on one node.

Needs every client's data on that node's machine (simulation); one epoch of the pool per round. `Pooled` makes a
method that trains on `train_rows` so; `Centralized` is FedCLIP's adapter so trained, `CentralizedPrompt` PromptFL's
context.
"""

from __future__ import annotations

from common.local_data import LocalData
from common.methods.base import Method
from common.methods.fedclip import FedClip
from common.methods.promptfl import PromptFL


class Pooled(Method):
    """Put before a method's class: the first training node trains, on every training client's train split."""

    combines_updates = False
    averages_updates = False

    def train_nodes(self, nodes: list[int]) -> list[int]:
        return nodes[:1]

    def max_examples(self, client: str, num_train: dict[str, int]) -> int | None:
        return sum(num_train.values()) or None

    def train_rows(self, local: LocalData) -> tuple:
        return local.pooled_train()


class Centralized(Pooled, FedClip):
    def __init__(self, name: str = "centralized", personalize_epochs: int = 0) -> None:
        super().__init__(name, personalize_epochs)


class CentralizedPrompt(Pooled, PromptFL):
    """PromptFL's context on the pooled data (its options are PromptFL's; conf/method/centralized_prompt.yaml names
    it)."""
