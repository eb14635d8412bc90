"""The FedCLIP ServerApp: learn which node holds which domain, then the leave-one-domain-out rounds."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from common.config import compose_config, local_config, setup_logging
from common.model import AttentionAdapter, load_clip, model_name_or_path
from common.train import ENCODER_METHODS, encoder_state
from server_app.checkpoint import resume_run, save_checkpoint
from server_app.privacy import with_privacy
from server_app.report import RunReport
from server_app.secagg import secure_exchange
from server_app.strategy import FedClipStrategy, trust_options

setup_logging()
log = logging.getLogger(__name__)

app = ServerApp()

POLL_SECONDS = (0.002, 0.05)  # the server asks the SuperLink for replies after 2 ms, then twice as long each time, at most every 50 ms
QUERY_KEYS = {"feature-dim", "num-images", "num-skipped", "num-train", "num-val", "num-test"}  # what a node reports


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, node_clients: dict[int, str]) -> list[Message]:
    """Send messages and collect the replies, naming the nodes lost on the way; only the nodes' own replies return.

    For a node that stopped sending heartbeats the SuperLink answers itself, with an error from its
    own id, so replies are matched to nodes by message id; a node with no reply at all by the
    timeout is logged too. Replies are polled with a backoff (POLL_SECONDS): a round whose work takes
    milliseconds waits milliseconds, a long one costs a poll every 50 ms (Flower's gRPC
    send_and_receive waits 3 s between polls).
    """
    messages = list(messages)
    pending = {i for i in grid.push_messages(messages) if i is not None}  # None: not pushed (Flower logs why)
    replies, deadline, wait = [], time.time() + timeout, POLL_SECONDS[0]
    while pending and time.time() < deadline:
        new = list(grid.pull_messages(pending))
        pending -= {r.metadata.reply_to_message_id for r in new}
        replies += new
        if pending:
            time.sleep(wait)
            wait = min(2 * wait, POLL_SECONDS[1])
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when pushed
    answered, kept = set(), []
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        answered.add(node)
        if node != reply.metadata.src_node_id and reply.has_error():
            log.warning("node %d (%s) lost: %s", node, node_clients.get(node, "data not known yet"), reply.error.reason)
        else:
            kept.append(reply)
    for node in sorted({m.metadata.dst_node_id for m in messages} - answered):
        log.warning("node %d (%s) sent no reply within %ss: lost for this round", node, node_clients.get(node, "data not known yet"), timeout)
    return kept


def query_nodes(grid: Grid, cfg: DictConfig, node_ids: list[int], run_config: str, idle: set[int]) -> list[tuple[int, str, str, list[str], MetricRecord, str]]:
    """Ask nodes which client (domain, or share of one), classes and CLIP (its files' fingerprint) they hold; malformed answers and
    failures are logged and left out.

    A node that holds no client of the run (more SuperNodes than clients) is logged once and added to `idle`.
    """
    queries = [Message(RecordDict({"config": ConfigRecord({"run-config": run_config})}), dst_node_id=n, message_type=MessageType.QUERY)
               for n in node_ids]
    answers = []
    for reply in exchange(grid, queries, cfg.strategy.round_timeout, {}):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.error("node %d left out: its query failed: %s", node, reply.error.reason)
            continue
        content = reply.content
        if "info" in content.config_records and "idle" in content["info"]:
            idle.add(node)
            log.info("node %d is idle: %s", node, content["info"]["idle"])
            continue
        if "info" not in content.config_records or "metrics" not in content.metric_records or not QUERY_KEYS <= set(content["metrics"]):
            log.error("node %d left out: its query reply lacks 'info' or the metrics %s", node, sorted(QUERY_KEYS))
            continue
        domain = str(content["info"].get("domain"))
        answers.append((node, domain, str(content["info"].get("client", domain)), list(content["info"].get("classes", [])), content["metrics"],
                        str(content["info"].get("model-fingerprint", ""))))
    return answers


def _accept(node: int, client: str, classes: list[str], node_clients: dict[int, str], federation_classes: list[str] | None) -> bool:
    """Whether a node's answer fits the federation: a client no other node holds, the same classes as the others."""
    if client in node_clients.values():
        log.error("node %d left out: client %r is already held by another node", node, client)
        return False
    if federation_classes is not None and classes != federation_classes:
        log.error("node %d left out: its classes %s differ from the federation's %s; every node needs the same class folders",
                  node, classes, federation_classes)
        return False
    return True


def discover_nodes(grid: Grid, cfg: DictConfig, run_config: str, idle: set[int]) -> tuple[dict[int, str], dict[int, str], dict[str, MetricRecord], list[str], str]:
    """Ask every connected node which client it holds (a query message); nodes encode their features now.

    Returns node -> domain, node -> client name, client -> what it reported, the classes and the CLIP's fingerprint.
    """
    expected = len(cfg.dataset.domains) * int(cfg.dataset.clients_per_domain) if cfg.dataset.domains else cfg.strategy.min_available_nodes
    deadline = time.time() + cfg.strategy.round_timeout
    while len(node_ids := list(grid.get_node_ids())) < expected and time.time() < deadline:
        log.info("waiting for nodes: %d connected, %d expected", len(node_ids), expected)
        time.sleep(2)
    log.info("asking %d node(s) for their data; each encodes its images once with the frozen CLIP", len(node_ids))
    node_domains, node_clients, info, federation_classes, fingerprints = {}, {}, {}, None, {}
    for node, domain, client, classes, m, fingerprint in query_nodes(grid, cfg, node_ids, run_config, idle):
        if not _accept(node, client, classes, node_clients, federation_classes):
            continue
        node_domains[node], node_clients[node], info[client], federation_classes, fingerprints[client] = domain, client, m, classes, fingerprint
        log.info("node %d holds %r: %d images (%d unreadable skipped), split %d/%d/%d%s", node, client, m["num-images"],
                 m["num-skipped"], m["num-train"], m["num-val"], m["num-test"], "  [held out]" if domain == cfg.dataset.held_out else "")
    if not any(d != cfg.dataset.held_out for d in node_domains.values()):
        raise RuntimeError(f"no node holds a training domain (nodes answered with {sorted(info)}); nothing can train")
    if cfg.dataset.held_out not in node_domains.values():
        log.warning("no node holds the held-out domain %r: generalization is not measured", cfg.dataset.held_out)
    if len(set(fingerprints.values())) > 1:
        log.warning("nodes hold different copies of the CLIP (files' fingerprints %s); the run folder records the first", fingerprints)
    return node_domains, node_clients, info, federation_classes, next(iter(fingerprints.values()))


def refresh_nodes(grid: Grid, cfg: DictConfig, node_domains: dict[int, str], node_clients: dict[int, str], info: dict[str, MetricRecord],
                  classes: list[str], run_config: str, idle: set[int]) -> None:
    """Before a round: forget nodes that left, and take back a client's node when one (re)connects.

    A restarted SuperNode may come back under a new node id, so every connected node that is not
    in the federation (nor known to be idle) is asked for its data; only clients the run started with are taken back.
    """
    connected = set(grid.get_node_ids())
    for node in [n for n in node_domains if n not in connected]:
        node_domains.pop(node)
        log.warning("node %d (%s) is no longer connected: left out until a node with its data connects", node, node_clients.pop(node))
    new = sorted(connected - set(node_domains) - idle)
    if not new:
        return
    for node, domain, client, node_classes, m, _ in query_nodes(grid, cfg, new, run_config, idle):
        if client not in info:
            log.error("node %d left out: client %r was not in this run when it started", node, client)
        elif m["feature-dim"] != info[client]["feature-dim"]:
            log.error("node %d left out: its CLIP gives %d features, the run's %d", node, m["feature-dim"], info[client]["feature-dim"])
        elif _accept(node, client, node_classes, node_clients, classes):
            node_domains[node], node_clients[node] = domain, client
            log.info("node %d (re)joined holding %r: it takes part from this round on", node, client)


METHODS = ("fedclip", "zero_shot", "local", "centralized", "fedavg", "fedprox")


def initial_weights(cfg: DictConfig, feature_dim: int) -> dict[str, torch.Tensor]:
    """What the run trains, as first sent: a seeded new adapter, or the CLIP's own image encoder."""
    if cfg.method.name in ENCODER_METHODS:
        model, _ = load_clip(model_name_or_path(cfg), torch.device("cpu"))
        return encoder_state(model)
    torch.manual_seed(cfg.seed)
    return AttentionAdapter(feature_dim).state_dict()


def split_replies(sent: list[Message], replies: list[Message]) -> tuple[list[Message], list[Message]]:
    """(replies to train messages, replies to evaluate messages) of one exchange."""
    train_ids = {m.metadata.message_id for m in sent if m.metadata.message_type == MessageType.TRAIN}
    train = [r for r in replies if r.metadata.reply_to_message_id in train_ids]
    return train, [r for r in replies if r.metadata.reply_to_message_id not in train_ids]


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Discover the nodes, then one exchange per round: round r's training carries round r-1's evaluation."""
    composed = compose_config(str(context.run_config.get("overrides", "")))
    cfg, run_config = local_config(composed), OmegaConf.to_yaml(composed)  # the clients get the run's config with every message
    method = cfg.method.name
    if method not in METHODS:
        raise ValueError(f"method.name={method!r} is not a method of this app; choose one of {', '.join(METHODS)} (override method=NAME)")
    if cfg.dataset.domains and cfg.dataset.held_out not in cfg.dataset.domains:
        raise ValueError(f"dataset.held_out={cfg.dataset.held_out!r} is not one of dataset.domains: {', '.join(cfg.dataset.domains)}")
    if cfg.resume and method == "local":
        raise ValueError("resume= is not available for method=local: its adapters live on the clients, the checkpoint holds no global one")
    idle: set[int] = set()
    node_domains, node_clients, info, classes, fingerprint = discover_nodes(grid, cfg, run_config, idle)
    dims = {int(m["feature-dim"]) for m in info.values()}
    if len(dims) != 1:
        raise RuntimeError(f"nodes report different CLIP feature sizes {sorted(dims)}: every node must use the same CLIP")

    weights = initial_weights(cfg, dims.pop())
    arrays = ArrayRecord(weights)
    template = {k: v.numpy() for k, v in arrays.items()}
    last_round = 0 if method == "zero_shot" else cfg.training.rounds
    options = cfg.strategy
    strategy = FedClipStrategy(node_domains, cfg.dataset.held_out, template, options.weighting, options.min_train_nodes, method, node_clients,
                               options.fraction_train, options.fraction_evaluate, cfg.seed, last_round, **trust_options(options),
                               client_num_train={c: int(m["num-train"]) for c, m in info.items()})
    strategy = with_privacy(strategy, options.dp)  # Flower's central-DP wrapper when strategy.dp.side is set
    strategy.summary()
    trained = 0 if method == "zero_shot" else sum(v.numel() for v in weights.values())
    client_domains = {node_clients[n]: d for n, d in node_domains.items()}
    report = RunReport(cfg, client_domains, [node_clients[n] for n in strategy.train_nodes], trained, classes, fingerprint)
    report.images_encoded += sum(int(m.get("images-encoded", 0)) for m in info.values())
    arrays, first_round = resume_run(cfg.resume, report, arrays) if cfg.resume else (arrays, 1)
    saved = lambda a: None if method == "local" else a  # noqa: E731 - local-only has no global weights to save

    # `arrays` holds the weights after round `done`; its row waits for their evaluation, which rides on the next exchange
    done, done_train, done_started = first_round - 1, MetricRecord(), time.time()
    evaluate_done = not report.rows  # a resumed run has the row of the round it resumes from

    def send(messages: list[Message]) -> list[Message]:
        return exchange(grid, messages, options.round_timeout, node_clients)

    for server_round in range(first_round, last_round + 2):
        started = time.time()
        refresh_nodes(grid, cfg, node_domains, node_clients, info, classes, run_config, idle)
        evaluation = {"evaluate-round": done, "zero-shot": done == 0} if evaluate_done else {}  # round 0 is zero-shot
        train = list(strategy.configure_train(server_round, arrays, ConfigRecord({"run-config": run_config, **evaluation}), grid)
                     ) if server_round <= last_round else []
        sent = train
        if evaluate_done:  # the nodes that do not train now get their evaluation in the same push
            training = {m.metadata.dst_node_id for m in train}
            evaluate = strategy.configure_evaluate(done, arrays if done else ArrayRecord(), ConfigRecord({"run-config": run_config, **evaluation}), grid)
            sent = train + [m for m in evaluate if m.metadata.dst_node_id not in training]
        secure = options.secagg.enabled and bool(train)  # SecAgg+: four exchanges, the evaluate-only messages ride on the first
        if secure:
            sent, replies, train_replies, eval_replies, mean_update = secure_exchange(
                grid, send, train, sent[len(train):], options, strategy.client_num_train.values(), context)
        else:
            replies = send(sent)
            train_replies, eval_replies = split_replies(sent, replies)
        if evaluate_done:
            metrics = strategy.aggregate_evaluate(done, eval_replies + train_replies)
            if server_round > last_round:  # the last evaluation: its exchange belongs to the last round
                report.count_traffic(node_clients, sent, replies)
            seconds = (time.time() if server_round > last_round else started) - done_started if done else 0.0
            report.add_round(done, done_train, metrics, seconds, saved(arrays))
            save_checkpoint(report, arrays)
        if server_round > last_round:
            break
        report.count_traffic(node_clients, sent, replies)
        if secure:
            new_arrays, done_train = strategy.aggregate_secure(server_round, train_replies, mean_update)
        else:
            new_arrays, done_train = strategy.aggregate_train(server_round, train_replies)
        arrays = new_arrays if new_arrays is not None else arrays
        done, done_started, evaluate_done = server_round, started, True

    report.finish(saved(arrays))
