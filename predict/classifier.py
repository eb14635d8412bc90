"""Use what a run learned: a classifier from a run folder or an export.

    from predict import FedClipClassifier
    clf = FedClipClassifier.from_run("outputs/2026-11-28_12-00-00")   # the best round's weights; which="final"
    clf.predict(["cat.jpg", "dog.png"]).labels                         # ['cat', 'dog']

A classifier is the run's frozen CLIP, one prompt per class and what the run's method trained, which the method's
own hooks turn into class text features and a module on the image features (common/methods/base.py): this package
never asks which method it has. It encodes images with the code of training's one-off feature extraction
(`common.features.encode_images`) and scores them with the logits of training and evaluation
(`common.model.class_logits`), so a prediction and the run's own evaluation agree. `export` writes a Hugging
Face-style folder (config.json, the method's weights, the class text features, a model card; predict/export.py) that
`from_pretrained` loads, from a folder or the hub.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import load_file

from common.config import CONF_DIR, config_from_file, select_device
from common.features import encode_images, encode_prompts
from common.fingerprint import model_files_fingerprint
from common.methods.base import Method, method_from_options
from common.model import class_logits, class_prompts, load_clip, model_name_or_path
from common.sources import read_image
from predict.export import (
    CONFIG_FILE,
    DEMO_DATASET,
    EXPORT_FORMAT,
    TEXT_FEATURES,
    TEXT_FILE,
    exported_clip,
    hub_id,
    weights_file,
    write_export,
)

log = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | torch.Tensor


class InputImages:
    """Images given to `predict` (paths, PIL images or [C, H, W] tensors) as an image source for common.features."""

    domain = "input"

    def __init__(self, items: Sequence[ImageInput], labels: list[int] | None = None) -> None:
        self.items = list(items)
        self.labels = list(labels) if labels is not None else [-1] * len(self.items)
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> Image.Image | None:
        item = self.items[i]
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        if isinstance(
            item, torch.Tensor
        ):  # uint8 in [0, 255] or float in [0, 1], as torchvision's to_pil_image takes them
            from torchvision.transforms.functional import to_pil_image

            return to_pil_image(item.cpu()).convert("RGB")
        return read_image(Path(item))

    def name(self, i: int) -> str:
        item = self.items[i]
        return str(item) if isinstance(item, (str, Path)) else f"image[{i}]"


@dataclass
class Encoded:
    """Frozen CLIP features of the images that could be read, in input order, and the names of those that could not."""

    features: torch.Tensor  # [N, d], float32, not normalized
    labels: torch.Tensor  # [N]; -1 where unknown
    names: list[str]
    skipped: list[str] = field(default_factory=list)


@dataclass
class Predictions:
    """Class probabilities of the images that could be read; unreadable ones are named in `skipped`."""

    names: list[str]
    probabilities: torch.Tensor  # [N, C]
    classes: list[str]
    skipped: list[str]

    @property
    def labels(self) -> list[str]:
        """The most probable class of each image."""
        return [self.classes[i] for i in self.probabilities.argmax(1).tolist()]

    def top_k(self, k: int) -> list[list[tuple[str, float]]]:
        """The k most probable (class, probability) pairs of each image."""
        probs, idx = self.probabilities.topk(min(k, len(self.classes)), dim=1)
        return [
            [(self.classes[c], p) for c, p in zip(row_idx, row_p)]
            for row_idx, row_p in zip(idx.tolist(), probs.tolist())
        ]


class FedClipClassifier:
    """A frozen CLIP and one prompt per class, with what a run's method trained for them (none: zero-shot CLIP).

    The method's hooks (common/methods/base.py) turn its saved weights into the two parts a classifier scores
    with: the class text features (`text`) and a module on the image features (`head`, None: none)."""

    def __init__(
        self,
        model,
        processor,
        classes: list[str],
        prompt: str,
        device: torch.device,
        batch_size: int,
        info: dict,
        *,
        method: Method | None = None,
        weights: dict[str, torch.Tensor] | None = None,
        head: torch.nn.Module | None = None,
        text: torch.Tensor | None = None,
        prompts_text: torch.Tensor | None = None,
    ) -> None:
        self.model, self.processor, self.device, self.batch_size = model, processor, device, batch_size
        self.classes, self.prompt, self.info = list(classes), prompt, info
        self.method, self.weights, self.head = method, weights, head
        # the method's own image path (prompts in the image encoder), or the frozen encoder's
        self.image_features = method.image_features(weights, model) if method is not None and weights else None
        # CLIP's encoded class prompts, when known: zero-shot CLIP's text features, and `text` unless the method
        # learned its own
        self.prompts_text = prompts_text
        if text is None:
            text = self.prompts_text = encode_prompts(model, processor, class_prompts(self.classes, prompt), device)
        self.text = text
        self.logit_scale = model.logit_scale.detach().float().cpu()

    # ---- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_run(
        cls,
        run: str | Path,
        which: str | None = "best",
        clip: str | None = None,
        device: str = "auto",
        dtype: str | torch.dtype = "float32",
        batch_size: int | None = None,
    ) -> FedClipClassifier:
        """The classifier of a run folder: its CLIP (or `clip`, which must be the same files), classes, prompt and
        the weights its method trained.

        which: "best" (the round with the best mean validation accuracy), "final", or None for zero-shot CLIP.
        """
        run = Path(run).expanduser()
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{run} is not a run folder (no config.yaml): pass the folder a run logged as 'run folder: ...'"
            )
        cfg = config_from_file(run / "config.yaml")
        run_info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
        classes = run_info.get("classes") or (list(cfg.dataset.classes) if cfg.dataset.classes else None)
        if not classes:
            raise ValueError(
                f"{run} does not record its classes in label order (no run.json: a run from before it was written, "
                "with dataset.classes=null); run it again to use what it trained"
            )
        options = _method_options(cfg)
        method = weights = None
        if which is not None:
            method = method_from_options(options)
            if method.weights_name is None:
                raise FileNotFoundError(
                    f"method={method.name} keeps no global weights to predict with. which=None gives zero-shot CLIP"
                )
            path = run / f"{method.weights_name}_{which}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} does not exist: which={which!r} is 'best' or 'final'. which=None gives zero-shot CLIP"
                )
            weights = load_file(path)
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        run_clip = model_name_or_path(cfg)  # the hub id or folder; the built demo CLIP for model=demo
        info = {
            "format": EXPORT_FORMAT,
            "clip": run_clip,
            "base_model": hub_id(cfg.model.get("hub_id"))
            or hub_id(cfg.model.name_or_path),  # the model card's; None: no hub id
            "clip_fingerprint": run_info.get("model_fingerprint"),
            "prompt": str(cfg.model.prompt),
            "classes": classes,
            "method": options,
            "weights": method.weights_name if method else None,
            "which": which,
            "encode_batch_size": int(cfg.model.encode_batch_size),
            "run": _run_results(cfg, summary, which, method.weights_name if method else None),
        }
        return cls._build(clip or run_clip, info, method, weights, device, dtype, batch_size)

    @classmethod
    def from_pretrained(
        cls,
        folder_or_hub_id: str | Path,
        clip: str | None = None,
        device: str = "auto",
        dtype: str | torch.dtype = "float32",
        batch_size: int | None = None,
    ) -> FedClipClassifier:
        """An export (see `export`), from a folder or a Hugging Face hub repository; `clip` overrides where its CLIP is.

        Its class text features are used as they are (the text encoder does not run)."""
        folder = Path(folder_or_hub_id).expanduser()
        if not folder.is_dir():
            folder = _download(str(folder_or_hub_id))
        info = json.loads((folder / CONFIG_FILE).read_text())
        if info.get("format") != EXPORT_FORMAT:
            older = " (an export of an older version of this app: export it again from its run folder)"
            raise ValueError(
                f"{folder / CONFIG_FILE} is not a FedCLIP export's config (format {info.get('format')!r}, expected "
                f"{EXPORT_FORMAT!r}){older if info.get('format') == 'fedclip-adapter' else ''}"
            )
        method = method_from_options(info["method"])
        weights = load_file(folder / weights_file(method.weights_name))
        text = load_file(folder / TEXT_FILE)[TEXT_FEATURES]
        return cls._build(clip or exported_clip(info), info, method, weights, device, dtype, batch_size, text)

    @classmethod
    def _build(
        cls,
        clip: str,
        info: dict,
        method: Method | None,
        weights: dict[str, torch.Tensor] | None,
        device: str,
        dtype: str | torch.dtype,
        batch_size: int | None,
        text: torch.Tensor | None = None,
    ) -> FedClipClassifier:
        """Load the CLIP, refuse it unless it is the one the weights were trained with, and let the method make its
        parts from the weights (`text`: the class text features, when an export holds them)."""
        device_ = select_device(device)
        dtype_ = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        model, processor = load_clip(str(clip), device_, dtype_)
        dim = int(model.config.projection_dim)
        if text is not None and tuple(text.shape) != (len(info["classes"]), dim):
            raise ValueError(
                f"the class text features are {tuple(text.shape)}, but {len(info['classes'])} classes and the "
                f"CLIP {clip!r}'s {dim} features need ({len(info['classes'])}, {dim}): it needs the CLIP its run used "
                f"({info['clip']!r})"
            )
        head = None
        if method is not None:
            try:
                head = method.image_head(weights, dim)
                if text is None:
                    text = method.class_text(weights, model, processor, info["classes"], info["prompt"])
            except ValueError as err:
                raise ValueError(
                    f"the CLIP {clip!r} does not fit: {err}; it needs the CLIP its run used ({info['clip']!r})"
                ) from err
        expected, found = info.get("clip_fingerprint"), model_files_fingerprint(str(clip))
        if expected and found != expected:
            raise ValueError(
                f"the CLIP {clip!r} is not the one the weights were trained with: its files' fingerprint is {found}, "
                f"the run's {expected}. Pass the run's CLIP ({info['clip']!r}), or a copy of exactly its files"
            )
        if not expected:
            log.warning("this run does not record its CLIP's fingerprint: only the feature size (%d) was checked", dim)
        return cls(
            model,
            processor,
            info["classes"],
            info["prompt"],
            device_,
            batch_size or info["encode_batch_size"],
            {**info, "clip_fingerprint": found, "feature_dim": dim},
            method=method,
            weights=weights,
            head=head.to(device_) if head is not None else None,
            text=text,
        )

    def zero_shot(self) -> FedClipClassifier:
        """The same CLIP and prompts without what the method trained (shares the loaded CLIP)."""
        return FedClipClassifier(
            self.model,
            self.processor,
            self.classes,
            self.prompt,
            self.device,
            self.batch_size,
            {**self.info, "weights": None, "which": None},
            text=self.prompts_text,
            prompts_text=self.prompts_text,
        )

    # ---- prediction ------------------------------------------------------------------------------------------

    def encode(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: list[int] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Encoded:
        """Frozen CLIP features of the images, as training's feature extraction computes them; unreadable ones are
        skipped."""
        source = (
            images
            if hasattr(images, "read")
            else InputImages([images] if isinstance(images, ImageInput) else images, labels)
        )
        try:
            features, found, skipped = encode_images(
                self.model, self.processor, source, self.device, self.batch_size, progress, self.image_features
            )
        except RuntimeError as err:  # none could be read
            log.warning("%s", err)
            return Encoded(
                torch.zeros(0, self.info["feature_dim"]),
                torch.zeros(0, dtype=torch.long),
                [],
                [source.name(i) for i in range(len(source))],
            )
        lost = set(skipped)
        names = [source.name(i) for i in range(len(source)) if source.name(i) not in lost]
        return Encoded(features, found, names, skipped)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of encoded images: the same function as training and evaluation use."""
        return class_logits(
            features.to(self.device), self.text.to(self.device), self.logit_scale.to(self.device), self.head
        ).cpu()

    def predict(
        self, images: ImageInput | Sequence[ImageInput], progress: Callable[[int], None] | None = None
    ) -> Predictions:
        """Class probabilities of PIL images, image paths or [C, H, W] tensors, batched on the classifier's device."""
        return self.predictions(self.encode(images, progress=progress))

    def predictions(self, encoded: Encoded) -> Predictions:
        """Predictions from already encoded images (e.g. to compare with `zero_shot()` without encoding twice)."""
        return Predictions(encoded.names, self.logits(encoded.features).softmax(1), self.classes, encoded.skipped)

    # ---- export ----------------------------------------------------------------------------------------------

    def export(self, folder: str | Path) -> Path:
        """Write config.json, the method's weights (<weights>.safetensors), the class text features this classifier
        scores with and a model card README.md to `folder`; `from_pretrained` loads it.

        The text features are computed with the CLIP in the precision it was loaded in (float32 by default), so the
        export predicts exactly what this classifier predicts."""
        if self.method is None:
            raise ValueError("a zero-shot classifier has no trained weights to export")
        files = {weights_file(self.method.weights_name): self.weights, TEXT_FILE: {TEXT_FEATURES: self.text}}
        return write_export(folder, files, {**self.info, "description": self.method.describe(self.weights)})


def _method_options(cfg: DictConfig) -> dict:
    """The run's method options (conf/method/<name>.yaml's keys); a run from before methods named their class takes
    its `_target_` from this app's conf/method/<name>.yaml."""
    options = OmegaConf.to_container(cfg.method)
    known = {path.stem: path for path in (CONF_DIR / "method").glob("*.yaml")}
    if "_target_" not in options and options.get("name") in known:
        options["_target_"] = yaml.safe_load(known[options["name"]].read_text())["_target_"]
    return options


def _run_results(cfg, summary: dict, which: str | None, weights: str | None) -> dict:
    """What a run says about how its weights were trained and how well they did (config.json and the model card)."""
    return {
        "method": str(cfg.method.name),
        "held_out": str(cfg.dataset.held_out),
        "dataset": hub_id(cfg.dataset.get("hub_id")) or (DEMO_DATASET if cfg.dataset.get("root") == "demo" else None),
        "rounds": summary.get("rounds", int(cfg.training.rounds)),
        "seed": int(cfg.seed),
        "best_round": summary.get("best_round"),
        "zero_shot": summary.get("zero_shot"),
        "generalization": summary.get("generalization"),
        "personalization": summary.get("personalization"),
        "trained_parameters": summary.get("trained_parameters"),
        "bytes_per_client_per_round": summary.get("bytes_per_client_per_round"),
        "bytes_total": summary.get("bytes_total"),
        "accuracies_are_of": f"the best round's {weights}"
        if which == "best"
        else f"the best round (this export holds the final {weights})",
    }


def _download(repo_id: str) -> Path:
    """A hub repository's files (cached by huggingface_hub), with an error that says what to do offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # noqa: BLE001 - offline mode, no network, no such repository: all say the same to the user
        raise RuntimeError(
            f"{repo_id!r} is neither a folder here nor a hub repository that can be downloaded now "
            f"({type(err).__name__}: "
            f"{err}). Offline, copy the exported folder here and pass its path"
        ) from err
