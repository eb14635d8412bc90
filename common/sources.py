"""What a domain's images are to the rest of the app: an `ImageSource`, from a folder or a Hugging Face dataset.

Images are decoded one at a time when encoded, never all held in memory; unreadable ones are skipped and logged. Where
a run's sources come from (the folder layout, the hub, which domains): common/data.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class ImageSource(Protocol):
    """What the feature cache reads: a domain's images, or one client's share; labels index `classes`."""

    domain: str
    classes: list[str]
    labels: list[int]

    def __len__(self) -> int: ...

    def read(self, i: int) -> Image.Image | None:
        """Image i as RGB, or None (logged) when it cannot be decoded."""

    def name(self, i: int) -> str:
        """Where image i comes from, for the report of skipped images."""

    def fingerprint(self) -> str:
        """Changes whenever the images, their labels or their order change: the feature cache's key."""

    def subset(self, rows: np.ndarray) -> ImageSource:
        """The same source restricted to `rows` (one client's shard)."""


@dataclass
class DomainFolder:
    """Image files of one domain in the folder layout."""

    domain: str
    classes: list[str]
    paths: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> Image.Image | None:
        return read_image(self.paths[i])

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def fingerprint(self) -> str:
        """Every file's path, size and mtime, and its label."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(["folder", self.classes]).encode())
        for path, label in zip(self.paths, self.labels):
            stat = path.stat()
            h.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{label}\n".encode())
        return h.hexdigest()

    def subset(self, rows: np.ndarray) -> DomainFolder:
        return DomainFolder(self.domain, self.classes, [self.paths[r] for r in rows], [self.labels[r] for r in rows])


@dataclass
class HubDomain:
    """Rows of one domain of a Hugging Face dataset; Arrow keeps them memory-mapped on disk, undecoded."""

    domain: str
    classes: list[str]
    dataset: datasets.Dataset  # this domain's rows, the image column cast to Image(decode=False)
    rows: np.ndarray  # the rows of `dataset` this source holds
    labels: list[int]
    hub_id: str

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int) -> Image.Image | None:
        image = self.dataset[int(self.rows[i])]["image"]
        if image is None or (image.get("bytes") is None and image.get("path") is None):
            log.warning("skipping missing image %s", self.name(i))
            return None
        file = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else Path(image["path"])
        return read_image(file, self.name(i))

    def name(self, i: int) -> str:
        return f"{self.hub_id}:{self.domain}[{int(self.rows[i])}]"

    def fingerprint(self) -> str:
        """The Arrow dataset's own fingerprint (data files and every transform applied), the rows and labels."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(["hub", self.hub_id, self.dataset._fingerprint, self.classes]).encode())
        h.update(np.asarray(self.rows, dtype=np.int64).tobytes())
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()

    def subset(self, rows: np.ndarray) -> HubDomain:
        return HubDomain(
            self.domain, self.classes, self.dataset, self.rows[rows], [self.labels[r] for r in rows], self.hub_id
        )


def read_image(file: Path | BinaryIO, name: str | None = None) -> Image.Image | None:
    """The image as RGB, or None (logged) when the file is unreadable or truncated."""
    try:
        with Image.open(file) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        log.warning("skipping unreadable image %s: %s", name or file, err)
        return None
