"""FedCLIP: each client trains the attention adapter on its cached frozen CLIP features; the server averages the
adapters."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, RecordDict
from omegaconf import DictConfig, OmegaConf

from common import wire
from common.local_data import LocalData
from common.methods.base import Kept, Method, keep_fine_tuned, scores
from common.model import AttentionAdapter
from common.train import evaluate_adapter, load_optimizer_state, make_optimizer, optimizer_state, train_adapter
from common.transport import decode

OPTIMIZER = "optimizer"  # what the client keeps between rounds: its AdamW state


class FedClip(Method):
    """The paper's method, with its reference code's defects fixed (cached features, a kept optimiser, decoupled decay).

    `personalize_epochs` > 0: before its personalization test each training client fine-tunes the
    received adapter this many epochs on its own train split, and reports `personalized-test-acc`; the adapter it
    tuned after the last round is the site's own (its folder, for fedclip-predict).
    """

    averages_updates = True

    def __init__(self, name: str = "fedclip", personalize_epochs: int = 0) -> None:
        super().__init__(name)
        self.personalize_epochs = int(personalize_epochs)

    def initial_weights(self, cfg: DictConfig, feature_dim: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(cfg.seed)
        return AttentionAdapter(feature_dim).state_dict()

    def train_rows(self, local: LocalData) -> tuple:
        """The features and rows a client trains on: its own train split."""
        return local.feats, torch.as_tensor(local.split.train)

    def train(
        self, local: LocalData, content: RecordDict, kept: Kept, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict]:
        feats, rows = self.train_rows(local)
        adapter = received_adapter(local, content[wire.ARRAYS])
        optimizer = make_optimizer(adapter, local.cfg.training)
        if OPTIMIZER in kept:
            load_optimizer_state(optimizer, kept[OPTIMIZER])
        loss = train_adapter(
            adapter, optimizer, feats, rows, local.cfg.training, local.generator(server_round, "train")
        )
        kept[OPTIMIZER] = optimizer_state(optimizer)
        return adapter.state_dict(), {wire.TRAIN_LOSS: loss, wire.NUM_EXAMPLES: len(rows), wire.IMAGES_ENCODED: 0}

    def evaluate(self, local: LocalData, content: RecordDict, kept: Kept, server_round: int, zero_shot: bool) -> dict:
        """Every adapter the message carries is evaluated and their accuracies averaged (the held-out node of
        method=local
        gets one per client); zero-shot CLIP on round 0."""
        if zero_shot:
            return scores(local, local.feats, [None])
        adapters = [received_adapter(local, record) for record in content.array_records.values()]
        metrics = scores(local, local.feats, adapters)
        if self.personalize_epochs > 0 and not local.held_out:
            adapter = adapters[0]
            optimizer = make_optimizer(adapter, local.cfg.training)
            personal = OmegaConf.merge(local.cfg.training, {"local_epochs": self.personalize_epochs})
            train_adapter(
                adapter,
                optimizer,
                local.feats,
                torch.as_tensor(local.split.train),
                personal,
                local.generator(server_round, "personalize"),
            )
            metrics["personalized-test-acc"] = evaluate_adapter(
                adapter, local.feats, {"test": local.split.test}, local.device
            )["test"][0]
            keep_fine_tuned(local, kept, server_round, adapter.state_dict())
        return metrics

    def image_head(self, weights: dict[str, torch.Tensor], feature_dim: int) -> AttentionAdapter:
        trained_on = weights["fc1.weight"].shape[1]
        if trained_on != feature_dim:
            raise ValueError(f"the adapter was trained on {trained_on} features, this CLIP gives {feature_dim}")
        adapter = AttentionAdapter(feature_dim)
        adapter.load_state_dict(weights)
        return adapter.eval()

    def describe(self, weights: dict[str, torch.Tensor]) -> str:
        return f"A FedCLIP attention adapter ({sum(t.numel() for t in weights.values()):,} parameters)"


def received_adapter(local: LocalData, arrays: ArrayRecord) -> AttentionAdapter:
    """An adapter with received weights, in float32 whatever strategy.transport_dtype they travelled in."""
    adapter = AttentionAdapter(local.feats.image.shape[1]).to(local.device)
    adapter.load_state_dict(decode(arrays))
    return adapter
