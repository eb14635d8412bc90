"""The paper's CLIP FedAvg and FedProx baselines: the clients fine-tune CLIP's image encoder itself; the server
averages it.

Every round sends the whole encoder (87.8M parameters for ViT-B/32): meant for GPUs. Images stream
from disk batch by batch, and the encoder changes, so every evaluation encodes the images again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, RecordDict
from omegaconf import DictConfig
from torch import nn

from common import wire
from common.features import DomainFeatures, encode_images, image_batches, images_encoded
from common.local_data import LocalData
from common.methods.base import Kept, Method, scores
from common.model import class_logits, load_clip, model_name_or_path
from common.sources import ImageSource
from common.train import make_optimizer

ENCODER_PREFIXES = ("vision_model.", "visual_projection.")  # the image encoder: vision tower and projection


class FedAvg(Method):
    """Full fine-tuning of the image encoder with cross-entropy over the frozen class prompts; FedProx adds
    (mu/2)*||w - w_global||^2 (conf/method/fedprox.yaml: proximal_mu > 0). AdamW at `lr`, fresh each round."""

    weights_name = "encoder"
    narrows_to_16_bits = False

    def __init__(self, name: str = "fedavg", lr: float = 1e-5, proximal_mu: float = 0.0) -> None:
        super().__init__(name)
        self.lr, self.proximal_mu = float(lr), float(proximal_mu)

    def initial_weights(self, cfg: DictConfig, feature_dim: int) -> dict[str, torch.Tensor]:
        model, _ = load_clip(model_name_or_path(cfg), torch.device("cpu"))
        return encoder_state(model)

    def train(
        self, local: LocalData, content: RecordDict, kept: Kept, server_round: int
    ) -> tuple[dict[str, torch.Tensor], dict]:
        model, processor = received_encoder(local, content[wire.ARRAYS])
        train_files = file_indices(local, local.split.train)
        loss = self.finetune(
            model,
            processor,
            local.images,
            train_files,
            local.feats.text,
            local.cfg.training,
            local.generator(server_round, "train"),
        )
        return encoder_state(model), {
            wire.TRAIN_LOSS: loss,
            wire.NUM_EXAMPLES: len(train_files),
            wire.IMAGES_ENCODED: len(train_files) * local.cfg.training.local_epochs,
        }

    def evaluate(self, local: LocalData, content: RecordDict, kept: Kept, server_round: int, zero_shot: bool) -> dict:
        """The images encoded again with the received encoder (the text tower is frozen: its prompts stay)."""
        if zero_shot:
            return scores(local, local.feats, [None])
        model, processor = received_encoder(local, content[wire.ARRAYS])
        before = images_encoded()
        image, labels, skipped = encode_images(
            model, processor, local.images, local.device, local.cfg.model.encode_batch_size
        )
        feats = DomainFeatures(image, labels, local.feats.text, local.feats.logit_scale, skipped)
        return scores(local, feats, [None], images_encoded() - before)

    def finetune(
        self,
        model: nn.Module,
        processor,
        images: ImageSource,
        indices: torch.Tensor,
        text: torch.Tensor,
        training: DictConfig,
        generator: torch.Generator,
    ) -> float:
        """Local epochs of full fine-tuning of the image encoder; returns the mean loss."""
        device = next(model.parameters()).device
        params = [p for n, p in model.named_parameters() if n.startswith(ENCODER_PREFIXES)]
        for p in params:
            p.requires_grad_(True)
        optimizer = make_optimizer(params, training, lr=self.lr)
        anchor = [p.detach().clone() for p in params]
        text, scale = text.to(device), model.logit_scale.detach()
        model.vision_model.train()
        total, count = 0.0, 0
        for _ in range(training.local_epochs):
            order = indices[torch.randperm(len(indices), generator=generator)]
            for pixels, labels in image_batches(processor, images, order.tolist(), training.batch_size, device):
                feats = model.get_image_features(pixel_values=pixels).pooler_output
                loss = F.cross_entropy(class_logits(feats.float(), text, scale, None), labels)
                if self.proximal_mu > 0:
                    loss = loss + self.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(labels)
                count += len(labels)
        model.eval()
        return total / max(count, 1)


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The image encoder's weights (vision tower and projection): what the FedAvg baselines send."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def load_encoder_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put received encoder weights into a CLIP; every encoder key must be there, and nothing else."""
    expected = set(encoder_state(model))
    if set(state) != expected:
        raise ValueError(
            f"encoder weights do not match this CLIP: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - expected)[:5]}"
        )
    model.load_state_dict(state, strict=False)


def received_encoder(local: LocalData, arrays: ArrayRecord):
    """The client's own CLIP (loaded once; it trains the encoder, so never the process's shared one) with the received
    image-encoder weights."""
    if "fedavg-clip" not in local.computed:
        local.computed["fedavg-clip"] = load_clip(model_name_or_path(local.cfg), local.device)
    model, processor = local.computed["fedavg-clip"]
    load_encoder_state(model, arrays.to_torch_state_dict())
    return model, processor


def file_indices(local: LocalData, rows) -> torch.Tensor:
    """Indices into the image files of feature rows (unreadable files have no row)."""
    skipped = set(local.feats.skipped)
    readable = [i for i in range(len(local.images)) if local.images.name(i) not in skipped]
    return torch.as_tensor([readable[r] for r in rows])
