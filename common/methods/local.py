"""Local-only training (a baseline): each training client trains its own copy of what the method trains, never
averaged; the server keeps each client's and sends it back to it.

Generalization is the mean accuracy of the clients' weights on the held-out domain. `LocalOnly` makes any method
local-only; `Local` is FedCLIP's adapter so trained, `LocalPrompt` PromptFL's context, `LocalPersonalPrompt` the
personalized prompt (a site with its shared and its personal part, alone).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from omegaconf import DictConfig

from common import wire
from common.methods.base import Combine, Kept, Method, Update
from common.methods.fedclip import FedClip
from common.methods.personal_prompt import PersonalPrompt
from common.methods.promptfl import PromptFL
from common.transport import encode


class LocalOnly(Method):
    """Put before a method's class: the server keeps one set of weights per client, by client name (a node that rejoins
    under a new id goes on with its own)."""

    weights_name = None  # no global weights to save, resume or export
    combines_updates = False
    averages_updates = False

    @property
    def client_states(self) -> dict[str, dict[str, np.ndarray]]:
        return self.__dict__.setdefault("_client_states", {})

    def refuse(self, cfg: DictConfig) -> None:
        if cfg.resume:
            raise ValueError(
                f"resume= is not available for method={self.name}: its weights live on the clients, the checkpoint "
                "holds no global ones"
            )

    def records(self, client: str, arrays: ArrayRecord, held_out: bool) -> dict[str, ArrayRecord]:
        """A training client continues its own weights; the held-out clients are evaluated with every client's."""
        if held_out and self.client_states:
            return {f"{wire.ARRAYS}/{other}": encode(state, "float32") for other, state in self.client_states.items()}
        return {wire.ARRAYS: encode(self.client_states[client], "float32") if client in self.client_states else arrays}

    def update_base(self, client: str, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.client_states.get(client, global_state)

    def aggregate(self, updates: list[Update], combine: Combine) -> None:
        for update in updates:
            self.client_states[update.client] = update.state
        return None

    def site_weights(self, content: RecordDict, kept: Kept) -> None:
        """None: a reference run keeps no weights at the sites (they have no method name to predict with, weights_name
        is None), and the fine-tuned ones it measures leave the client's state."""
        super().site_weights(content, kept)
        return None


class Local(LocalOnly, FedClip):
    def __init__(self, name: str = "local", personalize_epochs: int = 0) -> None:
        super().__init__(name, personalize_epochs)


class LocalPrompt(LocalOnly, PromptFL):
    """PromptFL's context, each client's own (its options are PromptFL's; conf/method/local_prompt.yaml names it)."""


class LocalPersonalPrompt(LocalOnly, PersonalPrompt):
    """The personalized prompt, each client alone (its options are PersonalPrompt's)."""
