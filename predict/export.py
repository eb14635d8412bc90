"""What a run learned, exported for others: a Hugging Face-style folder, and the hub.

An export holds config.json (the CLIP, the classes, the prompt, the method's options and the run's results), the
method's weights as its run saved them (<weights_name>.safetensors, the method's name for them), the class text
features the classifier scores with (class_text_features.safetensors, computed once: a method that learns only the
text side is then zero-shot CLIP's formula, with no text encoder and no custom code) and a model card.
`FedClipClassifier.export` writes it (`write_export`), `FedClipClassifier.from_pretrained` reads it back, from a
folder or a hub repository that `push_to_hub` uploaded it to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from common.files import save_tensors

EXPORT_FORMAT = "fedclip-export"  # config.json's "format": what from_pretrained accepts
CONFIG_FILE, CARD_FILE, TEXT_FILE = "config.json", "README.md", "class_text_features.safetensors"
TEXT_FEATURES = "text_features"  # TEXT_FILE's tensor: [classes, projection dim], in the order of config.json's classes
PIPELINE_TAG = "zero-shot-image-classification"  # CLIP's task on the hub: images against text prompts of the classes
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
DEMO_DATASET = "fedclip-demo"  # the embedded demo's name in a card (it is on no hub)


def hub_id(value: object) -> str | None:
    """`value` if it names a hub repository (owner/name, and no file or folder here of that name), else None:
    what a model card may name as a base model or dataset; a local path never."""
    if not value:
        return None
    text = str(value)
    return text if HUB_REPO_ID.fullmatch(text) and not Path(text).expanduser().exists() else None


def write_export(folder: str | Path, files: dict[str, dict[str, torch.Tensor]], info: dict) -> Path:
    """Write each safetensors file of `files` (name -> tensors, stored float32), `info` as config.json and a model card
    README.md to `folder`."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_tensors(
            {k: v.detach().float().cpu() for k, v in tensors.items()}, folder / name, {"format": EXPORT_FORMAT}
        )
    (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2))
    (folder / CARD_FILE).write_text(model_card(info))
    return folder


def weights_file(weights_name: str) -> str:
    """The file of an export that holds the method's weights."""
    return f"{weights_name}.safetensors"


def exported_clip(info: dict) -> str:
    """The CLIP an export loads: config.json's `clip` (the run's folder or hub id) where that is here or
    on the hub,
    else its base model's hub id (an export made from a local copy of a hub CLIP, used on another machine)."""
    clip = str(info["clip"])
    if Path(clip).expanduser().exists() or hub_id(clip) or not hub_id(info.get("base_model")):
        return clip
    return str(info["base_model"])


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to a hub model repository (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="FedCLIP export")
    except Exception as err:  # noqa: BLE001 - offline mode, no network, no token: the export on disk stays usable
        raise RuntimeError(
            f"could not push {folder} to the hub repository {repo_id!r} ({type(err).__name__}: {err}). "
            "It needs network access (HF_HUB_OFFLINE unset) and a write token (`hf auth login` or HF_TOKEN); "
            f"the exported folder is complete, upload it later with `hf upload {repo_id} {folder}`"
        ) from err
    return f"https://huggingface.co/{repo_id}"


def _title(info: dict) -> str:
    return f"{info['run']['method']} {info['weights']}"


def card_metadata(info: dict):
    """The card's YAML header as the hub reads it (huggingface_hub's ModelCardData): the base CLIP by its hub id
    (none for a CLIP with no hub id), the pipeline tag, and the run's accuracies in `model-index`: per domain, with
    these weights and zero-shot CLIP, on the held-out domain's images and the training domains' test splits."""
    from huggingface_hub import EvalResult, ModelCardData

    run = info["run"]
    dataset = run.get("dataset")
    zero, pers, gen = run.get("zero_shot") or {}, run.get("personalization") or {}, run.get("generalization") or {}
    results = []
    for domain in zero:
        held = domain == run["held_out"]
        where = dict(
            task_type=PIPELINE_TAG,
            task_name="image classification with class prompts",
            dataset_type=dataset or "imagefolder",
            dataset_name=f"{dataset or 'image folder'}: {domain}{' (held out)' if held else ''}",
            dataset_config=domain,
            dataset_split="all" if held else "test",
        )
        for name, value in (
            ("accuracy (%)", gen.get(domain) if held else pers.get(domain)),
            ("zero-shot CLIP accuracy (%)", zero.get(domain)),
        ):
            if value is not None:
                results.append(
                    EvalResult(**where, metric_type="accuracy", metric_name=name, metric_value=round(100 * value, 2))
                )
    return ModelCardData(
        model_name=f"{_title(info)} ({run['method']}, {run['held_out']} held out)",
        base_model=hub_id(info.get("base_model")),
        pipeline_tag=PIPELINE_TAG,
        library_name="fedclip",
        tags=["fedclip", "clip", "federated-learning", "flower", "image-classification"],
        datasets=[dataset] if hub_id(dataset) else None,
        eval_results=results or None,
    )


def model_card(info: dict) -> str:
    """The README.md of an export: what it is, how it was trained, its results, how to load it, its limits.
    It names the base CLIP by its hub id, or says it has none: never by a local path."""
    run = info["run"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    zero, pers, gen = run.get("zero_shot") or {}, run.get("personalization") or {}, run.get("generalization") or {}
    rows = [
        f"| {d}{' (held out)' if d == run['held_out'] else ''} | {pct(zero.get(d))} "
        f"| {pct(gen.get(d) if d == run['held_out'] else pers.get(d))} |"
        for d in zero
    ]
    classes = ", ".join(info["classes"][:20]) + (
        f", ... ({len(info['classes'])} in all)" if len(info["classes"]) > 20 else ""
    )
    base = hub_id(info.get("base_model"))
    clip = (
        f"[`{base}`](https://huggingface.co/{base})"
        if base
        else "a CLIP with no Hugging Face hub id (a local one, e.g. the app's demo CLIP: its files are identified by "
        "the fingerprint)"
    )
    load = (
        f"The CLIP is config.json's `clip` where that folder exists, else the hub's `{base}`"
        if base
        else "This CLIP is not on the hub: pass a copy of exactly its files"
    )
    dataset = run.get("dataset") or "a local image folder"
    domains = ", ".join(f"`{d}`" for d in zero) or "-"
    best = f" ({run['best_round']})" if run.get("best_round") is not None else ""
    which = "best round" + best if info["which"] == "best" else "final"
    per_round, total = run.get("bytes_per_client_per_round") or "-", run.get("bytes_total") or "-"
    return f"""---
{card_metadata(info).to_yaml()}
---

# {_title(info)}

{info["description"]} (`{weights_file(info["weights"])}`), with the class text features the classifier scores
with (`{TEXT_FILE}`: `{TEXT_FEATURES}`, the features zero-shot CLIP's logits take), for the frozen CLIP
{clip} (files' fingerprint `{info["clip_fingerprint"]}`), trained federated with
[Flower](https://flower.ai) by the FedCLIP app. It classifies images into {len(info["classes"])} classes
({classes}) with the prompt `{info["prompt"]}`.

## Training

Method `{run["method"]}` on {dataset} (domains {domains}), {run["rounds"]} rounds, seed {run["seed"]},
domain `{run["held_out"]}` held out (never trained on).
This export holds the {which}
{info["weights"]}. Traffic: {per_round} bytes per training client per round, {total} bytes in all.

## Results (accuracy %, {run["accuracies_are_of"]})

Training domains: their clients' test splits; the held-out domain: all its images. The same numbers are in the
`model-index` above.

| domain | zero-shot CLIP | with this {info["weights"]} |
|---|---|---|
{chr(10).join(rows) if rows else "| - | - | - |"}

## Use

```python
from predict import FedClipClassifier   # the FedCLIP app (pip install -e <the app>)
clf = FedClipClassifier.from_pretrained("<this folder or hub repository>")
print(clf.predict(["image.jpg"]).labels)
```

or `fedclip-predict --model <this folder or hub repository> IMAGES_OR_FOLDER`. {load} (`clip=` / `--clip`
point elsewhere); a CLIP whose files differ from the one it was trained with is refused.

## Limitations

It only knows the {len(info["classes"])} classes above and the CLIP it was trained on; its accuracy was
measured on the run's own domains and may not carry over to other images. The held-out accuracy is the
best estimate of how it does on a new domain.
"""
