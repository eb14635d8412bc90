"""PromptFL (Guo et al. 2022): the clients learn CoOp's context vectors in front of every class name, through CLIP's
frozen text encoder; the server averages the vectors, the only thing that travels (n_ctx x text width numbers).

The class prompts become [SOS] ctx_1 .. ctx_n <class name> <the prompt's words after the name> [EOS], run through
the Hugging Face text tower's own modules (embeddings with `inputs_embeds`, encoder, final layer norm, projection).
The image side is untouched: cached frozen features, as for FedCLIP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import RecordDict
from omegaconf import DictConfig, OmegaConf
from transformers.masking_utils import create_causal_mask

from common import wire
from common.features import DomainFeatures
from common.local_data import LocalData
from common.methods.base import Kept, Method, keep_fine_tuned, scores
from common.model import class_logits, load_clip, model_name_or_path
from common.train import evaluate_adapter, load_optimizer_state, optimizer_state, train_epochs
from common.transport import decode

CONTEXT = "ctx"  # the one tensor that trains and travels: [n_ctx, text width]
OPTIMIZER = "optimizer"  # what the client keeps between rounds: its AdamW state


class PromptText:
    """Class text features from context vectors, through a frozen CLIP's text tower.

    The words of `template` before "{}" are what init="phrase" starts the context from; the words after it stay fixed
    tokens. With the context set to the token embeddings of those words, the features are exactly CLIP's zero-shot
    ones for the template.
    """

    def __init__(self, model, tokenizer, class_names: list[str], template: str, n_ctx: int) -> None:
        prefix, _, suffix = template.partition("{}")
        tokens = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []  # noqa: E731
        self.model, self.n_ctx = model, n_ctx
        self.prefix_ids = tokens(prefix)
        names = [tokens(name.replace("_", " ")) + tokens(suffix) for name in class_names]
        length = 1 + n_ctx + max(len(n) for n in names) + 1
        limit = model.config.text_config.max_position_embeddings
        if length > limit:
            raise ValueError(
                f"method=promptfl: {n_ctx} context vectors and the longest class prompt make {length} tokens, "
                f"this CLIP's text encoder takes {limit}; lower method.n_ctx or shorten model.prompt"
            )
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        ids = [[bos] + [pad] * n_ctx + n + [eos] + [pad] * (length - len(n) - n_ctx - 2) for n in names]
        device = next(model.parameters()).device
        self.ids = torch.tensor(ids, device=device)
        self.eos_positions = torch.tensor([1 + n_ctx + len(n) for n in names], device=device)

    def initial_context(self, init: str) -> torch.Tensor:
        """The phrase's token embeddings (init="phrase": n_ctx must be its length), or N(0, 0.02^2) vectors (CoOp's
        random init)."""
        embedding = self.model.text_model.embeddings.token_embedding
        if init == "phrase":
            return embedding(torch.tensor(self.prefix_ids, device=embedding.weight.device)).detach().cpu().clone()
        if init == "random":
            return torch.randn(self.n_ctx, embedding.weight.shape[1]) * 0.02
        raise ValueError(f"method.init must be 'phrase' or 'random', got {init!r}")

    def __call__(self, ctx: torch.Tensor) -> torch.Tensor:
        """Projected text features [classes, d] with these context vectors (differentiable in ctx)."""
        text = self.model.text_model
        tokens = text.embeddings.token_embedding(self.ids)
        ctx = ctx.to(tokens.dtype).unsqueeze(0).expand(len(self.ids), -1, -1)
        hidden = text.embeddings(inputs_embeds=torch.cat([tokens[:, :1], ctx, tokens[:, 1 + self.n_ctx :]], dim=1))
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        states = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        pooled = text.final_layer_norm(states)[torch.arange(len(self.ids), device=states.device), self.eos_positions]
        return self.model.text_projection(pooled).float()


class PromptFL(Method):
    """CoOp-style prompt learning, federated: each client tunes the shared context on its cached image features,
    cross-entropy over the class prompts (or the reference's contrastive loss, training.loss), AdamW at `lr` with its
    state kept between rounds; `personalize_epochs` > 0 tunes the received context locally before the
    personalization test."""

    weights_name = "prompt"
    averages_updates = True

    def __init__(
        self,
        name: str = "promptfl",
        init: str = "phrase",
        n_ctx: int = 16,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        personalize_epochs: int = 0,
    ) -> None:
        super().__init__(name)
        if init not in ("phrase", "random"):
            raise ValueError(f"method.init must be 'phrase' or 'random', got {init!r}")
        self.init, self.n_ctx, self.lr, self.weight_decay = init, int(n_ctx), float(lr), float(weight_decay)
        self.personalize_epochs = int(personalize_epochs)

    def prompt_text(self, model, tokenizer, class_names: list[str], template: str) -> PromptText:
        """The text path for these classes; with init="phrase" the context is as long as the prompt's words before
        the class."""
        n_ctx = (
            len(tokenizer(template.partition("{}")[0], add_special_tokens=False)["input_ids"])
            if self.init == "phrase"
            else self.n_ctx
        )
        if n_ctx == 0:
            raise ValueError(
                f"method.init=phrase starts the context from the words of model.prompt before '{{}}', "
                f"and {template!r} has none; "
                "use a prompt such as 'a photo of a {}' or method.init=random"
            )
        return PromptText(model, tokenizer, class_names, template, n_ctx)

    def initial_weights(self, cfg: DictConfig, feature_dim: int) -> dict[str, torch.Tensor]:
        model, processor = load_clip(model_name_or_path(cfg), torch.device("cpu"))
        torch.manual_seed(cfg.seed)
        classes = ["class"]  # the context does not depend on the classes; the layout only checks the length
        return {
            CONTEXT: self.prompt_text(model, processor.tokenizer, classes, cfg.model.prompt).initial_context(self.init)
        }

    def _text(self, local: LocalData) -> PromptText:
        model, processor = local.clip_model()
        return self.prompt_text(model, processor.tokenizer, local.images.classes, local.cfg.model.prompt)

    def _tune(
        self,
        text: PromptText,
        ctx: torch.Tensor,
        feats: DomainFeatures,
        rows: torch.Tensor,
        training: DictConfig,
        generator: torch.Generator,
        kept: Kept | None,
        features_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, float]:
        """Local epochs of prompt tuning on cached image features; returns the tuned context and the mean loss.
        `features_of(ctx)`: the class text features the context gives (default `text(ctx)`)."""
        device = text.ids.device
        features_of = features_of or text
        ctx = ctx.to(device).requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [ctx], lr=self.lr, betas=tuple(training.betas), eps=training.eps, weight_decay=self.weight_decay
        )
        if kept is not None and OPTIMIZER in kept:
            load_optimizer_state(optimizer, kept[OPTIMIZER])
        x, y, scale = feats.image[rows].to(device), feats.labels[rows].to(device), feats.logit_scale.to(device)
        loss = train_epochs(
            lambda batch: class_logits(batch, features_of(ctx), scale, None), optimizer, x, y, training, generator
        )
        if kept is not None:
            kept[OPTIMIZER] = optimizer_state(optimizer)
        return ctx.detach().cpu(), loss

    def train(
        self, local: LocalData, content: RecordDict, kept: Kept, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict]:
        rows = torch.as_tensor(local.split.train)
        ctx, loss = self._tune(
            self._text(local),
            decode(content[wire.ARRAYS])[CONTEXT],
            local.feats,
            rows,
            local.cfg.training,
            local.generator(server_round, "train"),
            kept,
        )
        return {CONTEXT: ctx}, {wire.TRAIN_LOSS: loss, wire.NUM_EXAMPLES: len(rows), wire.IMAGES_ENCODED: 0}

    def evaluate(self, local: LocalData, content: RecordDict, kept: Kept, server_round: int, zero_shot: bool) -> dict:
        """The received context's scores; at a training site also its own prompt's test accuracy
        (`personalized-test-acc`): the one it keeps (`own_weights`), or with `personalize_epochs` that one (or the
        received context) tuned locally, which after the last round is the site's to predict with."""
        if zero_shot:
            return scores(local, local.feats, [None])
        text = self._text(local)
        # one context, or (the held-out node of a local-only run) every client's: their accuracies are averaged
        received = [decode(record) for record in content.array_records.values()]
        each = [scores(local, self.received_features(local, text, weights), [None]) for weights in received]
        metrics = {
            key: sum(m[key] for m in each) / len(each) if key.endswith(("-acc", "-loss")) else value
            for key, value in each[0].items()
        }
        if local.held_out:
            return metrics
        own = self.own_weights(local, received[0], kept)
        device = text.ids.device
        if self.personalize_epochs > 0:
            own = dict(own or {CONTEXT: received[0][CONTEXT]})
            fixed = {name: t.to(device) for name, t in own.items() if name != CONTEXT}
            own[CONTEXT], _ = self._tune(
                text,
                own[CONTEXT],
                local.feats,
                torch.as_tensor(local.split.train),
                OmegaConf.merge(local.cfg.training, {"local_epochs": self.personalize_epochs}),
                local.generator(server_round, "personalize"),
                None,
                lambda ctx: self.site_features(text, {**fixed, CONTEXT: ctx}),
            )
            keep_fine_tuned(local, kept, server_round, own)
        if own is not None:
            with torch.no_grad():
                features = self.site_features(text, {name: t.to(device) for name, t in own.items()}).cpu()
            feats = DomainFeatures(local.feats.image, local.feats.labels, features, local.feats.logit_scale, [])
            metrics["personalized-test-acc"] = evaluate_adapter(None, feats, {"test": local.split.test}, local.device)[
                "test"
            ][0]
        return metrics

    def own_weights(
        self, local: LocalData, received: dict[str, torch.Tensor], kept: Kept
    ) -> dict[str, torch.Tensor] | None:
        """The weights a training site predicts with, from the received ones and what it keeps; None: the received
        context, nothing of its own."""
        return None

    def site_features(self, text: PromptText, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The class text features [C, d] of a site's weights (`own_weights`' layout)."""
        return text(weights[CONTEXT])

    def received_features(self, local: LocalData, text: PromptText, weights: dict[str, torch.Tensor]) -> DomainFeatures:
        """The client's features with the class text features of received weights (its cached image features)."""
        with torch.no_grad():
            features = text(weights[CONTEXT].to(text.ids.device)).cpu()
        return DomainFeatures(local.feats.image, local.feats.labels, features, local.feats.logit_scale, [])

    def class_text(
        self, weights: dict[str, torch.Tensor], model, processor, classes: list[str], prompt: str
    ) -> torch.Tensor:
        ctx = weights[CONTEXT]
        width = int(model.config.text_config.hidden_size)
        if ctx.shape[1] != width:
            raise ValueError(f"the context was trained for text width {ctx.shape[1]}, this CLIP's is {width}")
        with torch.no_grad():
            return PromptText(model, processor.tokenizer, classes, prompt, len(ctx))(
                ctx.to(next(model.parameters()).device)
            ).cpu()

    def image_head(self, weights: dict[str, torch.Tensor], feature_dim: int) -> None:
        return None

    def describe(self, weights: dict[str, torch.Tensor]) -> str:
        n_ctx, width = weights[CONTEXT].shape
        return f"A PromptFL prompt context ({n_ctx} vectors, {n_ctx * width:,} parameters)"
