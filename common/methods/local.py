"""Local-only adapters: each training client trains its own adapter, never averaged (a baseline).

Generalization is the mean accuracy of the clients' adapters on the held-out domain.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from common import wire
from common.methods.base import Combine, Update
from common.methods.fedclip import FedClip
from common.transport import encode


class Local(FedClip):
    """The server keeps one adapter per client, by client name (a node that rejoins under a new id goes on with its
    own)."""

    weights_name = None  # no global adapter to save, resume or export
    combines_updates = False
    averages_updates = False

    def __init__(self, name: str = "local", personalize_epochs: int = 0) -> None:
        super().__init__(name, personalize_epochs)
        self.client_states: dict[str, dict[str, np.ndarray]] = {}

    def refuse(self, cfg: DictConfig) -> None:
        if cfg.resume:
            raise ValueError(
                "resume= is not available for method=local: its adapters live on the clients, the checkpoint holds "
                "no global one"
            )

    def records(self, client: str, arrays: ArrayRecord, held_out: bool) -> dict[str, ArrayRecord]:
        """A training client continues its own adapter; the held-out clients are evaluated with every client's."""
        if held_out and self.client_states:
            return {f"{wire.ARRAYS}/{other}": encode(state, "float32") for other, state in self.client_states.items()}
        return {wire.ARRAYS: encode(self.client_states[client], "float32") if client in self.client_states else arrays}

    def update_base(self, client: str, global_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.client_states.get(client, global_state)

    def aggregate(self, updates: list[Update], combine: Combine) -> None:
        for update in updates:
            self.client_states[update.client] = update.state
        return None
