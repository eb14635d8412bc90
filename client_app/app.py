"""The FedCLIP ClientApp: one domain's images (or a share of them), a frozen CLIP, and the adapter it trains locally."""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from common.config import config_from_run, select_device
from common.data import DomainSplit, ImageSource, client_images, client_name, dataset_domains, split_domain
from common.features import DomainFeatures, domain_features
from common.model import AttentionAdapter, model_name_or_path
from common.train import evaluate_adapter, load_optimizer_state, make_optimizer, optimizer_state, train_adapter

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


def load_local_data(context: Context) -> LocalData:
    """This node's client: node config `domain` (and `shard`), else its simulation partition-id; and its features.

    With k = dataset.clients_per_domain, partition-id p is shard p % k of domain p // k.
    """
    cfg = config_from_run(context.run_config)
    domains = dataset_domains(cfg)
    k = int(cfg.dataset.clients_per_domain)
    if "domain" in context.node_config:
        domain = str(context.node_config["domain"])
        if domain not in domains:
            raise ValueError(f"node-config domain={domain!r} is not a domain of this run; valid: {', '.join(domains)}")
        if k > 1 and "shard" not in context.node_config:
            raise ValueError(f"dataset.clients_per_domain={k}: give this node its share of {domain!r} with node-config shard=0..{k - 1}")
        shard = int(context.node_config.get("shard", 0))
    else:
        partition = int(context.node_config["partition-id"])
        if partition >= len(domains) * k:
            raise ValueError(
                f"partition-id {partition} has no client: the run has {len(domains)} domains ({', '.join(domains)}) "
                f"x {k} client(s) each; run with --federation-config \"num-supernodes={len(domains) * k}\""
            )
        domain, shard = domains[partition // k], partition % k
    device = select_device(str(context.node_config.get("device", cfg.device)))
    images = client_images(cfg, domain, shard)
    feats = domain_features(
        model_name_or_path(cfg), images, cfg.model.prompt, cfg.cache_dir, device, cfg.model.encode_batch_size, cfg.model.dtype
    )
    client = client_name(domain, shard, k)
    split = split_domain(len(feats.labels), list(cfg.dataset.split), cfg.seed, client)
    return LocalData(cfg, domain, client, images, feats, split, device)


def _reply(message: Message, local: LocalData, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord({"domain": local.domain, "client": local.client})})
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
