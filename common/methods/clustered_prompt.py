"""Clustered prompts: PromptFL's shared context for everyone, and K cluster contexts, each averaged only over the sites
whose images look alike, so that a site with a few images gets the prompt of all the sites of its kind.

A site's signature is the mean of its training images' normalized features, each less its class's text feature (what
is left is mostly the style; `signature_of`). Its cluster is the nearest of K shared keys (cosine); it tunes that
cluster's context on its train split and sends it, with its signature in that cluster's key row and a one-hot of its
cluster. The server averages each cluster's context and key over that cluster's members only (federated k-means on the
signatures, one Lloyd step a round; IFCA's clustered federated learning, Ghosh et al. 2020, with the assignment by
signature instead of by loss). Round 1 has no keys yet: every site tunes cluster 0, and the server takes as keys K of
the sites' signatures, each the farthest from those already taken (deterministic, in client order), and gives every
cluster round 1's mean context.

The global context trains exactly as PromptFL's, so the held-out accuracy is PromptFL's; a new site predicts with it
(the server's run folder). A training site predicts with its cluster's context, in PromptFL's layout (its folder).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from omegaconf import DictConfig

from common import wire
from common.local_data import LocalData
from common.methods.base import Combine, Kept, Update
from common.methods.promptfl import CONTEXT, OPTIMIZER, PromptFL
from common.transport import decode

log = logging.getLogger(__name__)

CLUSTERS = "clusters.ctx"  # [K, n_ctx, text width]: each cluster's context
KEYS = "clusters.key"  # [K, feature dim]: each cluster's mean signature (all zero before round 1's)
MEMBERS = "clusters.members"  # [K]: a site's one-hot of its cluster (all zero in round 1); the server's: the shares
CLUSTER = "cluster"  # the client's state: its "index" [1] and "signature" [d]
CLUSTER_OPTIMIZER = "cluster-optimizer"  # the AdamW moments of its cluster's context (dropped when it changes cluster)


def signature_of(local: LocalData) -> torch.Tensor:
    """The mean over the site's training images of each one's normalized feature less its class's (the class prompt's
    normalized text feature), normalized: what is left says more of the style than of the class mix (zeros without a
    training image). With the plain mean, sites of 7 images split a style and mixed two on the demo."""
    rows = torch.as_tensor(local.split.train)
    if not len(rows):
        return torch.zeros(local.feats.image.shape[1])
    image = F.normalize(local.feats.image[rows], dim=-1)
    text = F.normalize(local.feats.text, dim=-1)[local.feats.labels[rows]]
    return F.normalize((image - text).mean(0), dim=0)


def nearest_cluster(keys: torch.Tensor, signature: torch.Tensor) -> int | None:
    """The cluster whose key is nearest the signature (cosine); None before the keys are set."""
    set_rows = keys.norm(dim=1) > 0
    if not set_rows.any():
        return None
    similarity = F.normalize(keys, dim=1) @ signature
    return int(torch.where(set_rows, similarity, torch.full_like(similarity, -2.0)).argmax())


def farthest_signatures(signatures: list[np.ndarray], k: int) -> list[int]:
    """k of the signatures (indices), the first one first and then each the least similar to those taken."""
    taken = [0]
    stacked = np.stack(signatures)
    while len(taken) < min(k, len(signatures)):
        closest = (stacked @ stacked[taken].T).max(axis=1)
        closest[taken] = np.inf
        taken.append(int(np.argmin(closest)))
    return taken


class ClusteredPrompt(PromptFL):
    """PromptFL's context, shared by all, and `clusters` cluster contexts, each averaged over its members; a site's
    cluster is the one whose key (its members' mean signature) is nearest its own."""

    averages_updates = False  # each cluster's mean is over its members: SecAgg+ and central DP do not apply

    def __init__(
        self,
        name: str = "clustered_prompt",
        init: str = "phrase",
        n_ctx: int = 16,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        clusters: int = 3,
        personalize_epochs: int = 0,
    ) -> None:
        super().__init__(name, init, n_ctx, lr, weight_decay, personalize_epochs)
        if clusters < 1:
            raise ValueError(f"method.clusters must be >= 1, got {clusters}")
        self.clusters = int(clusters)

    def initial_weights(self, cfg: DictConfig, feature_dim: int) -> dict[str, torch.Tensor]:
        weights = super().initial_weights(cfg, feature_dim)
        weights[CLUSTERS] = weights[CONTEXT].unsqueeze(0).repeat(self.clusters, 1, 1)
        weights[KEYS] = torch.zeros(self.clusters, feature_dim)
        weights[MEMBERS] = torch.zeros(self.clusters)
        return weights

    def train(
        self, local: LocalData, content: RecordDict, kept: Kept, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict]:
        received = decode(content[wire.ARRAYS])
        signature = signature_of(local)
        chosen = nearest_cluster(received[KEYS], signature)
        index = 0 if chosen is None else chosen
        record = self.kept_cluster(local, kept)
        if record is not None and int(record["index"]) != index:
            kept.pop(CLUSTER_OPTIMIZER, None)  # another cluster's context: its moments do not apply
        moments = {OPTIMIZER: kept[CLUSTER_OPTIMIZER]} if CLUSTER_OPTIMIZER in kept else {}
        tuned, _ = self._tune(
            self._text(local),
            received[CLUSTERS][index].clone(),
            local.feats,
            torch.as_tensor(local.split.train),
            local.cfg.training,
            local.generator(server_round, "cluster"),
            moments,
        )
        kept[CLUSTER_OPTIMIZER] = moments[OPTIMIZER]
        kept[CLUSTER] = {"index": torch.tensor([index]), "signature": signature}
        sent = {CLUSTERS: received[CLUSTERS].clone(), KEYS: received[KEYS].clone(), MEMBERS: torch.zeros(self.clusters)}
        sent[CLUSTERS][index], sent[KEYS][index] = tuned, signature
        if chosen is not None:
            sent[MEMBERS][index] = 1.0
        weights, metrics = super().train(local, content, kept, server_round)  # the global context, as PromptFL's
        return {**weights, **sent}, metrics

    def kept_cluster(self, local: LocalData, kept: Kept) -> dict[str, torch.Tensor] | None:
        """The cluster the client kept (its index and signature), or None. One that does not fit this run (a damaged
        file, another CLIP or K) is dropped with its optimiser's moments and a warning: the site starts afresh."""
        record = kept.get(CLUSTER)
        if record is None:
            return None
        index, signature = record.get("index"), record.get("signature")
        if (
            index is None
            or index.numel() != 1
            or not 0 <= int(index) < self.clusters
            or signature is None
            or tuple(signature.shape) != (local.feats.image.shape[1],)
        ):
            log.warning("client %s: its kept cluster does not fit this run's; it starts afresh", local.client)
            kept.pop(CLUSTER, None)
            kept.pop(CLUSTER_OPTIMIZER, None)
            return None
        return record

    def aggregate(self, updates: list[Update], combine: Combine) -> dict[str, np.ndarray] | None:
        """The global context by the strategy's rule over every update; each cluster's context and key by it over the
        cluster's members (a cluster with none keeps its own); round 1 (no member anywhere) sets the keys."""
        merged = combine([Update(u.client, {CONTEXT: u.state[CONTEXT]}, u.num_examples) for u in updates])
        ctx, keys = updates[0].state[CLUSTERS].copy(), updates[0].state[KEYS].copy()
        members = np.stack([u.state[MEMBERS] for u in updates])
        if not members.any():  # round 1: everyone tuned cluster 0 from the same start
            first = combine([Update(u.client, {"ctx": u.state[CLUSTERS][0]}, u.num_examples) for u in updates])
            ctx[:] = first["ctx"]
            ordered = sorted(updates, key=lambda u: u.client)
            signatures = [u.state[KEYS][0] for u in ordered]
            keys[:] = 0
            for row, taken in enumerate(farthest_signatures(signatures, self.clusters)):
                keys[row] = signatures[taken]
        for k in range(self.clusters):
            own = [u for u, m in zip(updates, members) if m[k] > 0.5]
            if not own:
                continue
            rows = [
                Update(u.client, {"ctx": u.state[CLUSTERS][k], "key": u.state[KEYS][k]}, u.num_examples) for u in own
            ]
            try:
                combined, why = combine(rows), "the result is not finite"
            except ValueError as err:
                combined, why = None, str(err)
            if combined is None or not all(np.isfinite(v).all() for v in combined.values()):
                # a robust rule that needs more updates than this cluster has (trimmed_mean gives NaN, bulyan refuses)
                log.warning(
                    "cluster %d: the rule cannot combine its %d update(s) (%s); it stays as it was", k, len(own), why
                )
                other = next((u for u, m in zip(updates, members) if m[k] <= 0.5), None)  # sent it as received
                if other is not None:
                    ctx[k], keys[k] = other.state[CLUSTERS][k], other.state[KEYS][k]
                continue
            ctx[k], keys[k] = combined["ctx"], combined["key"]
        shares = members.sum(0) / max(len(updates), 1)
        return {**merged, CLUSTERS: ctx, KEYS: keys, MEMBERS: shares.astype(np.float32)}

    def own_weights(
        self, local: LocalData, received: dict[str, torch.Tensor], kept: Kept
    ) -> dict[str, torch.Tensor] | None:
        """The context of the site's cluster (PromptFL's layout); None before the keys are set."""
        chosen = nearest_cluster(received[KEYS], signature_of(local))
        return None if chosen is None else {CONTEXT: received[CLUSTERS][chosen]}

    def site_weights(self, content: RecordDict, kept: Kept) -> dict[str, torch.Tensor] | None:
        """The weights the last evaluation fine-tuned (`personalize_epochs`), or the site's cluster's context."""
        fine_tuned = super().site_weights(content, kept)
        if fine_tuned is not None or CLUSTER not in kept:
            return fine_tuned
        received, signature = decode(content[wire.ARRAYS]), kept[CLUSTER].get("signature")
        if signature is None or tuple(signature.shape) != (received[KEYS].shape[1],):
            log.warning("the kept cluster does not fit this run's: no weights of the site's own")
            return None
        chosen = nearest_cluster(received[KEYS], signature)
        return None if chosen is None else {CONTEXT: received[CLUSTERS][chosen]}

    def describe(self, weights: dict[str, torch.Tensor]) -> str:
        described = super().describe({CONTEXT: weights[CONTEXT]})
        if CLUSTERS not in weights:
            return described
        return described + f", and {len(weights[CLUSTERS])} cluster contexts for the sites that trained"
