"""The model: a frozen Hugging Face CLIP and the FedCLIP attention adapter on its image features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from common.demo import demo_model_path


class AttentionAdapter(nn.Module):
    """FedCLIP's adapter: a = Softmax(Linear(Tanh(Linear(f)))) over the feature dim; output a * f.

    This is the only part that trains and the only part that is sent: 2 * (d*d + d) parameters.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        attention = torch.softmax(self.fc2(torch.tanh(self.fc1(features))), dim=-1)
        return attention * features


def class_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, adapter: nn.Module | None
) -> torch.Tensor:
    """CLIP logits of images against one prompt per class; adapter=None is zero-shot CLIP."""
    if adapter is not None:
        image_features = adapter(image_features)
    image_features = F.normalize(image_features, dim=-1)
    return logit_scale.exp() * image_features @ F.normalize(text_features, dim=-1).T


LOSSES = ("cross_entropy", "contrastive")  # training.loss


def adapter_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """The training loss, from the class logits of a batch.

    cross_entropy: over the C class prompts, exactly what inference does.
    contrastive: the reference code's symmetric CLIP loss between the batch's images and the
    batch's own prompts with targets arange(batch), so two images of one class in a batch
    count each other's (identical) prompt as a negative.
    """
    if kind == "cross_entropy":
        return F.cross_entropy(logits, labels)
    if kind == "contrastive":
        per_image = logits[:, labels]  # image i against the prompt of every image j in the batch
        targets = torch.arange(len(labels), device=logits.device)
        return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_image.T, targets)) / 2
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def class_prompts(class_names: list[str], template: str) -> list[str]:
    """One prompt per class, e.g. "a picture of a art painting" from "art_painting"."""
    return [template.format(name.replace("_", " ")) for name in class_names]


def model_unavailable(name_or_path: str, err: Exception) -> RuntimeError:
    """The error for a CLIP that is neither a local folder nor a hub id reachable now."""
    return RuntimeError(
        f"could not load the CLIP {name_or_path!r}: {err}\n"
        "It is neither a local folder with a saved CLIP nor a Hugging Face hub id that can be "
        "downloaded now (no network, or HF_HUB_OFFLINE=1?). On a machine with the hub, save it once with "
        "CLIPModel.from_pretrained(ID).save_pretrained(DIR) and "
        "CLIPProcessor.from_pretrained(ID).save_pretrained(DIR), "
        "copy DIR here and run with --run-config 'overrides=\"model.name_or_path=DIR\"'."
    )


def model_name_or_path(cfg: DictConfig) -> str:
    """The CLIP of a run: the built demo CLIP for name_or_path=demo, else the hub id or folder as given."""
    if cfg.model.name_or_path == "demo":
        return str(demo_model_path(cfg.demo))
    return str(cfg.model.name_or_path)


_SHARED: dict[tuple[str, str, str, str], tuple] = {}
SHARED_KEPT = 2  # CLIPs a process keeps: the run's, in the dtype it encodes in and the one its methods run


def shared_clip(name_or_path: str, fingerprint: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The process's frozen CLIP (model, processor), loaded once however many clients the process serves (a Ray actor
    serves many): keyed by the files' fingerprint, so changed files load again. Never change its weights: a method that
    trains CLIP's own (fedavg) loads a CLIP of its own."""
    key = (name_or_path, fingerprint, str(device), str(dtype))
    if key not in _SHARED:
        while len(_SHARED) >= SHARED_KEPT:
            _SHARED.pop(next(iter(_SHARED)))  # the oldest
        _SHARED[key] = load_clip(name_or_path, device, dtype)
    return _SHARED[key]


def load_clip(name_or_path: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """A frozen CLIPModel and its CLIPProcessor, from a hub id or a local folder.

    Raises a RuntimeError that says how to use a local copy when a hub id cannot be fetched
    (no network, HF_HUB_OFFLINE=1, or a typo).
    """
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(name_or_path, dtype=dtype)
        processor = CLIPProcessor.from_pretrained(name_or_path)
    except OSError as err:
        raise model_unavailable(name_or_path, err) from err
    try:
        model.requires_grad_(False).eval().to(device)
    except torch.OutOfMemoryError as err:  # one line a user can act on, not a CUDA allocator dump
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        raise RuntimeError(
            f"CLIP {name_or_path} ({size:.2f} GiB of weights) does not fit in what is left of {device}'s memory: "
            "run fewer clients per GPU (simulation: raise client-resources-num-gpus in `flwr run`'s "
            "--federation-config, docs/scale.md) or use another device (`device`, a SuperNode's --node-config "
            "device=...)"
        ) from err
    return model, processor
