"""How a run's images are divided: each domain among its clients, and each client's images into train/val/test.

A domain's images (common/data.py) go whole to one client, or are cut into dataset.clients_per_domain
shards (equal random parts, or Dirichlet proportions per class). Every cut is seeded from the run's seed
and the domain's or client's name, so every machine derives the same shares without talking.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from common.data import domain_images
from common.sources import ImageSource

PARTITIONS = ("shards", "dirichlet")
DIRICHLET_TRIES = 10  # fresh draws before a Dirichlet split that leaves a client empty is an error


@dataclass
class DomainSplit:
    """Disjoint train/val/test indices into one client's images."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def client_name(domain: str, shard: int, clients_per_domain: int) -> str:
    """The domain itself with one client per domain, else "<domain>#<shard>" ('/' separates metric keys)."""
    return domain if clients_per_domain == 1 else f"{domain}#{shard}"


def client_images(cfg: DictConfig, domain: str, shard: int, own_only: bool = False) -> ImageSource:
    """The images of client `shard` of `domain`: the whole domain, or its share of dataset.clients_per_domain."""
    images = domain_images(cfg, domain, own_only)
    k = int(cfg.dataset.clients_per_domain)
    if not 0 <= shard < k:
        raise ValueError(f"shard {shard} does not exist: dataset.clients_per_domain={k}, so shards are 0..{k - 1}")
    if k == 1:
        return images
    shards = shard_domain(images.labels, k, cfg.dataset.partition, cfg.dataset.dirichlet_alpha, cfg.seed, domain)
    return images.subset(shards[shard])


def shard_domain(
    labels: list[int], num_shards: int, partition: str, alpha: float, seed: int, domain: str
) -> list[np.ndarray]:
    """Divide one domain's images among `num_shards` clients, seeded so that every machine agrees.

    `shards`: a random permutation cut into equal parts. `dirichlet`: each class is spread over the clients
    in proportions drawn from Dirichlet(alpha) (small alpha: each client sees few classes). Every client gets
    at least one image, or this is an error.
    """
    labels = np.asarray(labels)
    if num_shards < 1:
        raise ValueError(f"dataset.clients_per_domain must be at least 1, got {num_shards}")
    if len(labels) < num_shards:
        raise ValueError(
            f"domain {domain!r} has {len(labels)} images, fewer than dataset.clients_per_domain={num_shards}: "
            "lower dataset.clients_per_domain"
        )
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode()), num_shards])
    if partition == "shards":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_shards)]
    if partition != "dirichlet":
        raise ValueError(f"dataset.partition={partition!r} is not one of: {', '.join(PARTITIONS)}")
    if not alpha > 0:
        raise ValueError(f"dataset.dirichlet_alpha must be positive, got {alpha}")
    for _ in range(DIRICHLET_TRIES):
        shards: list[list[int]] = [[] for _ in range(num_shards)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            cuts = np.round(np.cumsum(rng.dirichlet(np.full(num_shards, alpha)))[:-1] * len(rows)).astype(int)
            for shard, part in zip(shards, np.split(rows, cuts)):
                shard.extend(part.tolist())
        if all(shards):
            return [np.array(sorted(shard), dtype=np.int64) for shard in shards]
    raise ValueError(
        f"a Dirichlet split (alpha={alpha}) of domain {domain!r} ({len(labels)} images, {len(np.unique(labels))} "
        f"classes) "
        f"left a client with no image in {DIRICHLET_TRIES} draws: raise dataset.dirichlet_alpha, lower "
        "dataset.clients_per_domain, or use dataset.partition=shards"
    )


def split_domain(num_images: int, fractions: list[float], seed: int, domain: str) -> DomainSplit:
    """A seeded train/val/test split of one client's images (60/20/20 by default), the same on every machine.

    `domain` seeds it: the domain's name, or the client's name when a domain has several clients.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"dataset.split must be three fractions summing to 1, got {list(fractions)}")
    order = np.random.default_rng([seed, zlib.crc32(domain.encode())]).permutation(num_images)
    n_train = int(round(fractions[0] * num_images))
    n_val = int(round(fractions[1] * num_images))
    return DomainSplit(order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
