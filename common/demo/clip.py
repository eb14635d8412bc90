"""The demo's small CLIP: its tokenizer, its contrastive pretraining on captioned digits, and its packed form.

The pretrained CLIP ships with the app, packed in ``common/demo/demo_clip.json`` (see common/demo/__init__.py):
`pack_clip` and `unpack_clip` turn a saved CLIP folder into that JSON and back, checked by hash.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from common.demo.images import DIGIT_NAMES, STYLES, _backgrounds, _digit_pools, render

log = logging.getLogger(__name__)

GENERIC_CAPTION = "a picture of a {digit}"  # the prompt FedCLIP uses at inference
STYLE_CAPTION = "a {style} of a {digit}"  # what most pretraining captions say instead (style word)
SHIPPED_CLIP = Path(__file__).with_name("demo_clip.json")  # the pretrained demo CLIP, packed (see above)


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(words: list[str]):
    """A CLIP BPE tokenizer whose merges spell out `words`; any other text falls back to bytes."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        tokens = list(word[:-1]) + [word[-1] + "</w>"]
        while len(tokens) > 1:
            pair, merged = (tokens[0], tokens[1]), tokens[0] + tokens[1]
            if pair not in merges:
                merges.append(pair)
                vocab.append(merged)
            tokens = [merged] + tokens[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, merges=merges)


# ----------------------------------------------------------------------------- pretraining


def pretraining_captions(style_words: dict[str, str]) -> tuple[list[str], dict[str, int]]:
    """Caption blocks of one caption per digit (generic first, then one per style word) and each style's block."""
    words = sorted(set(style_words.values()))
    blocks = [GENERIC_CAPTION] + [STYLE_CAPTION.replace("{style}", w) for w in words]
    captions = [block.format(digit=n) for block in blocks for n in DIGIT_NAMES]
    return captions, {style: 1 + words.index(word) for style, word in style_words.items()}


def pretrain_clip(out: Path, cfg: DictConfig) -> None:
    """Contrastively pretrain a small CLIP on captioned digits (pretraining pool only) and save it.

    Each image is matched against one block of captions, one per digit: with probability
    `generic_caption_prob[style]` the generic block ("a picture of a three"), else the block of
    its style's word (`style_words`: every non-photo style is "a drawing of a three", as web
    captions of art often are; photos always get the generic one). The encoder learns every style, but
    the prompt FedCLIP uses fits photos best, and it misses the drawings in a way they share:
    room for an adapter trained on some styles to help on another.
    """
    with _single_thread():
        _pretrain(out, cfg)


@contextlib.contextmanager
def _single_thread():
    """One torch thread and deterministic algorithms while pretraining: the same machine always makes the same
    weights."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _pretrain(out: Path, cfg: DictConfig) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(cfg.seed)
    captions, style_block = pretraining_captions(dict(cfg.pretrain.style_words))
    tokenizer = build_tokenizer(sorted({w for c in captions for w in c.split()}))
    p = cfg.pretrain
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=p.width,
            intermediate_size=2 * p.width,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=p.width,
            intermediate_size=2 * p.width,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            image_size=cfg.image_size,
            patch_size=p.patch_size,
        ),
        projection_dim=p.projection_dim,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size}
    )
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    text = tokenizer(captions, padding=True, return_tensors="pt")
    generic_p = np.array([p.generic_caption_prob[s] for s in STYLES])

    (images, labels), _ = _digit_pools(cfg.num_pretrain_digits, cfg.seed)
    images, labels = np.tile(images, (p.renders_per_epoch, 1, 1)), np.tile(labels, p.renders_per_epoch)
    backgrounds = _backgrounds()
    rng = np.random.default_rng([cfg.seed, 99])
    style_p = np.array([p.style_mix[s] for s in STYLES], np.float64)
    style_p /= style_p.sum()

    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.1)
    steps_per_epoch = -(-len(labels) // p.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=p.epochs * steps_per_epoch, pct_start=0.1)
    t0 = time.time()
    for epoch in range(p.epochs):
        # fresh renders every epoch: photo-only warm-up, then the configured style mix
        probs = np.eye(len(STYLES))[0] if epoch < p.photo_only_epochs else style_p
        styles = rng.choice(len(STYLES), size=len(labels), p=probs)
        drawn = np.stack([render(im, STYLES[s], cfg.image_size, rng, backgrounds) for im, s in zip(images, styles)])
        pixels = (torch.from_numpy(drawn).permute(0, 3, 1, 2).float() / 255 - mean) / std
        digit = torch.as_tensor(labels)
        own_block = np.array([style_block[s] for s in STYLES])[styles]
        block = torch.as_tensor(np.where(rng.random(len(labels)) < generic_p[styles], 0, own_block))
        perm = torch.randperm(len(labels))
        total = 0.0
        for i in range(0, len(labels), p.batch_size):
            idx = perm[i : i + p.batch_size]
            img = F.normalize(model.get_image_features(pixel_values=pixels[idx]).pooler_output, dim=-1)
            txt = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T  # [batch, blocks * digits]
            logits = logits.view(len(idx), -1, len(DIGIT_NAMES))[torch.arange(len(idx)), block[idx]]
            loss = F.cross_entropy(logits, digit[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 0 or epoch == p.epochs - 1:
            log.info(
                "demo CLIP pretraining: epoch %d/%d loss %.3f (%.0fs)",
                epoch + 1,
                p.epochs,
                total / len(labels),
                time.time() - t0,
            )

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


# ----------------------------------------------------------------------------- packed


def tree_sha256(folder: Path) -> str:
    """One hash of every file under `folder`: relative paths and contents."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def pack_clip(folder: Path, settings: dict) -> dict:
    """A saved CLIP folder as JSON: each file base64-encoded, the settings it was pretrained with, the folder's hash."""
    files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in sorted(folder.iterdir())}
    return {"settings": settings, "sha256": tree_sha256(folder), "files": files}


def unpack_clip(packed: dict, out: Path) -> None:
    """Write a packed CLIP back as its folder, refusing one whose bytes differ from the recorded hash."""
    out.mkdir(parents=True)
    for name, data in packed["files"].items():
        (out / name).write_bytes(base64.b64decode(data))
    if (digest := tree_sha256(out)) != packed["sha256"]:
        raise RuntimeError(
            f"{SHIPPED_CLIP} is damaged: its files hash to {digest}, not {packed['sha256']}; "
            "restore it from the repository or rebuild it with `python -m common.demo --rebuild-clip`"
        )
