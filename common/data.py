"""Where a run's images come from: each domain's images, from a folder or the Hugging Face hub.

Two sources stand behind one interface, `ImageSource` (common/sources.py: a domain's images, or one client's share):
a folder in the common ROOT/<domain>/<class>/<image> layout (DomainBed's), or a Hugging Face dataset with
image/domain/label columns read through flwr-datasets (`FederatedDataset` + `NaturalIdPartitioner` on the
domain). Class order comes from the config, so labels agree across clients. How a domain's images are divided
among its clients, and each client's into train/val/test: common/partition.py.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from common.demo import demo_dataset_root
from common.sources import IMAGE_EXTENSIONS, DomainFolder, HubDomain, ImageSource

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# ---- the folder source ----------------------------------------------------------------------------------


def dataset_root(cfg: DictConfig) -> Path:
    """The dataset folder of a run: the built demo for root=demo, else the configured path."""
    if cfg.dataset.root == "demo":
        return demo_dataset_root(cfg.demo)
    if cfg.dataset.root is None:
        raise FileNotFoundError(
            "dataset.source=folder needs dataset.root: a folder laid out as ROOT/<domain>/<class>/<image>, e.g. "
            "--run-config 'overrides=\"dataset=pacs dataset.root=/data/PACS dataset.held_out=sketch\"'"
        )
    root = Path(cfg.dataset.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset.root={root} is not a folder. Point it at a folder laid out as ROOT/<domain>/<class>/<image>, "
            "e.g. --run-config 'overrides=\"dataset=pacs dataset.root=/data/PACS dataset.held_out=sketch\"'"
        )
    return root


def _is_data_dir(path: Path) -> bool:
    """Folders that are domains or classes: not hidden ones, nor macOS archive leftovers."""
    return path.is_dir() and not path.name.startswith(".") and path.name != "__MACOSX"


def dataset_classes(root: Path, domains: list[str]) -> list[str]:
    """Class names when the config names none: the union of class folders over all domains, sorted."""
    return sorted({p.name for d in domains for p in (root / d).iterdir() if _is_data_dir(p)})


def domain_folder(root: Path, domain: str, classes: list[str]) -> DomainFolder:
    """Every image file of one domain, in a stable order (by class, then file name).

    Listed once per process while the domain's folders are unchanged (their mtimes): with many
    clients per domain, each client's share would otherwise list the whole domain again.
    """
    folders = [root / domain, *(root / domain / name for name in classes)]
    stamp = tuple(folder.stat().st_mtime_ns if folder.is_dir() else -1 for folder in folders)
    return _list_domain(root, domain, tuple(classes), stamp)


@functools.lru_cache(maxsize=64)
def _list_domain(root: Path, domain: str, classes: tuple[str, ...], stamp: tuple[int, ...]) -> DomainFolder:
    unknown = sorted(p.name for p in (root / domain).iterdir() if _is_data_dir(p) and p.name not in classes)
    if unknown:
        raise ValueError(
            f"{root / domain} has class folder(s) {unknown} that are not among the {len(classes)} classes of "
            f"dataset.classes (first ones: {', '.join(classes[:10])}). Rename the folders, add the classes to "
            "dataset.classes, or set dataset.classes=null to use every class folder found"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = root / domain / name
        if not folder.is_dir():
            continue
        # by name: fast
        files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"no images under {root / domain}/<class>/ (extensions: {sorted(IMAGE_EXTENSIONS)})")
    return DomainFolder(domain, list(classes), paths, labels)


# ---- the Hugging Face source ----------------------------------------------------------------------------


@functools.cache
def _hub_dataset(hub_id: str, split: str):
    """The dataset behind flwr-datasets, partitioned by its domain column; loaded once per process."""
    import datasets
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    fds = FederatedDataset(
        dataset=hub_id, partitioners={split: NaturalIdPartitioner(partition_by="domain")}, shuffle=False
    )
    try:
        partitioner = fds.partitioners[split]  # downloads (or opens the local copy) and converts to Arrow once
    except (OSError, ValueError) as err:  # no network, no such dataset or folder, no such split
        raise RuntimeError(
            f"cannot load the dataset dataset.hub_id={hub_id!r} (split {split!r}): {err}. Without network access, "
            f"download it once elsewhere (`hf download {hub_id} --repo-type dataset --local-dir DIR`) and set "
            "dataset.hub_id=DIR"
        ) from err
    columns = partitioner.dataset.column_names
    if not {"image", "domain", "label"} <= set(columns):
        raise ValueError(f"dataset {hub_id!r} must have the columns image, domain and label; it has {columns}")
    domain_feature = partitioner.dataset.features["domain"]
    if partitioner.num_partitions == 0:  # also builds the partition-id -> domain map
        raise ValueError(f"dataset {hub_id!r} has no rows in split {split!r}")
    by_name = {
        domain_feature.int2str(d) if isinstance(domain_feature, datasets.ClassLabel) else str(d): pid
        for pid, d in partitioner.partition_id_to_natural_id.items()
    }
    return fds, by_name


def hub_domain(hub_id: str, split: str, domain: str, classes: list[str] | None) -> HubDomain:
    """One domain's rows, labels mapped onto the configured classes by name."""
    import datasets

    fds, by_name = _hub_dataset(hub_id, split)
    rows = fds.load_partition(by_name[domain], split).cast_column("image", datasets.Image(decode=False))
    feature = rows.features["label"]
    hub_names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    classes = list(classes) if classes else hub_names
    if classes is None:
        raise ValueError(f"the label column of {hub_id!r} has no class names: list them in dataset.classes")
    labels = np.asarray(rows["label"], dtype=np.int64)
    if hub_names is not None:
        unknown = [n for n in hub_names if n not in classes]
        if unknown:
            raise ValueError(
                f"classes {unknown} of {hub_id!r} are not in dataset.classes; add them or set dataset.classes=null"
            )
        labels = np.array([classes.index(n) for n in hub_names], dtype=np.int64)[labels]
    elif labels.size and not (0 <= labels.min() and labels.max() < len(classes)):
        raise ValueError(
            f"labels of {hub_id!r} range over {labels.min()}..{labels.max()} but dataset.classes has {len(classes)}"
        )
    return HubDomain(domain, classes, rows, np.arange(len(rows)), labels.tolist(), hub_id)


# ---- a run's domains and their images -----------------------------------------------------------------------


def dataset_domains(cfg: DictConfig, require_held_out: bool = True) -> list[str]:
    """The run's domains (configured, else all found), checked against the data; held_out must be one (if required)."""
    if cfg.dataset.source == "folder":
        root = dataset_root(cfg)
        found, where = sorted(p.name for p in root.iterdir() if _is_data_dir(p)), str(root)
    elif cfg.dataset.source == "hub":
        if not cfg.dataset.hub_id:
            raise ValueError(
                "dataset.source=hub needs dataset.hub_id (a hub dataset id such as flwrlabs/pacs, or a local copy)"
            )
        found, where = sorted(_hub_dataset(cfg.dataset.hub_id, cfg.dataset.hub_split)[1]), cfg.dataset.hub_id
    else:
        raise ValueError(f"dataset.source={cfg.dataset.source!r} is not one of: folder, hub")
    domains = list(cfg.dataset.domains) if cfg.dataset.domains else found
    unknown = [d for d in domains if d not in found]
    if unknown:
        raise ValueError(f"domain(s) {unknown} not found in {where}; valid domains: {', '.join(found)}")
    if require_held_out and cfg.dataset.held_out not in domains:
        raise ValueError(
            f"dataset.held_out={cfg.dataset.held_out!r} is not a domain of this run; valid: {', '.join(domains)}"
        )
    return domains


def domain_images(cfg: DictConfig, domain: str, own_only: bool = False) -> ImageSource:
    """All images of one domain of the run, from the configured source.

    own_only: a deployed node's data folder may hold only its own domain, so the other domains are
    not looked for (the server checks that every node reports the same classes).
    """
    if own_only and cfg.dataset.source == "folder":
        if cfg.dataset.domains and domain not in cfg.dataset.domains:
            raise ValueError(
                f"node-config domain={domain!r} is not a domain of this run; valid: {', '.join(cfg.dataset.domains)}"
            )
        root = dataset_root(cfg)
        if not (root / domain).is_dir():
            raise FileNotFoundError(
                f"node-config domain={domain!r}: no folder {root / domain}. Give the node its data with "
                "--node-config \"data-dir='DATA_DIR'\" where DATA_DIR/<domain>/<class>/<image> holds its images"
            )
        return domain_folder(
            root, domain, list(cfg.dataset.classes) if cfg.dataset.classes else dataset_classes(root, [domain])
        )
    domains = dataset_domains(cfg)
    if domain not in domains:
        raise ValueError(f"domain {domain!r} is not a domain of this run; valid: {', '.join(domains)}")
    if cfg.dataset.source == "hub":
        return hub_domain(cfg.dataset.hub_id, cfg.dataset.hub_split, domain, cfg.dataset.classes)
    root = dataset_root(cfg)
    classes = list(cfg.dataset.classes) if cfg.dataset.classes else dataset_classes(root, domains)
    return domain_folder(root, domain, classes)
