"""Prompts in both towers: PromptFL's context in the text tower, and prompt tokens in the image tower (IVLP/MaPLe's
idea, Khattak et al. 2023: deep prompts in the first layers of both encoders, learned together).

In each prompted image layer the tokens' attention also reads that layer's prompt tokens, scaled by a gate that
starts at zero (LLaMA-Adapter's zero-init attention, Zhang et al. 2023), so that untrained prompts give CLIP's
zero-shot features exactly and training starts from them. The layers before the first prompted one are frozen and
see no prompt: their output is computed once per image at the site, kept with the client's data (`LocalData.computed`)
and in the feature cache on disk (a restarted site, another Ray actor, a later run read it back); the prompted layers
and those after run in every training step, so images pass through part of the encoder again each epoch (counted in
images-encoded). Everything shared (context, image prompts, gates) is averaged, as PromptFL's context is.
"""

from __future__ import annotations

import torch
from flwr.app import RecordDict
from omegaconf import DictConfig

from common import wire
from common.features import DomainFeatures, cached_image_tensor, image_batches
from common.local_data import LocalData
from common.methods.base import Kept
from common.methods.promptfl import CONTEXT, OPTIMIZER, PromptFL
from common.model import class_logits, load_clip, model_name_or_path
from common.train import load_optimizer_state, optimizer_state, train_epochs
from common.transport import decode

VISION_PROMPTS = "vision.prompts"  # [depth, n_vision, image width]: the prompt tokens of each prompted image layer
VISION_GATES = "vision.gates"  # [depth]: each layer's gate on its prompts' attention (tanh, starts at 0)


class PromptedImageTower:
    """CLIP's image features from the input of layer `first` on, with gated prompt tokens in `depth` layers from it."""

    def __init__(self, model, first: int, depth: int) -> None:
        self.model, self.vision = model, model.vision_model
        self.first, self.depth = first, depth
        layers = len(self.vision.encoder.layers)
        if not (0 <= first and depth >= 1 and first + depth <= layers):
            raise ValueError(
                f"method.vision_first={first} and method.vision_depth={depth} do not fit this CLIP's {layers} image "
                f"layers: prompt layers first .. first + depth - 1, within 0 .. {layers - 1}"
            )

    @torch.no_grad()
    def inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen hidden states [B, tokens, width] that enter layer `first` (what a site computes once)."""
        hidden = self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))
        for layer in self.vision.encoder.layers[: self.first]:
            hidden = layer(hidden, None)
        return hidden

    def __call__(self, hidden: torch.Tensor, prompts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Projected image features [B, d] from layer `first`'s inputs (differentiable in prompts and gates)."""
        for i, layer in enumerate(self.vision.encoder.layers[self.first :]):
            normed = layer.layer_norm1(hidden)
            attended, _ = layer.self_attn(hidden_states=normed, attention_mask=None)
            if i < self.depth:
                extra = prompt_attention(layer.self_attn, normed, layer.layer_norm1(prompts[i].to(hidden.dtype)))
                attended = attended + torch.tanh(gates[i]).to(hidden.dtype) * extra
            hidden = hidden + attended
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return self.model.visual_projection(self.vision.post_layernorm(hidden[:, 0])).float()


def prompt_attention(attention, normed: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """What the tokens read from the prompt tokens alone: attention over the prompts' keys and values (the layer's
    own projections), out-projected without its bias (the token path's output already has it)."""
    batch, tokens, width = normed.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    q = attention.q_proj(normed).view(batch, tokens, heads, head_dim).transpose(1, 2)
    k = attention.k_proj(prompts).view(-1, heads, head_dim).transpose(0, 1)
    v = attention.v_proj(prompts).view(-1, heads, head_dim).transpose(0, 1)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * attention.scale, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(batch, tokens, width) @ attention.out_proj.weight.T


class TwoTowerPrompt(PromptFL):
    """PromptFL's context and `n_vision` prompt tokens in image layers vision_first .. vision_first + vision_depth - 1,
    trained together with AdamW at `lr` (the image prompts and gates at `vision_lr`)."""

    def __init__(
        self,
        name: str = "two_tower_prompt",
        init: str = "phrase",
        n_ctx: int = 16,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        n_vision: int = 4,
        vision_first: int = 0,
        vision_depth: int = 1,
        vision_lr: float = 1e-3,
    ) -> None:
        super().__init__(name, init, n_ctx, lr, weight_decay, personalize_epochs=0)
        if n_vision < 1:
            raise ValueError(f"method.n_vision must be >= 1, got {n_vision}")
        self.n_vision, self.vision_first, self.vision_depth = int(n_vision), int(vision_first), int(vision_depth)
        self.vision_lr = float(vision_lr)

    def initial_weights(self, cfg: DictConfig, feature_dim: int) -> dict[str, torch.Tensor]:
        weights = super().initial_weights(cfg, feature_dim)
        model, _ = load_clip(model_name_or_path(cfg), torch.device("cpu"))
        PromptedImageTower(model, self.vision_first, self.vision_depth)  # refuses layers this CLIP does not have
        width = int(model.config.vision_config.hidden_size)
        noise = torch.Generator().manual_seed(cfg.seed)
        weights[VISION_PROMPTS] = torch.randn(self.vision_depth, self.n_vision, width, generator=noise) * 0.02
        weights[VISION_GATES] = torch.zeros(self.vision_depth)
        return weights

    def _tower(self, local: LocalData) -> tuple[PromptedImageTower, torch.Tensor]:
        """The prompted tower and the frozen inputs of its first prompted layer for each of the client's images (in the
        order of its cached features), computed on first use and kept with the client's data and in the cache."""
        model, processor = local.clip_model()
        tower = PromptedImageTower(model, self.vision_first, self.vision_depth)
        key = ("two-tower-inputs", self.vision_first)

        def compute() -> torch.Tensor:
            dtype = next(model.parameters()).dtype
            batches = image_batches(
                processor, local.images, range(len(local.images)), local.cfg.training.batch_size, local.device, dtype
            )
            return torch.cat([tower.inputs(pixels).cpu() for pixels, _ in batches])

        if key not in local.computed:
            hidden = cached_image_tensor(
                f"image-layer-{self.vision_first}-inputs",
                model_name_or_path(local.cfg),
                local.images,
                local.cfg.cache_dir,
                local.cfg.model.dtype,
                compute,
            )
            if len(hidden) != len(local.feats.labels):
                raise RuntimeError(
                    f"client {local.client}: {len(hidden)} images readable now, {len(local.feats.labels)} when its "
                    "features were cached; an image changed during the run"
                )
            local.computed[key] = hidden
        return tower, local.computed[key]

    def train(
        self, local: LocalData, content: RecordDict, kept: Kept, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict]:
        text, (tower, hidden) = self._text(local), self._tower(local)
        device, training = text.ids.device, local.cfg.training
        params = {k: v.to(device).requires_grad_(True) for k, v in decode(content[wire.ARRAYS]).items()}
        optimizer = torch.optim.AdamW(
            [
                {"params": [params[CONTEXT]], "lr": self.lr},
                {"params": [params[VISION_PROMPTS], params[VISION_GATES]], "lr": self.vision_lr},
            ],
            betas=tuple(training.betas),
            eps=training.eps,
            weight_decay=self.weight_decay,
        )
        if OPTIMIZER in kept:
            load_optimizer_state(optimizer, kept[OPTIMIZER])
        rows = torch.as_tensor(local.split.train)
        scale = local.feats.logit_scale.to(device)
        loss = train_epochs(
            lambda batch: class_logits(
                tower(batch, params[VISION_PROMPTS], params[VISION_GATES]), text(params[CONTEXT]), scale, None
            ),
            optimizer,
            hidden[rows].to(device),
            local.feats.labels[rows].to(device),
            training,
            local.generator(server_round, "train"),
        )
        kept[OPTIMIZER] = optimizer_state(optimizer)
        metrics = {
            wire.TRAIN_LOSS: loss,
            wire.NUM_EXAMPLES: len(rows),
            wire.IMAGES_ENCODED: len(rows) * int(training.local_epochs),  # through the prompted layers
        }
        return {k: v.detach().cpu() for k, v in params.items()}, metrics

    def received_features(self, local: LocalData, text, weights: dict[str, torch.Tensor]) -> DomainFeatures:
        """The class text features of the received context, and every image's features through the prompted tower."""
        feats = super().received_features(local, text, weights)
        tower, hidden = self._tower(local)
        prompts, gates = (weights[k].to(local.device) for k in (VISION_PROMPTS, VISION_GATES))
        size = int(local.cfg.training.batch_size)
        with torch.no_grad():
            image = [
                tower(hidden[s : s + size].to(local.device), prompts, gates).cpu() for s in range(0, len(hidden), size)
            ]
        return DomainFeatures(torch.cat(image), feats.labels, feats.text, feats.logit_scale, [])

    def evaluate(self, local: LocalData, content: RecordDict, kept: Kept, server_round: int, zero_shot: bool) -> dict:
        metrics = super().evaluate(local, content, kept, server_round, zero_shot)
        if not zero_shot:  # every image through the prompted layers, once for each set of weights received
            metrics[wire.IMAGES_ENCODED] = len(local.feats.labels) * len(content.array_records)
        return metrics

    def image_features(self, weights: dict[str, torch.Tensor], model):
        tower = PromptedImageTower(model, self.vision_first, self.vision_depth)
        device = next(model.parameters()).device
        prompts, gates = (weights[k].to(device) for k in (VISION_PROMPTS, VISION_GATES))
        return lambda pixels: tower(tower.inputs(pixels), prompts, gates)

    def describe(self, weights: dict[str, torch.Tensor]) -> str:
        depth, n_vision, width = weights[VISION_PROMPTS].shape
        return (
            super().describe(weights)
            + f" and {n_vision} prompt tokens in each of {depth} image layers ({depth * (n_vision * width + 1):,} "
            "parameters)"
        )
