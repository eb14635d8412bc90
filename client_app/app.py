"""The FedCLIP ClientApp: one domain's images, a frozen CLIP, and the adapter it trains locally."""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from common.config import config_from_run, select_device
from common.data import DomainSplit, dataset_classes, dataset_domains, dataset_root, domain_folder, split_domain
from common.features import DomainFeatures, domain_features
from common.model import AttentionAdapter, model_name_or_path
from common.train import evaluate_adapter, load_optimizer_state, make_optimizer, optimizer_state, train_adapter

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
log = logging.getLogger(__name__)

app = ClientApp()


@dataclass
class LocalData:
    """What a client holds: its domain's cached features and their split."""

    cfg: DictConfig
    domain: str
    feats: DomainFeatures
    split: DomainSplit
    device: torch.device
    classes: list[str]

    @property
    def held_out(self) -> bool:
        return self.domain == self.cfg.dataset.held_out


# What a SuperNode may say about itself with `flower-supernode --node-config`; Flower's simulation
# sets partition-id and num-partitions.
NODE_CONFIG_KEYS = {"domain", "data-dir", "cache-dir", "device", "partition-id", "num-partitions"}


def apply_node_config(cfg: DictConfig, node_config: Mapping) -> DictConfig:
    """The run's configuration as this node sees it: its data folder, cache and device win.

    `data-dir` (a folder DATA_DIR/<domain>/<class>/<image>, or `demo`) replaces dataset.root,
    `cache-dir` replaces cache_dir (features, the built demo), `device` replaces device.
    """
    unknown = sorted(set(node_config) - NODE_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"unknown --node-config key(s) {unknown}; a FedCLIP SuperNode takes domain, data-dir, cache-dir and device, "
            "e.g. --node-config \"domain='photo' data-dir='/data' cache-dir='/cache' device='cuda:0'\""
        )
    if "data-dir" in node_config:
        cfg.dataset.root = str(node_config["data-dir"])
    if "cache-dir" in node_config:
        cfg.cache_dir = cfg.demo.cache_dir = str(Path(str(node_config["cache-dir"])).expanduser())
    if "device" in node_config:
        cfg.device = str(node_config["device"])
    return cfg


def load_local_data(context: Context) -> LocalData:
    """This node's domain (node config `domain`, else its simulation partition-id) and its features."""
    cfg = apply_node_config(config_from_run(context.run_config), context.node_config)
    root = dataset_root(cfg)
    if "domain" in context.node_config:
        # a deployed node may hold only its own domain: DATA_DIR/<domain>/<class>/<image>
        domain = str(context.node_config["domain"])
        if cfg.dataset.domains and domain not in cfg.dataset.domains:
            raise ValueError(f"node-config domain={domain!r} is not a domain of this run; valid: {', '.join(cfg.dataset.domains)}")
        if not (root / domain).is_dir():
            raise FileNotFoundError(
                f"node-config domain={domain!r}: no folder {root / domain}. Give the node its data with "
                "--node-config \"data-dir='DATA_DIR'\" where DATA_DIR/<domain>/<class>/<image> holds its images"
            )
        classes = dataset_classes(root, [domain])
    else:
        domains = dataset_domains(cfg, root)
        partition = int(context.node_config["partition-id"])
        if partition >= len(domains):
            raise ValueError(
                f"partition-id {partition} has no domain: the run has {len(domains)} domains ({', '.join(domains)}); "
                f"run with --federation-config \"num-supernodes={len(domains)}\""
            )
        domain = domains[partition]
        classes = dataset_classes(root, domains)
    device = select_device(cfg.device)
    folder = domain_folder(root, domain, classes)
    feats = domain_features(
        model_name_or_path(cfg), folder, cfg.model.prompt, cfg.cache_dir, device, cfg.model.encode_batch_size, cfg.model.dtype
    )
    split = split_domain(len(feats.labels), list(cfg.dataset.split), cfg.seed, domain)
    return LocalData(cfg, domain, feats, split, device, classes)


def _reply(message: Message, local: LocalData, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    info = ConfigRecord({"domain": local.domain, "classes": local.classes})
    content = RecordDict({"metrics": MetricRecord(metrics), "info": info})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=message)


def _adapter(local: LocalData, arrays: ArrayRecord) -> AttentionAdapter:
    adapter = AttentionAdapter(local.feats.image.shape[1]).to(local.device)
    adapter.load_state_dict(arrays.to_torch_state_dict())
    return adapter


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which domain this node holds and how much data; encodes the features once."""
    local = load_local_data(context)
    return _reply(
        message,
        local,
        {
            "feature-dim": local.feats.image.shape[1],
            "num-images": len(local.feats.labels),
            "num-skipped": len(local.feats.skipped),
            "num-train": len(local.split.train),
            "num-val": len(local.split.val),
            "num-test": len(local.split.test),
        },
    )


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local epochs on the train split from the global adapter; the optimiser state stays on the node."""
    local = load_local_data(context)
    if local.held_out:
        raise RuntimeError(f"domain {local.domain!r} is held out and must never train")
    cfg = local.cfg.training
    adapter = _adapter(local, message.content["arrays"])
    optimizer = make_optimizer(adapter, cfg)
    if "optimizer" in context.state:
        load_optimizer_state(optimizer, context.state["optimizer"].to_torch_state_dict())
    server_round = int(message.content["config"]["server-round"])
    generator = torch.Generator().manual_seed(zlib.crc32(f"{local.cfg.seed}/{local.domain}/{server_round}".encode()))
    t0 = time.time()
    loss = train_adapter(adapter, optimizer, local.feats, torch.as_tensor(local.split.train), cfg, generator)
    context.state["optimizer"] = ArrayRecord(optimizer_state(optimizer))
    metrics = {"train-loss": loss, "num-examples": len(local.split.train), "train-seconds": time.time() - t0}
    return _reply(message, local, metrics, ArrayRecord(adapter.state_dict()))


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy on val, test and all of this domain's images, with the global adapter or zero-shot."""
    local = load_local_data(context)
    zero_shot = bool(message.content["config"].get("zero-shot", False))
    adapter = None if zero_shot else _adapter(local, message.content["arrays"])
    metrics: dict = {"num-examples": len(local.feats.labels)}
    splits = {"val": local.split.val, "test": local.split.test, "all": torch.arange(len(local.feats.labels))}
    for name, indices in splits.items():
        acc, loss = evaluate_adapter(adapter, local.feats, torch.as_tensor(indices), local.device)
        metrics[f"{name}-acc"], metrics[f"{name}-loss"] = acc, loss
    return _reply(message, local, metrics)
