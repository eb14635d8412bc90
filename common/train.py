"""The training step and evaluation of the adapter, on cached frozen features."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from common.features import DomainFeatures
from common.model import adapter_loss, class_logits

log = logging.getLogger(__name__)


def make_optimizer(
    params: nn.Module | list[nn.Parameter], cfg: DictConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """The paper's Adam settings with decoupled weight decay (AdamW), not the reference's L2 penalty; lr=cfg.lr
    unless given."""
    params = params.parameters() if isinstance(params, nn.Module) else params
    return torch.optim.AdamW(
        params, lr=cfg.lr if lr is None else lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state, so a client keeps it between rounds: each kind (AdamW's step, exp_avg,
    exp_avg_sq) of every parameter in one flat tensor. A few arrays, not one per parameter and kind: Flower decodes
    each array of a record on its own, and a client's state goes through a record twice a round."""
    state = optimizer.state_dict()["state"]
    if not state:
        return {}
    return {
        name: torch.cat([torch.as_tensor(state[i][name]).reshape(-1) for i in sorted(state)])
        for name in sorted(state[min(state)])
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_state`; a state that does not fit these parameters (another configuration, an older
    format) is left out with a warning: the optimiser starts afresh."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sizes = [p.numel() for p in params]
    state: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(params))}
    for name, value in flat.items():
        if value.numel() == len(params):  # one scalar per parameter (step)
            parts = [v.reshape(()) for v in value.reshape(-1)]
        elif value.numel() == sum(sizes):  # one value per weight (the moments)
            parts = [v.reshape(p.shape) for v, p in zip(value.reshape(-1).split(sizes), params)]
        else:
            log.warning(
                "a kept optimiser state (%s, %d values) does not fit %d parameters: the optimiser starts afresh",
                name,
                value.numel(),
                len(params),
            )
            return
        for i, part in enumerate(parts):
            state[i][name] = part.clone()
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def train_epochs(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: DictConfig,
    generator: torch.Generator,
) -> float:
    """`cfg.local_epochs` epochs of minibatches of cached features `x` (labels `y`), the loss on `logits_of(batch)`;
    the mean loss."""
    total, count = 0.0, 0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(y), generator=generator).to(x.device)
        for start in range(0, len(y), cfg.batch_size):  # the last, smaller batch is kept
            batch = order[start : start + cfg.batch_size]
            loss = adapter_loss(logits_of(x[batch]), y[batch], cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
    return total / max(count, 1)


def train_adapter(
    adapter: nn.Module,
    optimizer: torch.optim.Optimizer,
    feats: DomainFeatures,
    indices: torch.Tensor,
    cfg: DictConfig,
    generator: torch.Generator,
) -> float:
    """`cfg.local_epochs` epochs of minibatch training of the adapter on the given examples; returns the mean loss."""
    device = next(adapter.parameters()).device
    x, y = feats.image[indices].to(device), feats.labels[indices].to(device)
    text, scale = feats.text.to(device), feats.logit_scale.to(device)
    adapter.train()
    return train_epochs(lambda batch: class_logits(batch, text, scale, adapter), optimizer, x, y, cfg, generator)


@torch.no_grad()
def evaluate_adapter(
    adapter: nn.Module | None, feats: DomainFeatures, splits: dict[str, np.ndarray], device: torch.device
) -> dict[str, tuple[float, float]]:
    """(top-1 accuracy, cross-entropy) over the class prompts on each split of a client's images, from one
    pass over all its features (val and test are part of all: each is scored once); adapter=None is zero-shot CLIP."""
    if adapter is not None:
        adapter.eval()
    logits = class_logits(feats.image.to(device), feats.text.to(device), feats.logit_scale.to(device), adapter)
    labels = feats.labels.to(device)
    scores = {}
    for name, indices in splits.items():
        rows = torch.as_tensor(indices, dtype=torch.long, device=device)
        scores[name] = (
            (logits[rows].argmax(1) == labels[rows]).float().mean().item(),
            F.cross_entropy(logits[rows], labels[rows]).item(),
        )
    return scores
