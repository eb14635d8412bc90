"""What a run learned, exported for others: a Hugging Face-style folder, and the hub.

A FedCLIP run's folder holds config.json, adapter.safetensors and a model card; a PromptFL run's holds
config.json, prompt_context.safetensors (the learned context) and class_text_features.safetensors (the class
text features the context gives, computed once: with them the classifier is zero-shot CLIP's formula with no
text encoder and no custom code), and the card. `FedClipClassifier.export` writes it (`write_export`),
`FedClipClassifier.from_pretrained` reads it back, from a folder or a hub repository that `push_to_hub`
uploaded it to.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.files import set_default_mode

EXPORT_FORMAT = "fedclip-adapter"  # config.json's "format": what from_pretrained accepts
ADAPTER_FILE, CONFIG_FILE, CARD_FILE = "adapter.safetensors", "config.json", "README.md"
CONTEXT_FILE, TEXT_FILE = "prompt_context.safetensors", "class_text_features.safetensors"  # a PromptFL export's
TEXT_FEATURES = "text_features"  # TEXT_FILE's tensor: [classes, projection dim], in the order of config.json's classes


def write_export(folder: str | Path, files: dict[str, dict[str, torch.Tensor]], info: dict) -> Path:
    """Write each safetensors file of `files` (name -> tensors, stored float32), `info` as config.json and a model card
    README.md to `folder`."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in files.items():
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, folder / name, metadata={"format": EXPORT_FORMAT})
        set_default_mode(folder / name)
    (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2))
    (folder / CARD_FILE).write_text(model_card(info))
    return folder


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to a hub model repository (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="FedCLIP adapter")
    except Exception as err:  # noqa: BLE001 - offline mode, no network, no token: the export on disk stays usable
        raise RuntimeError(f"could not push {folder} to the hub repository {repo_id!r} ({type(err).__name__}: {err}). "
                           "It needs network access (HF_HUB_OFFLINE unset) and a write token (`hf auth login` or HF_TOKEN); "
                           f"the exported folder is complete, upload it later with `hf upload {repo_id} {folder}`") from err
    return f"https://huggingface.co/{repo_id}"


def _weights_description(info: dict) -> str:
    """What the export holds, for the card: a FedCLIP adapter, or a PromptFL context and its class text features."""
    if info.get("weights") == "prompt":
        return (f"A PromptFL prompt context ({info['n_ctx']} vectors, {info['n_ctx'] * info['text_width']:,} parameters, `{CONTEXT_FILE}`) "
                f"and the class text features it gives (`{TEXT_FILE}`: the `{TEXT_FEATURES}` that replace the encoded prompts "
                "in zero-shot CLIP's logits)")
    return f"A FedCLIP attention adapter ({2 * (info['feature_dim'] ** 2 + info['feature_dim']):,} parameters)"


def model_card(info: dict) -> str:
    """The README.md of an exported adapter: what it is, how it was trained, its results, how to load it, its limits."""
    run = info["run"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    zero, pers, gen = run.get("zero_shot") or {}, run.get("personalization") or {}, run.get("generalization") or {}
    rows = [f"| {d}{' (held out)' if d == run['held_out'] else ''} | {pct(zero.get(d))} | {pct(gen.get(d) if d == run['held_out'] else pers.get(d))} |"
            for d in zero]
    classes = ", ".join(info["classes"][:20]) + (f", ... ({len(info['classes'])} in all)" if len(info["classes"]) > 20 else "")
    return f"""---
library_name: fedclip
tags: [fedclip, clip, federated-learning, flower, image-classification]
---

# FedCLIP adapter

{_weights_description(info)} for the frozen CLIP
`{info['clip']}` (files' fingerprint `{info['clip_fingerprint']}`), trained federated with
[Flower](https://flower.ai) by the FedCLIP app. It classifies images into {len(info['classes'])} classes
({classes}) with the prompt `{info['prompt']}`.

## Training

Method `{run['method']}`, {run['rounds']} rounds, seed {run['seed']}, domain `{run['held_out']}` held out (never trained on).
This file holds the {'best round' + (f" ({run['best_round']})" if run.get('best_round') is not None else '') if info['adapter'] == 'best' else 'final'}
adapter. Traffic: {run.get('bytes_per_client_per_round') or '-'} bytes per training client per round, {run.get('bytes_total') or '-'} bytes in all.

## Results (accuracy %, {run['accuracies_are_of']})

Training domains: their clients' test splits; the held-out domain: all its images.

| domain | zero-shot CLIP | with this adapter |
|---|---|---|
{chr(10).join(rows) if rows else '| - | - | - |'}

## Use

```python
from client_app.predict import FedClipClassifier   # the FedCLIP app (pip install -e <the app>)
clf = FedClipClassifier.from_pretrained("<this folder or hub repository>")
print(clf.predict(["image.jpg"]).labels)
```

or `fedclip-predict --model <this folder or hub repository> IMAGES_OR_FOLDER`. The CLIP is loaded from
`{info['clip']}` (`clip=` / `--clip` point elsewhere); a CLIP whose files differ from the one it was trained
with is refused.

## Limitations

It only knows the {len(info['classes'])} classes above and the CLIP it was trained on; its accuracy was
measured on the run's own domains and may not carry over to other images. The held-out accuracy is the
best estimate of how it does on a new domain.
"""
