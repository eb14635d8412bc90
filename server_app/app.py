"""The FedCLIP ServerApp: learn which node holds which domain, then the leave-one-domain-out rounds."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from common.config import config_from_run
from common.model import AttentionAdapter, load_clip, model_name_or_path
from common.train import ENCODER_METHODS, encoder_state
from server_app.report import RunReport
from server_app.strategy import FedClipStrategy

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
log = logging.getLogger(__name__)

app = ServerApp()

QUERY_KEYS = {"feature-dim", "num-images", "num-skipped", "num-train", "num-val", "num-test"}  # what a node reports


def discover_nodes(grid: Grid, cfg: DictConfig) -> tuple[dict[int, str], dict[int, str], dict[str, MetricRecord]]:
    """Ask every connected node which client (domain, or share of one) it holds; nodes encode their features now.

    Returns node -> domain, node -> client name, and client -> what it reported.
    """
    per_domain = int(cfg.dataset.clients_per_domain)
    expected = len(cfg.dataset.domains) * per_domain if cfg.dataset.domains else cfg.strategy.min_available_nodes
    deadline = time.time() + cfg.strategy.round_timeout
    while len(node_ids := list(grid.get_node_ids())) < expected and time.time() < deadline:
        log.info("waiting for nodes: %d connected, %d expected", len(node_ids), expected)
        time.sleep(2)
    log.info("asking %d node(s) for their data; each encodes its images once with the frozen CLIP", len(node_ids))
    queries = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    node_domains, node_clients, info = {}, {}, {}
    for reply in grid.send_and_receive(queries, timeout=cfg.strategy.round_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.error("node %d left out: its query failed: %s", node, reply.error.reason)
            continue
        content = reply.content
        if "info" not in content.config_records or "metrics" not in content.metric_records or not QUERY_KEYS <= set(content["metrics"]):
            log.error("node %d left out: its query reply lacks 'info' or the metrics %s", node, sorted(QUERY_KEYS))
            continue
        domain = str(content["info"].get("domain"))
        client = str(content["info"].get("client", domain))
        if client in info:
            log.error("node %d left out: client %r is already held by another node", node, client)
            continue
        node_domains[node], node_clients[node], info[client] = domain, client, content["metrics"]
        m = info[client]
        log.info("node %d holds %r: %d images (%d unreadable skipped), split %d/%d/%d%s", node, client, m["num-images"],
                 m["num-skipped"], m["num-train"], m["num-val"], m["num-test"], "  [held out]" if domain == cfg.dataset.held_out else "")
    if not any(d != cfg.dataset.held_out for d in node_domains.values()):
        raise RuntimeError(f"no node holds a training domain (nodes answered with {sorted(info)}); nothing can train")
    if cfg.dataset.held_out not in node_domains.values():
        log.warning("no node holds the held-out domain %r: generalization is not measured", cfg.dataset.held_out)
    return node_domains, node_clients, info


METHODS = ("fedclip", "zero_shot", "local", "centralized", "fedavg", "fedprox")


def initial_weights(cfg: DictConfig, feature_dim: int) -> dict[str, torch.Tensor]:
    """What the run trains, as first sent: a seeded new adapter, or the CLIP's own image encoder."""
    if cfg.method.name in ENCODER_METHODS:
        model, _ = load_clip(model_name_or_path(cfg), torch.device("cpu"))
        return encoder_state(model)
    torch.manual_seed(cfg.seed)
    return AttentionAdapter(feature_dim).state_dict()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run(context.run_config)
    method = cfg.method.name
    if method not in METHODS:
        raise ValueError(f"method.name={method!r} is not a method of this app; choose one of {', '.join(METHODS)} (override method=NAME)")
    node_domains, node_clients, info = discover_nodes(grid, cfg)
    dims = {int(m["feature-dim"]) for m in info.values()}
    if len(dims) != 1:
        raise RuntimeError(f"nodes report different CLIP feature sizes {sorted(dims)}: every node must use the same CLIP")

    weights = initial_weights(cfg, dims.pop())
    arrays = ArrayRecord(weights)
    template = {k: v.numpy() for k, v in arrays.items()}
    strategy = FedClipStrategy(node_domains, cfg.dataset.held_out, template, cfg.strategy.weighting, cfg.strategy.min_train_nodes, method,
                               node_clients)
    strategy.summary()
    trained = 0 if method == "zero_shot" else sum(v.numel() for v in weights.values())
    client_domains = {node_clients[n]: d for n, d in node_domains.items()}
    report = RunReport(cfg, client_domains, [node_clients[n] for n in strategy.train_nodes], trained)
    report.images_encoded += sum(int(m.get("images-encoded", 0)) for m in info.values())
    saved = lambda a: None if method == "local" else a  # noqa: E731 - local-only has no global weights to save

    def exchange(messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        replies = list(grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout))
        report.count_traffic(node_clients, messages, replies)
        return replies

    t0 = time.time()
    replies = exchange(strategy.configure_evaluate(0, ArrayRecord(), ConfigRecord({"zero-shot": True}), grid))
    report.add_round(0, MetricRecord(), strategy.aggregate_evaluate(0, replies), time.time() - t0, None)

    for server_round in range(1, 0 if method == "zero_shot" else cfg.training.rounds + 1):
        t0 = time.time()
        new_arrays, train_metrics = strategy.aggregate_train(server_round, exchange(strategy.configure_train(server_round, arrays, ConfigRecord(), grid)))
        if new_arrays is not None:
            arrays = new_arrays
        replies = exchange(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
        report.add_round(server_round, train_metrics, strategy.aggregate_evaluate(server_round, replies), time.time() - t0, saved(arrays))

    report.finish(saved(arrays))
