"""Shared fixtures: a tiny CLIP saved with save_pretrained, a small multi-domain image folder, and the same
kind of data as a Hugging Face dataset saved to disk in the hub's layout (data/train-*.parquet)."""

from __future__ import annotations

import os
import tempfile

# Tests run offline with an empty Hugging Face cache, set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="fedclip-test-hf-")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flwr.app import Error, Message, MessageType, Metadata, RecordDict  # noqa: E402
from PIL import Image  # noqa: E402


def save_tiny_clip(
    folder: Path,
    seed: int = 0,
    projection_dim: int = 24,
    text_width: int = 32,
    text_positions: int = 16,
    vision_layers: int = 1,
) -> Path:
    """A 1-layer, 32-wide CLIP with the demo's tokenizer, saved like any Hugging Face CLIP (projection_dim=512:
    ViT-B/32's
    feature size, so its adapter has ViT-B/32's 525,312 parameters; text_width=512 and text_positions=77: ViT-B/32's
    text
    tower's, so a PromptFL context has ViT-B/32's size)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from common.demo import build_tokenizer

    tokenizer = build_tokenizer(["a", "picture", "of", "cat", "dog", "bird"])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=text_positions,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> str:
    """Where `flwr run` tests build (or find) the embedded demo: FEDCLIP_CACHE if set, so a built demo is reused."""
    return os.environ.get("FEDCLIP_CACHE") or str(tmp_path_factory.mktemp("cache"))


def write_image_folder(
    root: Path, domains=("art", "photo", "sketch"), classes=("cat", "dog", "bird"), per_class=5
) -> Path:
    """ROOT/<domain>/<class>/<i>.png with random images, plus one corrupt file in the first domain."""
    rng = np.random.default_rng(0)
    for domain in domains:
        for name in classes:
            (root / domain / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    root / domain / name / f"{i}.png"
                )
    (root / domains[0] / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data")


def write_hub_dataset(
    root: Path,
    domains=("art_painting", "cartoon", "photo", "sketch"),
    classes=("giraffe", "dog", "elephant"),
    per_class=4,
) -> Path:
    """A dataset with flwrlabs/pacs's columns (image, domain string, label ClassLabel) written as parquet the
    way a hub repository holds it, so that `FederatedDataset(dataset=root)` reads it like the hub's copy.
    The second image of the first domain is not an image."""
    import io

    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(1)
    rows = {"image": [], "domain": [], "label": []}
    for domain in domains:
        for label in range(len(classes)):
            for _ in range(per_class):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(png, format="PNG")
                rows["image"].append({"bytes": png.getvalue(), "path": None})
                rows["domain"].append(domain)
                rows["label"].append(label)
    rows["image"][1] = {"bytes": b"\x89PNG\r\n truncated", "path": None}
    features = Features(image=ImageFeature(), domain=Value("string"), label=ClassLabel(names=list(classes)))
    (root / "data").mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="session")
def hub_dataset(tmp_path_factory) -> Path:
    return write_hub_dataset(tmp_path_factory.mktemp("hub-copy"))


def reply_from(
    node_id: int, content: RecordDict | None = None, error: str | None = None, message_type: str = MessageType.TRAIN
) -> Message:
    """A reply message as the server receives it from `node_id`."""
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60,
        message_type=message_type,
    )
    if error is not None:
        return Message(error=Error(code=1, reason=error), metadata=metadata)
    return Message(content=content, metadata=metadata)
