"""The embedded demo's images: scikit-learn's handwritten digits drawn in four styles, one domain each.

photo, sketch, cartoon and painting (on scikit-image's sample photos). The digits are split once into two
disjoint pools: one pretrains the demo CLIP (common/demo/clip.py), the other becomes the federated dataset
in the usual ``ROOT/<domain>/<class>/`` layout. Everything is drawn from fixed seeds with exact arithmetic
only, so the images are the same bytes on every machine with the pinned packages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageFilter

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STYLES = ("photo", "sketch", "cartoon", "painting")
COLOR_HUES = (0, 30, 55, 120, 180, 230, 275, 320)  # ink and background colours of the coloured styles
_BACKGROUND_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "cat")


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


def render(
    digit: np.ndarray, style: str, size: int, rng: np.random.Generator, backgrounds: list[np.ndarray]
) -> np.ndarray:
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
