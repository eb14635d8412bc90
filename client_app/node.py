"""Which client a SuperNode holds, and its local data kept for every later message this process handles.

A node says what it holds with `flower-supernode --node-config` (a deployment) or through Flower's
simulation partition id; the local data (common/local_data.py) is built on a run's first message and
reused until the run, the configuration, the node config or the image files change.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import Context, Message
from omegaconf import DictConfig, OmegaConf

from common import wire
from common.config import CONF_DIR, MACHINE_ENV, config_from_message, select_device, shared_message_config
from common.data import dataset_domains
from common.fingerprint import app_code_fingerprint
from common.local_data import LocalData, client_data

log = logging.getLogger(__name__)


class NoClient(Exception):
    """This node holds no client of the run (more SuperNodes than clients): it sits the run out."""


class NodeUnusable(Exception):
    """This node cannot take part as the run asks: the run's configuration was refused, or its data, folder or CLIP is
    unusable. The handler replies with the reason instead of raising, so the server reports one line for every node that
    failed alike, and no traceback is printed per node and round."""


# What a SuperNode may say about itself with `flower-supernode --node-config`; Flower's simulation
# sets partition-id and num-partitions.
NODE_CONFIG_KEYS = {
    "domain",
    "shard",
    "data-dir",
    "cache-dir",
    "output-dir",
    "device",
    "cpu-threads",
    "partition-id",
    "num-partitions",
}
SITE_KEYS = ("device", "cpu_threads", "cache_dir", "output_dir")  # with dataset.root: a site's own, never the run's
# this process's clients: by run and configuration, then by node config (a Ray actor serves many clients of a run)
_LOCAL: dict[tuple, dict[tuple, LocalData]] = {}
# runs (configurations) kept at most: a server that sends a new configuration with every message cannot fill the site's
# memory. A run's clients are all kept: as many as the nodes this process serves, which the site's side decides
KEPT = 4


def site_defaults() -> dict[str, object]:
    """A site's own device, CPU threads, cache and output folder when its node config does not set them: this
    installation's
    conf/config.yaml, its FEDCLIP_CACHE/FEDCLIP_OUTPUTS winning. Never the run's."""
    own = OmegaConf.load(CONF_DIR / "config.yaml")
    return {key: own[key] for key in SITE_KEYS} | {
        key: os.environ[name] for key, name in MACHINE_ENV if os.environ.get(name)
    }


def apply_node_config(cfg: DictConfig, node_config: Mapping) -> DictConfig:
    """The run's configuration as this node runs it: `data-dir` replaces dataset.root, `cache-dir` cache_dir
    (features, the
    built demo), `device` device and `cpu-threads` cpu_threads (set it when several SuperNodes share one machine).

    A site (its node config names its `domain`: a deployment) takes none of these, nor output_dir, from the run:
    what its
    node config does not set comes from site_defaults, and it must name its data folder. A node of Flower's simulation
    (partition-id) runs on the machine that started the run, and takes the run's.
    """
    unknown = sorted(set(node_config) - NODE_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"unknown --node-config key(s) {unknown}; a FedCLIP SuperNode takes domain, shard, data-dir, cache-dir, "
            f"output-dir, device and cpu-threads, "
            "e.g. --node-config \"domain='photo' data-dir='/data' cache-dir='/cache' device='cuda:0'\""
        )
    if "domain" in node_config:
        if "data-dir" not in node_config:
            raise ValueError(
                "this site names its domain but not its data folder: start its SuperNode with --node-config "
                "\"domain='<domain>' data-dir='DATA_DIR'\" (DATA_DIR/<domain>/<class>/<image>, or 'demo'); a site "
                "never takes its data folder from the run"
            )
        cfg.update(site_defaults())
        cfg.demo.cache_dir = cfg.cache_dir
    if "data-dir" in node_config:
        cfg.dataset.root = str(node_config["data-dir"])
    if "cache-dir" in node_config:
        cfg.cache_dir = cfg.demo.cache_dir = str(Path(str(node_config["cache-dir"])).expanduser())
    if "output-dir" in node_config:
        cfg.output_dir = str(Path(str(node_config["output-dir"])).expanduser())
    if "device" in node_config:
        cfg.device = str(node_config["device"])
    if "cpu-threads" in node_config:
        cfg.cpu_threads = int(node_config["cpu-threads"])
    return cfg


def without_site_values(text: str, node_config: Mapping) -> str:
    """A site's error text as it goes to the server: its own folders named by their key (`<data-dir>`), not given.
    A node of Flower's simulation runs on the machine that started the run: its text goes as it is."""
    if "domain" not in node_config:
        return text
    values = [
        (str(node_config[key]), f"<{key}>") for key in ("data-dir", "cache-dir", "output-dir") if key in node_config
    ]
    values += [(os.environ[name], f"<{name}>") for _, name in MACHINE_ENV if os.environ.get(name)]
    values += [(str(Path(value).expanduser()), name) for value, name in values] + [(str(Path.home()), "~")]
    for value, name in sorted(values, key=lambda pair: -len(pair[0])):  # the longest first: a folder before its parent
        if len(value) > 1:
            text = text.replace(value, name)
    return text


def refuse_other_code(run_code: object) -> None:
    """NodeUnusable unless the run's code (the server's hash of it) is this node's: a Ray worker imports the app
    installed on its machine, not the run's FAB, and a different version would train something else silently."""
    own = app_code_fingerprint()
    if run_code != own:
        raise NodeUnusable(
            f"this node's app code ({own[:12]}) is not the run's ({str(run_code)[:12]}): install the "
            "run's version of the app on this node (on a Ray cluster, on every node the same as where `flwr run` "
            "starts, docs/scale.md)"
        )


def local_data(message: Message, context: Context) -> LocalData:
    """This node's client for the message's run: built on the first message, then reused.

    The key holds the run, the configuration the server sent and the node config, so another run or
    node never sees stale data; added, removed or renamed image files make it build again.
    """
    if wire.RUN_CONFIG not in message.content.config_records.get(wire.CONFIG, {}):
        raise ValueError(
            "the message carries no 'run-config': the ServerApp of this run is not FedCLIP's, or older than this "
            "ClientApp"
        )
    refuse_other_code(message.content[wire.CONFIG].get(wire.APP_CODE))
    run_config = str(message.content[wire.CONFIG][wire.RUN_CONFIG])
    run, node = (context.run_id, run_config), tuple(sorted((k, str(v)) for k, v in context.node_config.items()))
    local = _LOCAL.get(run, {}).get(node)
    if local is None or local.changed():
        try:
            # a simulation's node (partition-id only) runs the run's configuration as it is: one object for all
            shared = set(context.node_config) <= {"partition-id", "num-partitions"}
            cfg = shared_message_config(run_config) if shared else config_from_message(run_config)
            local = load_local_data(cfg, context.node_config)
            _LOCAL.setdefault(run, {})[node] = local
            while len(_LOCAL) > KEPT:
                _LOCAL.pop(next(iter(_LOCAL)))  # the oldest run
        except (ValueError, OSError, RuntimeError) as err:  # ConfigError is a ValueError; a missing folder an OSError
            # a site's log says it; simulated nodes leave it to the server's one line
            site = "domain" in context.node_config
            log.log(
                logging.WARNING if site else logging.DEBUG,
                "this node cannot take part in run %s: %s: %s",
                context.run_id,
                type(err).__name__,
                err,
            )
            raise NodeUnusable(without_site_values(f"{type(err).__name__}: {err}", context.node_config)) from err
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
            raise ValueError(
                f"dataset.clients_per_domain={k}: give this node its share of {domain!r} with node-config "
                f"shard=0..{k - 1}"
            )
        return client_data(cfg, domain, int(node_config.get("shard", 0)), device, own_only=True)
    if "partition-id" not in node_config:
        raise ValueError(
            "this SuperNode does not say which data it holds: start it with --node-config \"domain='<domain>' "
            "data-dir='DATA_DIR'\""
        )
    domains = dataset_domains(cfg)
    partition = int(node_config["partition-id"])
    if partition >= len(domains) * k:
        raise NoClient(
            f"partition-id {partition}: the run has {len(domains) * k} clients ({len(domains)} domains x {k})"
        )
    return client_data(cfg, domains[partition // k], partition % k, device)
