"""The embedded demo: a 4-domain image folder and a small CLIP pretrained on it, built offline.

No multi-domain image set and no pretrained CLIP install offline, so the project makes its
own from real images that installed packages ship: scikit-learn's 1,797 handwritten digits,
drawn in four styles (photo, sketch, cartoon, painting on scikit-image's sample photos).
The digits are split once: one pool pretrains the CLIP, the other (never seen in
pretraining) becomes the federated dataset in the usual ``ROOT/<domain>/<class>/`` layout.
The CLIP is saved as a normal Hugging Face folder and loaded with ``from_pretrained`` like
``openai/clip-vit-base-patch32``.

The pretrained CLIP ships with the app, packed in ``common/demo_clip.json`` (the app bundle that
``flwr run`` sends carries only text files): pretraining takes minutes and floating-point results
differ between CPUs, so every machine unpacks the same bytes instead. ``python -m common.demo
--rebuild-clip`` pretrains it again (one thread, fixed seeds) and rewrites that file. The images are
drawn at first use, a few seconds, from fixed seeds with exact arithmetic only, so they are the same
bytes on every machine with the pinned packages (tests/test_demo.py checks both by hash).

Run ``python -m common.demo`` to build both ahead of time; the apps build them on first use.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageFilter

from common.files import set_default_mode

log = logging.getLogger(__name__)

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STYLES = ("photo", "sketch", "cartoon", "painting")
COLOR_HUES = (0, 30, 55, 120, 180, 230, 275, 320)  # ink and background colours of the coloured styles
GENERIC_CAPTION = "a picture of a {digit}"  # the prompt FedCLIP uses at inference
STYLE_CAPTION = "a {style} of a {digit}"  # what most pretraining captions say instead (style word)
DATASET_VERSION = 3  # bump when write_dataset or render change what is drawn
MODEL_VERSION = 2  # bump when pretrain_clip or the shipped CLIP change
DATASET_KEYS = ["seed", "image_size", "num_pretrain_digits"]  # the `demo` settings each part is built from
CLIP_KEYS = DATASET_KEYS + ["pretrain"]
SHIPPED_CLIP = Path(__file__).with_name("demo_clip.json")  # the pretrained demo CLIP, packed (see above)
_BACKGROUND_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "cat")


# ----------------------------------------------------------------------------- images


def _backgrounds() -> list[np.ndarray]:
    import skimage.data

    return [np.asarray(getattr(skimage.data, name)()[..., :3], np.float32) / 255 for name in _BACKGROUND_PHOTOS]


def _digit_mask(digit: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 digit (0..16) scaled, rotated and placed at random on a size x size canvas."""
    side = int(round(size * rng.uniform(0.6, 0.9)))
    img = Image.fromarray(np.uint8(digit * (255 / 16))).resize((side, side), Image.BICUBIC)
    img = img.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    canvas = Image.new("L", (size, size))
    x, y = rng.integers(0, size - side + 1, size=2)
    canvas.paste(img, (int(x), int(y)))
    return np.asarray(canvas, np.float32) / 255


def _edges(mask: np.ndarray) -> np.ndarray:
    gy, gx = np.gradient(mask)
    edge = np.sqrt(gx * gx + gy * gy)  # not np.hypot: libm's result may differ between machines in the last bit
    return np.clip(edge / (edge.max() + 1e-6) * 1.5, 0, 1)


def _color(hue: float, rng: np.random.Generator) -> np.ndarray:
    """A bright colour near `hue` (degrees), jittered in hue, saturation and value."""
    hue = (hue + rng.uniform(-8, 8)) % 360
    hsv = np.array([[[hue * 255 / 360, rng.uniform(170, 255), rng.uniform(190, 255)]]], np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), np.float32)[0, 0] / 255


def render(digit: np.ndarray, style: str, size: int, rng: np.random.Generator, backgrounds: list[np.ndarray]) -> np.ndarray:
    """One digit drawn in one style, as an RGB uint8 array."""
    m = _digit_mask(digit, size, rng)[..., None]
    ink_hue, bg_hue = rng.choice(COLOR_HUES, size=2, replace=False)
    ink = _color(ink_hue, rng)
    if style == "photo":  # light digit on a dark, slightly noisy background
        out = 0.1 + 0.8 * m + rng.normal(0, 0.03, m.shape)
        out = np.repeat(out, 3, axis=2)
    elif style == "sketch":  # dark pencil outline on white paper
        out = 1 - 0.9 * _edges(m[..., 0])[..., None] + rng.normal(0, 0.04, m.shape)
        out = np.repeat(out, 3, axis=2)
    elif style == "cartoon":  # flat colours, hard shape, black outline
        bg = _color(bg_hue, rng)
        hard = (m > 0.35).astype(np.float32)
        out = bg * (1 - hard) + ink * hard
        out = out * (1 - _edges(hard[..., 0])[..., None])
    elif style == "painting":  # coloured strokes over a blurred crop of a real photo
        photo = backgrounds[rng.integers(len(backgrounds))]
        h, w = photo.shape[:2]
        crop = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
        y, x = rng.integers(0, h - crop), rng.integers(0, w - crop)
        patch = Image.fromarray(np.uint8(photo[y : y + crop, x : x + crop] * 255)).resize((size, size), Image.BILINEAR)
        bg = np.asarray(patch.filter(ImageFilter.GaussianBlur(1.2)), np.float32) / 255
        alpha = m * rng.uniform(0.7, 0.95) * (1 + rng.normal(0, 0.15, m.shape))
        out = bg * (1 - alpha) + ink * alpha
    else:
        raise ValueError(f"unknown demo style {style!r}; valid styles: {', '.join(STYLES)}")
    return np.uint8(np.clip(out, 0, 1) * 255)


def _digit_pools(num_pretrain: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Disjoint (images, labels) pools: one to pretrain the CLIP, one for the federation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    pre, fed = order[:num_pretrain], order[num_pretrain:]
    return (digits.images[pre], digits.target[pre]), (digits.images[fed], digits.target[fed])


def write_dataset(root: Path, cfg: DictConfig) -> None:
    """Write the federated digits as ROOT/<style>/<class>/<index>.png, each domain its own digits.

    The domains share no digit, so no handwritten instance is seen by two clients (as in PACS,
    whose domains hold different pictures).
    """
    _, (images, labels) = _digit_pools(cfg.num_pretrain_digits, cfg.seed)
    backgrounds = _backgrounds()
    chunks = np.array_split(np.arange(len(labels)), len(STYLES))
    for d, style in enumerate(STYLES):
        rng = np.random.default_rng([cfg.seed, d])
        for name in DIGIT_NAMES:
            (root / style / name).mkdir(parents=True, exist_ok=True)
        for i in chunks[d]:
            digit, label = images[i], labels[i]
            rgb = render(digit, style, cfg.image_size, rng, backgrounds)
            Image.fromarray(rgb).save(root / style / DIGIT_NAMES[label] / f"{i:04d}.png")


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
    """One torch thread and deterministic algorithms while pretraining: the same machine always makes the same weights."""
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
            vocab_size=len(tokenizer), hidden_size=p.width, intermediate_size=2 * p.width,
            num_hidden_layers=p.layers, num_attention_heads=p.heads, max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=p.width, intermediate_size=2 * p.width, num_hidden_layers=p.layers,
            num_attention_heads=p.heads, image_size=cfg.image_size, patch_size=p.patch_size,
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
            log.info("demo CLIP pretraining: epoch %d/%d loss %.3f (%.0fs)", epoch + 1, p.epochs, total / len(labels), time.time() - t0)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


# ----------------------------------------------------------------------------- build on first use


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive file lock, so concurrent clients build the demo once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_once(target: Path, build) -> Path:
    """Build `target` into a temporary folder and rename it, under a lock; reuse it if present.

    Its files get the mode open() gives (save_pretrained writes the weights 0o600): other users and
    containers share the cache.
    """
    with _locked(target.with_name(target.name + ".lock")):
        if not target.exists():
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("building %s (first use; later runs reuse it)", target)
            build(tmp)
            for path in tmp.rglob("*"):
                if path.is_file():
                    set_default_mode(path)
            tmp.rename(target)
    return target


def _settings(cfg: DictConfig, keys: list[str]) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: container[k] for k in keys}


def _cache_name(kind: str, version: int, settings: dict) -> str:
    """A folder name that changes whenever the code version or the settings it was built from change."""
    digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=6).hexdigest()
    return f"demo-{kind}-v{version}-{digest}"


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
        raise RuntimeError(f"{SHIPPED_CLIP} is damaged: its files hash to {digest}, not {packed['sha256']}; "
                           "restore it from the repository or rebuild it with `python -m common.demo --rebuild-clip`")


def demo_dataset_root(cfg: DictConfig) -> Path:
    """The demo image folder for `cfg` (the `demo` config group), built if missing."""
    name = _cache_name("digits", DATASET_VERSION, _settings(cfg, DATASET_KEYS))
    return _build_once(Path(cfg.cache_dir).expanduser() / name, lambda p: write_dataset(p, cfg))


def demo_model_path(cfg: DictConfig) -> Path:
    """The demo CLIP folder for `cfg`: the shipped one, unpacked; pretrained here only for other `demo.pretrain` settings."""
    settings = _settings(cfg, CLIP_KEYS)

    def build(out: Path) -> None:
        shipped = json.loads(SHIPPED_CLIP.read_text())
        if shipped["settings"] == settings:
            unpack_clip(shipped, out)
        else:
            log.warning("the demo settings differ from those of the shipped CLIP (%s): pretraining one here, "
                        "a few minutes; its weights depend on this machine's CPU", SHIPPED_CLIP.name)
            pretrain_clip(out, cfg)

    name = _cache_name("clip", MODEL_VERSION, settings)
    return _build_once(Path(cfg.cache_dir).expanduser() / name, build)


def rebuild_shipped_clip(cfg: DictConfig) -> None:
    """Pretrain the demo CLIP from `cfg` (the `demo` group) and pack it into SHIPPED_CLIP."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pretrain_clip(Path(tmp) / "clip", cfg)
        packed = pack_clip(Path(tmp) / "clip", _settings(cfg, CLIP_KEYS))
    SHIPPED_CLIP.write_text(json.dumps(packed, indent=1) + "\n")
    print(f"wrote {SHIPPED_CLIP} (sha256 of the CLIP folder {packed['sha256']})")


if __name__ == "__main__":
    from common.config import load_config

    parser = argparse.ArgumentParser(description="Build the embedded demo ahead of time, or pretrain the shipped CLIP again.")
    parser.add_argument("--rebuild-clip", action="store_true", help=f"pretrain the demo CLIP and rewrite {SHIPPED_CLIP.name}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config()
    if args.rebuild_clip:
        rebuild_shipped_clip(cfg.demo)
    else:
        print("dataset:", demo_dataset_root(cfg.demo))
        print("model:", demo_model_path(cfg.demo))
