"""Personalized prompts: PromptFL's shared context, averaged, plus a part of each site's own that never travels.

Each round a client first tunes its personal part against the context it received (held fixed): a low-rank offset
of the context vectors (FedPGP's p_i = p_G + U_i V_i, Cui et al. 2024) and a residual on each class's text feature.
Then it tunes the received context exactly as PromptFL does, and sends only that: the global context, and so the
held-out accuracy, are PromptFL's. The personal part and its optimiser's moments live in the client's state, saved at
the site after every round it trains (client_app/kept_state.py); the personalization test scores the global context
with the personal part, and after the run the site's own folder holds both for fedclip-predict (`site_weights`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from flwr.app import RecordDict

from common import wire
from common.local_data import LocalData
from common.methods.base import Kept
from common.methods.promptfl import CONTEXT, OPTIMIZER, PromptFL, PromptText
from common.model import class_logits
from common.train import load_optimizer_state, optimizer_state, train_epochs
from common.transport import decode

log = logging.getLogger(__name__)

PERSONAL = "personal"  # the client's state: its personal part, "u" [n_ctx, rank], "v" [rank, width], "classes" [C, d]
PERSONAL_OPTIMIZER = "personal-optimizer"
OWN_OPTIMIZER = "own-optimizer"  # the AdamW moments of the site's own context (blend_images)
SITE_PREFIX = "personal/"  # the personal part's tensors in a site's weights file, beside the context


def site_file_weights(ctx: torch.Tensor, personal: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A site's context and personal part as its weights file holds them."""
    return {CONTEXT: ctx, **{SITE_PREFIX + k: v for k, v in personal.items()}}


def personal_of(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The personal part in a site's weights (empty in the server's, the global context only)."""
    return {k.removeprefix(SITE_PREFIX): v for k, v in weights.items() if k.startswith(SITE_PREFIX)}


class PersonalPrompt(PromptFL):
    """PromptFL's context, shared, and per site a context offset of rank `rank` (0: none) and, with `class_residual`,
    a residual on each class's text feature, tuned at `personal_lr`; with `blend_images` (None: none), a context of
    the site's own blended in."""

    def __init__(
        self,
        name: str = "personal_prompt",
        init: str = "phrase",
        n_ctx: int = 16,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        rank: int = 2,
        class_residual: bool = False,
        personal_lr: float = 5e-2,
        personalize_epochs: int = 0,
        blend_images: float | None = None,
    ) -> None:
        super().__init__(name, init, n_ctx, lr, weight_decay, personalize_epochs)
        if rank < 0:
            raise ValueError(f"method.rank must be >= 0, got {rank}")
        if blend_images is not None and not blend_images >= 0:
            raise ValueError(f"method.blend_images must be null or >= 0, got {blend_images}")
        self.rank, self.class_residual, self.personal_lr = int(rank), bool(class_residual), float(personal_lr)
        self.blend_images = None if blend_images is None else float(blend_images)

    def initial_personal(self, ctx: torch.Tensor, classes: int, dim: int, generator: torch.Generator) -> dict:
        """A personal part that changes nothing (u = 0, residual 0): untrained, the site's prompt is the global one."""
        personal = {}
        if self.rank:
            personal["u"] = torch.zeros(ctx.shape[0], self.rank)
            personal["v"] = torch.randn(self.rank, ctx.shape[1], generator=generator) * 0.02
        if self.class_residual:
            personal["classes"] = torch.zeros(classes, dim)
        if self.blend_images is not None:
            personal["own"], personal["blend"] = ctx.clone(), torch.zeros(1)
        return personal

    def personal_text(self, text: PromptText, ctx: torch.Tensor, personal: dict) -> torch.Tensor:
        """Class text features [C, d] of the global context with a personal part (differentiable in it)."""
        if "u" in personal:
            ctx = ctx + personal["u"] @ personal["v"]
        features = text(ctx)
        if "classes" in personal:
            features = features + personal["classes"]
        if "own" not in personal:
            return features
        blend = personal["blend"].to(features.dtype).clamp(0, 1)  # a damaged site file cannot extrapolate
        return (1 - blend) * F.normalize(features, dim=-1) + blend * F.normalize(text(personal["own"]), dim=-1)

    def kept_personal(self, local: LocalData, kept: Kept, ctx: torch.Tensor) -> dict | None:
        """The personal part the client keeps; None if it has none yet. One of another shape (a changed CLIP or class
        list, a damaged file) is dropped with a warning: the site starts again from the global context."""
        if PERSONAL not in kept:
            return None
        personal = kept[PERSONAL]
        fresh = self.initial_personal(ctx, len(local.images.classes), local.feats.text.shape[1], torch.Generator())
        if {k: tuple(v.shape) for k, v in personal.items()} != {k: tuple(v.shape) for k, v in fresh.items()}:
            log.warning(
                "client %s: its personal part does not fit this run's; it starts from the global one", local.client
            )
            kept.pop(PERSONAL, None)
            kept.pop(PERSONAL_OPTIMIZER, None)
            kept.pop(OWN_OPTIMIZER, None)
            return None
        return personal

    def site_context(self, received: dict[str, torch.Tensor], kept: Kept) -> torch.Tensor:
        """The context the personal part is tuned against and added to: here the received global one."""
        return received[CONTEXT]

    def train(
        self, local: LocalData, content: RecordDict, kept: Kept, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict]:
        received = decode(content[wire.ARRAYS])
        text, ctx = self._text(local), received[CONTEXT]
        rows = torch.as_tensor(local.split.train)
        personal = self.kept_personal(local, kept, ctx)
        if personal is None:
            personal = self.initial_personal(
                ctx, len(local.images.classes), local.feats.text.shape[1], local.generator(0, "personal-init")
            )
        device = text.ids.device
        own = {k: personal[k] for k in ("own", "blend") if k in personal}
        if own:  # the site's own context, tuned alone as local_prompt tunes it (its moments kept apart)
            moments = {OPTIMIZER: kept[OWN_OPTIMIZER]} if OWN_OPTIMIZER in kept else {}
            own["own"], _ = self._tune(
                text, own["own"], local.feats, rows, local.cfg.training, local.generator(server_round, "train"), moments
            )
            kept[OWN_OPTIMIZER] = moments[OPTIMIZER]
            own["blend"] = torch.tensor([len(rows) / (len(rows) + self.blend_images)]) if len(rows) else torch.zeros(1)
        params = {k: v.to(device).requires_grad_(True) for k, v in sorted(personal.items()) if k not in own}
        if params:
            optimizer = torch.optim.AdamW(
                params.values(), lr=self.personal_lr, betas=tuple(local.cfg.training.betas), eps=local.cfg.training.eps
            )
            if PERSONAL_OPTIMIZER in kept:
                load_optimizer_state(optimizer, kept[PERSONAL_OPTIMIZER])
            fixed, feats = self.site_context(received, kept).to(device), local.feats
            scale = feats.logit_scale.to(device)
            train_epochs(
                lambda batch: class_logits(batch, self.personal_text(text, fixed, params), scale, None),
                optimizer,
                feats.image[rows].to(device),
                feats.labels[rows].to(device),
                local.cfg.training,
                local.generator(server_round, "personal"),
            )
            kept[PERSONAL_OPTIMIZER] = optimizer_state(optimizer)
        kept[PERSONAL] = {**{k: v.detach().cpu() for k, v in params.items()}, **own}
        return super().train(local, content, kept, server_round)  # the shared context, as PromptFL tunes it

    def own_weights(
        self, local: LocalData, received: dict[str, torch.Tensor], kept: Kept
    ) -> dict[str, torch.Tensor] | None:
        """The site's context and its personal part, in a site weights file's layout; None before it has one."""
        personal = self.kept_personal(local, kept, received[CONTEXT])
        if personal is None:
            return None
        return site_file_weights(self.site_context(received, kept), personal)

    def site_features(self, text: PromptText, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.personal_text(text, weights[CONTEXT], personal_of(weights))

    def site_weights(self, content: RecordDict, kept: Kept) -> dict[str, torch.Tensor] | None:
        """The weights the last evaluation fine-tuned (`personalize_epochs`), or the context with the personal part."""
        fine_tuned = super().site_weights(content, kept)
        if fine_tuned is not None or PERSONAL not in kept:
            return fine_tuned
        return site_file_weights(self.site_context(decode(content[wire.ARRAYS]), kept), kept[PERSONAL])

    def class_text(
        self, weights: dict[str, torch.Tensor], model, processor, classes: list[str], prompt: str
    ) -> torch.Tensor:
        """The global context's class features (the server's run folder), or with a site's personal part (its own)."""
        personal = personal_of(weights)
        if not personal:
            return super().class_text(weights, model, processor, classes, prompt)
        ctx, dim = weights[CONTEXT], int(model.config.projection_dim)
        if "classes" in personal and tuple(personal["classes"].shape) != (len(classes), dim):
            raise ValueError(f"the class residual is {tuple(personal['classes'].shape)}, not ({len(classes)}, {dim})")
        device = next(model.parameters()).device
        text = PromptText(model, processor.tokenizer, classes, prompt, len(ctx))
        with torch.no_grad():
            return self.site_features(text, {k: v.to(device) for k, v in weights.items()}).cpu()

    def describe(self, weights: dict[str, torch.Tensor]) -> str:
        personal = sum(v.numel() for v in personal_of(weights).values())
        shared = super().describe({CONTEXT: weights[CONTEXT]})
        return shared + (f" and a site's personal part ({personal:,} parameters)" if personal else "")
