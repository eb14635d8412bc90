"""Site-conditioned prompts: PromptFL's shared context, and a shared generator that turns a site's image signature
into an offset of the context, so that sites whose images look alike get alike prompts without sending their own.

A site's signature is the mean of its training images' normalized features (computed at the site, never sent). The
generator is low-rank, offset = reshape(A s, [n_ctx, g]) @ V (A starts at 0: untrained, the site's prompt is the
global one), and it is averaged like the context: what a site learns about its kind of images reaches every site
with that kind (pFedPG, Yang et al. 2023, generates client prompts from client descriptors; here the descriptor
stays at the site). The context trains exactly as PromptFL's, so the held-out accuracy is PromptFL's; a new site
predicts with the global context (the server's run folder). On top, `rank` > 0 adds PersonalPrompt's own offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from omegaconf import DictConfig

from common import wire
from common.local_data import LocalData
from common.methods.base import Kept
from common.methods.personal_prompt import PersonalPrompt
from common.methods.promptfl import CONTEXT
from common.model import class_logits
from common.train import load_optimizer_state, optimizer_state, train_epochs
from common.transport import decode

GENERATOR = ("generator.a", "generator.v")  # travel with the context: A [n_ctx * g, d], V [g, text width]
GENERATOR_OPTIMIZER = "generator-optimizer"
SIGNATURE = "signature"  # the client's state: its image signature [d], kept for its site weights


class ConditionedPrompt(PersonalPrompt):
    """PromptFL's context and a generator of rank `generator_rank` from a site's image signature to a context offset,
    both shared; the generator tuned at `generator_lr` against the received context."""

    def __init__(
        self,
        name: str = "conditioned_prompt",
        init: str = "phrase",
        n_ctx: int = 16,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        rank: int = 0,
        class_residual: bool = False,
        personal_lr: float = 5e-2,
        generator_rank: int = 2,
        generator_lr: float = 2e-1,
        personalize_epochs: int = 0,
        blend_images: float | None = None,
    ) -> None:
        super().__init__(
            name, init, n_ctx, lr, weight_decay, rank, class_residual, personal_lr, personalize_epochs, blend_images
        )
        if generator_rank < 1:
            raise ValueError(f"method.generator_rank must be >= 1, got {generator_rank}")
        self.generator_rank, self.generator_lr = int(generator_rank), float(generator_lr)

    def initial_weights(self, cfg: DictConfig, feature_dim: int) -> dict[str, torch.Tensor]:
        weights = super().initial_weights(cfg, feature_dim)
        n_ctx, width = weights[CONTEXT].shape
        a, v = GENERATOR
        weights[a] = torch.zeros(n_ctx * self.generator_rank, feature_dim)
        weights[v] = torch.randn(self.generator_rank, width, generator=torch.Generator().manual_seed(cfg.seed)) * 0.02
        return weights

    @staticmethod
    def offset(generator: dict[str, torch.Tensor], signature: torch.Tensor, n_ctx: int) -> torch.Tensor:
        """The context offset [n_ctx, width] that the generator gives a site of this signature."""
        a, v = (generator[k] for k in GENERATOR)
        return (a @ signature).reshape(n_ctx, -1) @ v

    def site_context(self, received: dict[str, torch.Tensor], kept: Kept) -> torch.Tensor:
        ctx = received[CONTEXT]
        signature = kept[SIGNATURE]["mean"]
        return ctx + self.offset(received, signature.to(ctx.device), len(ctx))

    def train(
        self, local: LocalData, content: RecordDict, kept: Kept, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict]:
        received = decode(content[wire.ARRAYS])
        rows = torch.as_tensor(local.split.train)
        feats = local.feats
        mean = F.normalize(feats.image[rows], dim=-1).mean(0) if len(rows) else torch.zeros(feats.image.shape[1])
        signature = F.normalize(mean, dim=0)  # no training image: zeros, no offset
        kept[SIGNATURE] = {"mean": signature}
        text = self._text(local)
        device = text.ids.device
        ctx, signature = received[CONTEXT].to(device), signature.to(device)
        generator = {k: received[k].to(device).requires_grad_(True) for k in GENERATOR}
        optimizer = torch.optim.AdamW(
            generator.values(), lr=self.generator_lr, betas=tuple(local.cfg.training.betas), eps=local.cfg.training.eps
        )
        if GENERATOR_OPTIMIZER in kept:
            load_optimizer_state(optimizer, kept[GENERATOR_OPTIMIZER])
        scale = feats.logit_scale.to(device)
        train_epochs(
            lambda batch: class_logits(batch, text(ctx + self.offset(generator, signature, len(ctx))), scale, None),
            optimizer,
            feats.image[rows].to(device),
            feats.labels[rows].to(device),
            local.cfg.training,
            local.generator(server_round, "generator"),
        )
        kept[GENERATOR_OPTIMIZER] = optimizer_state(optimizer)
        weights, metrics = super().train(local, content, kept, server_round)  # the personal part, then the context
        return {**weights, **{k: t.detach().cpu() for k, t in generator.items()}}, metrics

    def describe(self, weights: dict[str, torch.Tensor]) -> str:
        described = super().describe({k: t for k, t in weights.items() if k not in GENERATOR})
        if GENERATOR[0] not in weights:
            return described
        generated = sum(weights[k].numel() for k in GENERATOR)
        return described + f", with a prompt generator from a site's images ({generated:,} parameters)"
