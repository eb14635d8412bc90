"""What one client holds: its images (a domain, or a share of one), their frozen features (cached) and its seeded split.

A ClientApp builds it on a run's first message (client_app/node.py) and every method works on it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from common.data import dataset_domains
from common.features import DomainFeatures, domain_features
from common.fingerprint import model_files_fingerprint
from common.model import model_name_or_path, shared_clip
from common.partition import DomainSplit, client_images, client_name, split_domain
from common.sources import DomainFolder, ImageSource


@dataclass
class LocalData:
    """A client's images, their cached features and split, and what its methods keep between messages."""

    cfg: DictConfig
    domain: str
    client: str  # the domain, or "<domain>#<shard>" when dataset.clients_per_domain > 1
    images: ImageSource
    feats: DomainFeatures
    split: DomainSplit
    device: torch.device
    folders: dict[Path, int] = field(default_factory=dict)  # the image folders and their mtimes when built
    pooled: tuple[DomainFeatures, torch.Tensor] | None = None  # method=centralized: every training client's train split
    computed: dict = field(default_factory=dict)  # what a method computes once from these images (its own keys)

    @property
    def held_out(self) -> bool:
        return self.domain == self.cfg.dataset.held_out

    def changed(self) -> bool:
        """Whether image files were added, removed or renamed since it was built (a few stat calls)."""
        return any(_mtime(folder) != mtime for folder, mtime in self.folders.items())

    def clip_model(self) -> tuple:
        """The process's frozen CLIP (model, processor), for methods that run it (promptfl's text tower, two_tower's
        image layers): one for every client the process serves (common/model.shared_clip)."""
        name = model_name_or_path(self.cfg)
        return shared_clip(name, model_files_fingerprint(name, self.cfg.cache_dir), self.device)

    def generator(self, server_round: int, purpose: str) -> torch.Generator:
        """A seeded generator per client, round and purpose, so runs repeat exactly."""
        return torch.Generator().manual_seed(
            zlib.crc32(f"{self.cfg.seed}/{self.client}/{server_round}/{purpose}".encode())
        )

    def pooled_train(self) -> tuple[DomainFeatures, torch.Tensor]:
        """Every training client's train split pooled, with their features (built once): method=centralized's data."""
        if self.pooled is not None:
            return self.pooled
        cfg, k = self.cfg, int(self.cfg.dataset.clients_per_domain)
        parts = []
        for domain in dataset_domains(cfg):
            for shard in range(k) if domain != cfg.dataset.held_out else []:
                try:
                    other = (
                        self
                        if client_name(domain, shard, k) == self.client
                        else client_data(cfg, domain, shard, self.device)
                    )
                except (OSError, ValueError) as err:
                    raise RuntimeError(
                        f"method=centralized pools every training client's data on one node, but this node cannot read "
                        f"{client_name(domain, shard, k)!r} ({err}); it is an upper bound for simulation, where all "
                        f"data is local"
                    ) from err
                parts.append((other.feats.image[other.split.train], other.feats.labels[other.split.train]))
        image, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        self.pooled = (
            DomainFeatures(image, labels, self.feats.text, self.feats.logit_scale, []),
            torch.arange(len(labels)),
        )
        return self.pooled


def _mtime(folder: Path) -> int:
    try:
        return folder.stat().st_mtime_ns
    except OSError:
        return -1


def client_data(cfg: DictConfig, domain: str, shard: int, device: torch.device, own_only: bool = False) -> LocalData:
    """One client's images, their frozen features (cached) and its seeded split."""
    images = client_images(cfg, domain, shard, own_only)
    folders = (
        {p.parent for p in images.paths} | {p.parent.parent for p in images.paths}
        if isinstance(images, DomainFolder)
        else set()
    )
    # before the listing is used: a change during the build is seen next time
    stamp = {folder: _mtime(folder) for folder in folders}
    feats = domain_features(
        model_name_or_path(cfg),
        images,
        cfg.model.prompt,
        cfg.cache_dir,
        device,
        cfg.model.encode_batch_size,
        cfg.model.dtype,
    )
    client = client_name(domain, shard, int(cfg.dataset.clients_per_domain))
    split = split_domain(len(feats.labels), list(cfg.dataset.split), cfg.seed, client)
    return LocalData(cfg, domain, client, images, feats, split, device, stamp)
