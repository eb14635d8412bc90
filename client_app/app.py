"""The FedCLIP ClientApp: one domain's images (or a share of them), a frozen CLIP, and the adapter it trains locally.

A client builds its world (configuration, images, cached features, split) on a run's first message and
reuses it for every later message this process handles. One message a round does the work: a train
message also carries the evaluation of the adapter it brings (the last round's global one).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf

from client_app.clipping import dp_clipping_mod
from client_app.secagg import secagg_mod
from common.config import local_config, select_device, setup_logging
from common.data import DomainFolder, DomainSplit, ImageSource, client_images, client_name, dataset_domains, split_domain
from common.features import DomainFeatures, domain_features, encode_images, images_encoded, model_files_fingerprint
from common.model import AttentionAdapter, load_clip, model_name_or_path
from common.transport import EVALUATION_PREFIX, decode, encode
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

setup_logging()
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
    folders: dict[Path, int] = field(default_factory=dict)  # the image folders and their mtimes when built
    pooled: tuple[DomainFeatures, torch.Tensor] | None = None  # method=centralized: every training client's train split
    clip: tuple | None = None  # fedavg/fedprox: this node's CLIP (model, processor), loaded once

    @property
    def held_out(self) -> bool:
        return self.domain == self.cfg.dataset.held_out

    def changed(self) -> bool:
        """Whether image files were added, removed or renamed since it was built (a few stat calls)."""
        return any(_mtime(folder) != mtime for folder, mtime in self.folders.items())


class NoClient(Exception):
    """This node holds no client of the run (more SuperNodes than clients): it sits the run out."""


# What a SuperNode may say about itself with `flower-supernode --node-config`; Flower's simulation
# sets partition-id and num-partitions.
NODE_CONFIG_KEYS = {"domain", "shard", "data-dir", "cache-dir", "device", "cpu-threads", "partition-id", "num-partitions"}
_WORLDS: dict[tuple, LocalData] = {}  # this process's clients, by run, configuration and node


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


def local_data(message: Message, context: Context) -> LocalData:
    """This node's client for the message's run: built on the first message, then reused.

    The key holds the run, the configuration the server sent and the node config, so another run or
    node never sees a stale world; added, removed or renamed image files make it build again.
    """
    if "run-config" not in message.content.config_records.get("config", {}):
        raise ValueError("the message carries no 'run-config': the ServerApp of this run is not FedCLIP's, or older than this ClientApp")
    run_config = str(message.content["config"]["run-config"])
    key = (context.run_id, run_config, tuple(sorted((k, str(v)) for k, v in context.node_config.items())))
    local = _WORLDS.get(key)
    if local is None or local.changed():
        local = _WORLDS[key] = load_local_data(local_config(run_config), context.node_config)
    return local


def load_local_data(cfg: DictConfig, node_config: Mapping) -> LocalData:
    """This node's client: node config `domain` (and `shard`), else its simulation partition-id; and its features.

    With k = dataset.clients_per_domain, partition-id p is shard p % k of domain p // k. A deployed
    node (node config `domain`) may hold only its own domain's images. Raises NoClient for a
    partition-id beyond the run's clients.
    """
    cfg = apply_node_config(cfg, node_config)
    if cfg.cpu_threads:  # several client processes on one machine each take every core by default: far slower together
        torch.set_num_threads(int(cfg.cpu_threads))
    k = int(cfg.dataset.clients_per_domain)
    device = select_device(cfg.device)
    if "domain" in node_config:
        domain = str(node_config["domain"])
        if k > 1 and "shard" not in node_config:
            raise ValueError(f"dataset.clients_per_domain={k}: give this node its share of {domain!r} with node-config shard=0..{k - 1}")
        return client_data(cfg, domain, int(node_config.get("shard", 0)), device, own_only=True)
    if "partition-id" not in node_config:
        raise ValueError("this SuperNode does not say which data it holds: start it with --node-config \"domain='<domain>' data-dir='DATA_DIR'\"")
    domains = dataset_domains(cfg)
    partition = int(node_config["partition-id"])
    if partition >= len(domains) * k:
        raise NoClient(f"partition-id {partition}: the run has {len(domains) * k} clients ({len(domains)} domains x {k})")
    return client_data(cfg, domains[partition // k], partition % k, device)


def _mtime(folder: Path) -> int:
    try:
        return folder.stat().st_mtime_ns
    except OSError:
        return -1


def client_data(cfg: DictConfig, domain: str, shard: int, device: torch.device, own_only: bool = False) -> LocalData:
    """One client's images, their frozen features (cached) and its seeded split."""
    images = client_images(cfg, domain, shard, own_only)
    folders = {p.parent for p in images.paths} | {p.parent.parent for p in images.paths} if isinstance(images, DomainFolder) else set()
    stamp = {folder: _mtime(folder) for folder in folders}  # before the listing is used: a change during the build is seen next time
    feats = domain_features(
        model_name_or_path(cfg), images, cfg.model.prompt, cfg.cache_dir, device, cfg.model.encode_batch_size, cfg.model.dtype
    )
    client = client_name(domain, shard, int(cfg.dataset.clients_per_domain))
    split = split_domain(len(feats.labels), list(cfg.dataset.split), cfg.seed, client)
    return LocalData(cfg, domain, client, images, feats, split, device, stamp)


def pooled_train_data(local: LocalData) -> tuple[DomainFeatures, torch.Tensor]:
    """method=centralized: the train splits of every training client pooled, with their features (built once)."""
    if local.pooled is not None:
        return local.pooled
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
    local.pooled = DomainFeatures(image, labels, local.feats.text, local.feats.logit_scale, []), torch.arange(len(labels))
    return local.pooled


def _reply(message: Message, local: LocalData, records: dict) -> Message:
    info = ConfigRecord({"domain": local.domain, "client": local.client, "classes": local.images.classes})
    return Message(content=RecordDict({**records, "info": info}), reply_to=message)


def _adapter(local: LocalData, arrays: ArrayRecord) -> AttentionAdapter:
    adapter = AttentionAdapter(local.feats.image.shape[1]).to(local.device)
    adapter.load_state_dict(decode(arrays))  # float32, whatever strategy.transport_dtype it travelled in
    return adapter


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which domain this node holds and how much data; encodes the features once.

    A node with no client in this run says so (`idle`), and the server leaves it alone.
    """
    before = images_encoded()
    try:
        local = local_data(message, context)
    except NoClient as idle:
        return Message(content=RecordDict({"info": ConfigRecord({"idle": f"no data in this run: {idle}"})}), reply_to=message)
    metrics = {
        "feature-dim": local.feats.image.shape[1],
        "num-images": len(local.feats.labels),
        "num-skipped": len(local.feats.skipped),
        "num-train": len(local.split.train),
        "num-val": len(local.split.val),
        "num-test": len(local.split.test),
        "images-encoded": images_encoded() - before,  # 0 when the features came from the cache
    }
    reply = _reply(message, local, {"metrics": MetricRecord(metrics)})
    reply.content["info"]["model-fingerprint"] = model_files_fingerprint(model_name_or_path(local.cfg), local.cfg.cache_dir)
    return reply


def _generator(local: LocalData, server_round: int, purpose: str) -> torch.Generator:
    """A seeded generator per client, round and purpose, so runs repeat exactly."""
    return torch.Generator().manual_seed(zlib.crc32(f"{local.cfg.seed}/{local.client}/{server_round}/{purpose}".encode()))


def _file_indices(local: LocalData, rows: np.ndarray) -> torch.Tensor:
    """Indices into the image files of feature rows (unreadable files have no row)."""
    skipped = set(local.feats.skipped)
    readable = [i for i in range(len(local.images)) if local.images.name(i) not in skipped]
    return torch.as_tensor([readable[r] for r in rows])


def _encoder_clip(local: LocalData, arrays: ArrayRecord):
    """This node's CLIP (loaded once) with the received image-encoder weights (the FedAvg/FedProx baselines)."""
    if local.clip is None:
        local.clip = load_clip(model_name_or_path(local.cfg), local.device)
    model, processor = local.clip
    load_encoder_state(model, arrays.to_torch_state_dict())
    return model, processor


def evaluate_received(local: LocalData, content: RecordDict, server_round: int, zero_shot: bool) -> dict:
    """Accuracy on val, test and all of this domain's images, zero-shot or with the received weights.

    Several adapters in one message (local-only baseline, held-out node) are each evaluated and
    their accuracies averaged. With method.personalize_epochs > 0 a training client also reports
    `personalized-test-acc`: its test accuracy after fine-tuning the received adapter locally.
    """
    cfg = local.cfg
    feats, adapters, encoded = local.feats, [None], 0
    if not zero_shot:
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
    splits = {name: indices for name, indices in (("val", local.split.val), ("test", local.split.test), ("all", np.arange(len(local.feats.labels))))
              if len(indices) > 0}  # a small client's split can be empty: it reports nothing for it
    results = [evaluate_adapter(adapter, feats, splits, local.device) for adapter in adapters]
    for name in splits:
        metrics[f"{name}-acc"] = sum(r[name][0] for r in results) / len(results)
        metrics[f"{name}-loss"] = sum(r[name][1] for r in results) / len(results)
    if cfg.method.get("personalize_epochs", 0) > 0 and not local.held_out and adapters[0] is not None:
        adapter = adapters[0]
        optimizer = make_optimizer(adapter, cfg.training)
        personal = OmegaConf.merge(cfg.training, {"local_epochs": cfg.method.personalize_epochs})
        train_adapter(adapter, optimizer, feats, torch.as_tensor(local.split.train), personal, _generator(local, server_round, "personalize"))
        metrics["personalized-test-acc"] = evaluate_adapter(adapter, feats, {"test": local.split.test}, local.device)["test"][0]
    return metrics


@app.train(mods=[secagg_mod, dp_clipping_mod])  # Flower's SecAgg+ and client-side DP clipping, when the server asks for them
def train(message: Message, context: Context) -> Message:
    """Evaluate the received weights if asked (config `evaluate-round`), then train from them locally.

    The weights a round-r train message brings are round r-1's global ones, so their evaluation rides
    along: one exchange per round. The adapter trains on cached features; fedavg/fedprox train the image encoder.
    """
    local = local_data(message, context)
    if local.held_out:
        raise RuntimeError(f"domain {local.domain!r} is held out and must never train")
    cfg, config = local.cfg, message.content["config"]
    server_round = int(config["server-round"])
    evaluation = {}
    if "evaluate-round" in config:
        evaluation = evaluate_received(local, message.content, int(config["evaluate-round"]), bool(config.get("zero-shot", False)))
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
    metrics = {"train-loss": loss, "num-examples": examples, "train-seconds": time.time() - t0, "images-encoded": encoded,
               **{EVALUATION_PREFIX + key: value for key, value in evaluation.items()}}
    return _reply(message, local, {"metrics": MetricRecord(metrics), "arrays": arrays})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluation only: the held-out nodes, clients that do not train this round, and the run's last evaluation."""
    local = local_data(message, context)
    config = message.content["config"]
    metrics = evaluate_received(local, message.content, int(config.get("server-round", 0)), bool(config.get("zero-shot", False)))
    return _reply(message, local, {"metrics": MetricRecord(metrics)})
