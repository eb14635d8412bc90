"""The FedCLIP ClientApp: one domain's images (or a share of them), a frozen CLIP, and the adapter it trains locally."""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf

from client_app.clipping import dp_clipping_mod
from common.config import config_from_run, select_device
from common.data import DomainSplit, ImageSource, client_images, client_name, dataset_domains, split_domain
from common.features import DomainFeatures, domain_features, encode_images, images_encoded
from common.model import AttentionAdapter, load_clip, model_name_or_path
from common.transport import decode, encode
from common.train import (
    ENCODER_METHODS,
    encoder_state,
    evaluate_adapter,
    finetune_encoder,
    load_encoder_state,
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
    train_adapter,
)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
log = logging.getLogger(__name__)

app = ClientApp()


@dataclass
class LocalData:
    """What a client holds: its images (a domain, or its share of one), their cached features and split."""

    cfg: DictConfig
    domain: str
    client: str  # the domain, or "<domain>#<shard>" when dataset.clients_per_domain > 1
    images: ImageSource
    feats: DomainFeatures
    split: DomainSplit
    device: torch.device

    @property
    def held_out(self) -> bool:
        return self.domain == self.cfg.dataset.held_out


# What a SuperNode may say about itself with `flower-supernode --node-config`; Flower's simulation
# sets partition-id and num-partitions.
NODE_CONFIG_KEYS = {"domain", "shard", "data-dir", "cache-dir", "device", "cpu-threads", "partition-id", "num-partitions"}


def apply_node_config(cfg: DictConfig, node_config: Mapping) -> DictConfig:
    """The run's configuration as this node sees it: its data folder, cache and device win.

    `data-dir` (a folder DATA_DIR/<domain>/<class>/<image>, or `demo`) replaces dataset.root,
    `cache-dir` replaces cache_dir (features, the built demo), `device` replaces device, and
    `cpu-threads` replaces cpu_threads (set it when several SuperNodes share one machine).
    """
    unknown = sorted(set(node_config) - NODE_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"unknown --node-config key(s) {unknown}; a FedCLIP SuperNode takes domain, shard, data-dir, cache-dir, device and cpu-threads, "
            "e.g. --node-config \"domain='photo' data-dir='/data' cache-dir='/cache' device='cuda:0'\""
        )
    if "data-dir" in node_config:
        cfg.dataset.root = str(node_config["data-dir"])
    if "cache-dir" in node_config:
        cfg.cache_dir = cfg.demo.cache_dir = str(Path(str(node_config["cache-dir"])).expanduser())
    if "device" in node_config:
        cfg.device = str(node_config["device"])
    if "cpu-threads" in node_config:
        cfg.cpu_threads = int(node_config["cpu-threads"])
    return cfg


def load_local_data(context: Context) -> LocalData:
    """This node's client: node config `domain` (and `shard`), else its simulation partition-id; and its features.

    With k = dataset.clients_per_domain, partition-id p is shard p % k of domain p // k. A deployed
    node (node config `domain`) may hold only its own domain's images.
    """
    cfg = apply_node_config(config_from_run(context.run_config), context.node_config)
    if cfg.cpu_threads:  # several client processes on one machine each take every core by default: far slower together
        torch.set_num_threads(int(cfg.cpu_threads))
    k = int(cfg.dataset.clients_per_domain)
    device = select_device(cfg.device)
    if "domain" in context.node_config:
        domain = str(context.node_config["domain"])
        if k > 1 and "shard" not in context.node_config:
            raise ValueError(f"dataset.clients_per_domain={k}: give this node its share of {domain!r} with node-config shard=0..{k - 1}")
        return client_data(cfg, domain, int(context.node_config.get("shard", 0)), device, own_only=True)
    domains = dataset_domains(cfg)
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode does not say which data it holds: start it with --node-config \"domain='<domain>' data-dir='DATA_DIR'\"")
    partition = int(context.node_config["partition-id"])
    if partition >= len(domains) * k:
        raise ValueError(
            f"partition-id {partition} has no client: the run has {len(domains)} domains ({', '.join(domains)}) "
            f"x {k} client(s) each; run with --federation-config \"num-supernodes={len(domains) * k}\""
        )
    return client_data(cfg, domains[partition // k], partition % k, device)


def client_data(cfg: DictConfig, domain: str, shard: int, device: torch.device, own_only: bool = False) -> LocalData:
    """One client's images, their frozen features (cached) and its seeded split."""
    images = client_images(cfg, domain, shard, own_only)
    feats = domain_features(
        model_name_or_path(cfg), images, cfg.model.prompt, cfg.cache_dir, device, cfg.model.encode_batch_size, cfg.model.dtype
    )
    client = client_name(domain, shard, int(cfg.dataset.clients_per_domain))
    split = split_domain(len(feats.labels), list(cfg.dataset.split), cfg.seed, client)
    return LocalData(cfg, domain, client, images, feats, split, device)


def pooled_train_data(local: LocalData) -> tuple[DomainFeatures, torch.Tensor]:
    """method=centralized: the train splits of every training client pooled, with their features."""
    cfg, k = local.cfg, int(local.cfg.dataset.clients_per_domain)
    parts = []
    for domain in dataset_domains(cfg):
        for shard in range(k) if domain != cfg.dataset.held_out else []:
            try:
                other = local if client_name(domain, shard, k) == local.client else client_data(cfg, domain, shard, local.device)
            except (OSError, ValueError) as err:
                raise RuntimeError(f"method=centralized pools every training client's data on one node, but this node cannot read "
                                   f"{client_name(domain, shard, k)!r} ({err}); it is an upper bound for simulation, where all data is local") from err
            parts.append((other.feats.image[other.split.train], other.feats.labels[other.split.train]))
    image, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    pooled = DomainFeatures(image, labels, local.feats.text, local.feats.logit_scale, [])
    return pooled, torch.arange(len(labels))


def _reply(message: Message, local: LocalData, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    info = ConfigRecord({"domain": local.domain, "client": local.client, "classes": local.images.classes})
    content = RecordDict({"metrics": MetricRecord(metrics), "info": info})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=message)


def _adapter(local: LocalData, arrays: ArrayRecord) -> AttentionAdapter:
    adapter = AttentionAdapter(local.feats.image.shape[1]).to(local.device)
    adapter.load_state_dict(decode(arrays))  # float32, whatever strategy.transport_dtype it travelled in
    return adapter


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which domain this node holds and how much data; encodes the features once."""
    before = images_encoded()
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
            "images-encoded": images_encoded() - before,  # 0 when the features came from the cache
        },
    )


def _generator(local: LocalData, server_round: int, purpose: str) -> torch.Generator:
    """A seeded generator per client, round and purpose, so runs repeat exactly."""
    return torch.Generator().manual_seed(zlib.crc32(f"{local.cfg.seed}/{local.client}/{server_round}/{purpose}".encode()))


def _file_indices(local: LocalData, rows: np.ndarray) -> torch.Tensor:
    """Indices into the image files of feature rows (unreadable files have no row)."""
    skipped = set(local.feats.skipped)
    readable = [i for i in range(len(local.images)) if local.images.name(i) not in skipped]
    return torch.as_tensor([readable[r] for r in rows])


def _encoder_clip(local: LocalData, arrays: ArrayRecord):
    """This node's CLIP with the received image-encoder weights (the FedAvg/FedProx baselines)."""
    model, processor = load_clip(model_name_or_path(local.cfg), local.device)
    load_encoder_state(model, arrays.to_torch_state_dict())
    return model, processor


@app.train(mods=[dp_clipping_mod])  # Flower's client-side DP clipping, when the server asks for it
def train(message: Message, context: Context) -> Message:
    """Local training from the received weights: the adapter on cached features, or the image encoder."""
    local = load_local_data(context)
    if local.held_out:
        raise RuntimeError(f"domain {local.domain!r} is held out and must never train")
    cfg = local.cfg
    server_round = int(message.content["config"]["server-round"])
    generator = _generator(local, server_round, "train")
    t0 = time.time()
    if cfg.method.name in ENCODER_METHODS:
        model, processor = _encoder_clip(local, message.content["arrays"])
        train_files = _file_indices(local, local.split.train)
        loss = finetune_encoder(model, processor, local.images, train_files, local.feats.text, cfg, generator)
        arrays, encoded, examples = ArrayRecord(encoder_state(model)), len(train_files) * cfg.training.local_epochs, len(train_files)
    else:
        feats, rows = pooled_train_data(local) if cfg.method.name == "centralized" else (local.feats, torch.as_tensor(local.split.train))
        adapter = _adapter(local, message.content["arrays"])
        optimizer = make_optimizer(adapter, cfg.training)
        if "optimizer" in context.state:
            load_optimizer_state(optimizer, context.state["optimizer"].to_torch_state_dict())
        loss = train_adapter(adapter, optimizer, feats, rows, cfg.training, generator)
        context.state["optimizer"] = ArrayRecord(optimizer_state(optimizer))
        arrays, encoded, examples = encode(adapter.state_dict(), cfg.strategy.transport_dtype), 0, len(rows)
    metrics = {"train-loss": loss, "num-examples": examples, "train-seconds": time.time() - t0, "images-encoded": encoded}
    return _reply(message, local, metrics, arrays)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy on val, test and all of this domain's images, zero-shot or with the received weights.

    Several adapters in one message (local-only baseline, held-out node) are each evaluated and
    their accuracies averaged. With method.personalize_epochs > 0 a training client also reports
    `personalized-test-acc`: its test accuracy after fine-tuning the received adapter locally.
    """
    local = load_local_data(context)
    cfg, content = local.cfg, message.content
    server_round = int(content["config"].get("server-round", 0))
    feats, adapters, encoded = local.feats, [None], 0
    if not content["config"].get("zero-shot", False):
        if cfg.method.name in ENCODER_METHODS:
            model, processor = _encoder_clip(local, content["arrays"])  # the images again: the encoder changed
            before = images_encoded()
            image, labels, skipped = encode_images(model, processor, local.images, local.device, cfg.model.encode_batch_size)
            encoded = images_encoded() - before
            feats = DomainFeatures(image, labels, local.feats.text, local.feats.logit_scale, skipped)  # the text tower is frozen
        else:
            adapters = [_adapter(local, record) for record in content.array_records.values()]
    metrics: dict = {"num-all": len(local.feats.labels), "num-val": len(local.split.val), "num-test": len(local.split.test),
                     "num-examples": len(local.feats.labels), "images-encoded": encoded}
    splits = {"val": local.split.val, "test": local.split.test, "all": np.arange(len(local.feats.labels))}
    for name, indices in splits.items():
        if len(indices) == 0:  # a small client's split can be empty: it reports nothing for it
            continue
        results = [evaluate_adapter(adapter, feats, torch.as_tensor(indices), local.device) for adapter in adapters]
        metrics[f"{name}-acc"] = sum(acc for acc, _ in results) / len(results)
        metrics[f"{name}-loss"] = sum(loss for _, loss in results) / len(results)
    if cfg.method.get("personalize_epochs", 0) > 0 and not local.held_out and adapters[0] is not None:
        adapter = adapters[0]
        optimizer = make_optimizer(adapter, cfg.training)
        personal = OmegaConf.merge(cfg.training, {"local_epochs": cfg.method.personalize_epochs})
        train_adapter(adapter, optimizer, feats, torch.as_tensor(local.split.train), personal, _generator(local, server_round, "personalize"))
        metrics["personalized-test-acc"] = evaluate_adapter(adapter, feats, torch.as_tensor(local.split.test), local.device)[0]
    return _reply(message, local, metrics)
