"""The federation: which node holds which client, found by asking the nodes, kept up to date, and the exchange of
messages with them.

Every message goes out and comes back through `exchange`, which polls the SuperLink with a short
backoff and names the nodes lost on the way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from omegaconf import DictConfig

from common import wire
from common.fingerprint import app_code_fingerprint
from server_app import screening
from server_app.report import last_line

log = logging.getLogger(__name__)


class FederationError(Exception):
    """The federation cannot run this app (every site refused it, no node can train, CLIPs differ): the run stops
    with this message.

    Not a RuntimeError: Flower 1.28's `flwr-serverapp` reports a RuntimeError from the ServerApp only as
    "Failed to start run" (exit code 203) and drops its message; any other exception is logged with it.
    `failed`: the nodes whose discovery answer failed, and why (summary.json records them).
    """

    def __init__(self, message: str, failed: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failed = failed or {}


# the server asks the SuperLink for replies after 2 ms, then twice as long each time, at most every 50 ms
POLL_SECONDS = (
    0.002,
    0.05,
)


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
        log.warning(
            "node %d (%s) sent no reply within %ss: lost for this round",
            node,
            node_clients.get(node, "data not known yet"),
            timeout,
        )
    return kept


def query_nodes(
    grid: Grid,
    cfg: DictConfig,
    node_ids: list[int],
    run_config: str,
    idle: set[int],
    refused: dict[int, str],
    failed: dict[str, str] | None = None,
) -> list[tuple[int, str, str, list[str], MetricRecord, str]]:
    """Ask nodes which client (domain, or share of one), classes and CLIP (its files' fingerprint) they hold;
    malformed answers and
    failures are logged and left out.

    A node that holds no client of the run (more SuperNodes than clients) is logged once and added to `idle`; one
    whose site
    refused to run this app (its warm ClientApp checks the app's hash, gate/pinning.py) is logged with its reason and
    added to `refused`: it is not asked again during the run. A node that failed to answer (an error, a malformed
    answer, no answer) is added to `failed` ("node <id>" -> why).
    """
    queries = [
        Message(
            RecordDict(
                {wire.CONFIG: ConfigRecord({wire.RUN_CONFIG: run_config, wire.APP_CODE: app_code_fingerprint()})}
            ),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in node_ids
    ]
    answers, left_out = [], {}
    replies = exchange(grid, queries, cfg.strategy.round_timeout, {})
    if failed is not None:  # exchange logged them
        for node in sorted(set(node_ids) - {r.metadata.src_node_id for r in replies}):
            failed[f"node {node}"] = "no answer: the node was lost or did not answer in time"
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB:
            refused[node] = reply.error.reason
            log.error("node %d refused the app: %s", node, reply.error.reason)
            continue
        if (reason := screening.query_answer(reply)) is not None:
            left_out.setdefault(reason, []).append(node)
            continue
        info = reply.content[wire.INFO]
        if "idle" in info:
            idle.add(node)
            log.info("node %d is idle: %s", node, info["idle"])
            continue
        domain = str(info.get("domain"))
        answers.append(
            (
                node,
                domain,
                str(info.get("client", domain)),
                list(info.get("classes", [])),
                reply.content[wire.METRICS],
                str(info.get("model-fingerprint", "")),
            )
        )
    for (
        reason,
        nodes,
    ) in left_out.items():  # nodes that failed alike (a wrong data folder, say) make one line, not one each
        if failed is not None:
            failed.update({f"node {node}": reason for node in sorted(nodes)})
        log.error(
            "%s left out: %s",
            f"node {nodes[0]}" if len(nodes) == 1 else f"{len(nodes)} nodes ({', '.join(map(str, sorted(nodes)))})",
            reason,
        )
    return answers


def _accept(
    node: int, client: str, classes: list[str], node_clients: dict[int, str], federation_classes: list[str] | None
) -> bool:
    """Whether a node's answer fits the federation: a client no other node holds, the same classes as the others."""
    if client in node_clients.values():
        log.error("node %d left out: client %r is already held by another node", node, client)
        return False
    if federation_classes is not None and classes != federation_classes:
        log.error(
            "node %d left out: its classes %s differ from the federation's %s; every node needs the same class folders",
            node,
            classes,
            federation_classes,
        )
        return False
    return True


def discover_nodes(
    grid: Grid, cfg: DictConfig, run_config: str, idle: set[int], refused: dict[int, str]
) -> tuple[dict[int, str], dict[int, str], dict[str, MetricRecord], list[str], str]:
    """Ask every connected node which client it holds (a query message); nodes encode their features now.

    Returns node -> domain, node -> client name, client -> what it reported, the classes and the CLIP's fingerprint.
    A run that no node would train because the sites refused the app stops here with their reasons.
    """
    expected = (
        len(cfg.dataset.domains) * int(cfg.dataset.clients_per_domain)
        if cfg.dataset.domains
        else cfg.strategy.min_available_nodes
    )
    deadline = time.time() + cfg.strategy.round_timeout
    while len(node_ids := list(grid.get_node_ids())) < expected and time.time() < deadline:
        log.info("waiting for nodes: %d connected, %d expected", len(node_ids), expected)
        time.sleep(2)
    log.info("asking %d node(s) for their data; each encodes its images once with the frozen CLIP", len(node_ids))
    node_domains, node_clients, info, federation_classes, fingerprints, failed = {}, {}, {}, None, {}, {}
    for node, domain, client, classes, m, fingerprint in query_nodes(
        grid, cfg, node_ids, run_config, idle, refused, failed
    ):
        if not _accept(node, client, classes, node_clients, federation_classes):
            continue
        node_domains[node], node_clients[node], info[client], federation_classes, fingerprints[client] = (
            domain,
            client,
            m,
            classes,
            fingerprint,
        )
        log.info(
            "node %d holds %r: %d images (%d unreadable skipped), split %d/%d/%d%s",
            node,
            client,
            m["num-images"],
            m["num-skipped"],
            m[wire.NUM_TRAIN],
            m["num-val"],
            m["num-test"],
            "  [held out]" if domain == cfg.dataset.held_out else "",
        )
    if not any(d != cfg.dataset.held_out for d in node_domains.values()):
        if refused:
            raise FederationError(
                f"{len(refused)} of {len(node_ids)} node(s) refused to run this app, and no other node holds a "
                f"training "
                f"domain: the sites run only apps they approved. First refusal: {next(iter(refused.values()))} (every "
                "refusal is logged above)"
            )
        raise FederationError(
            f"no node holds a training domain (nodes answered with {sorted(info)}); nothing can train. Why each node "
            "was left out is logged above, once for the nodes that failed alike",
            failed,
        )
    fraction = float(cfg.strategy.min_train_fraction)
    if len(node_ids) - len(failed) < fraction * len(node_ids):
        first = next(iter(failed))
        raise FederationError(
            f"{len(failed)} of {len(node_ids)} node(s) failed to answer discovery "
            f"({first}: {last_line(failed[first])}), fewer than strategy.min_train_fraction={fraction:g} of them "
            "answered: the run stops. Every failure is logged above",
            failed,
        )
    if cfg.dataset.held_out not in node_domains.values():
        log.warning("no node holds the held-out domain %r: generalization is not measured", cfg.dataset.held_out)
    if len(set(fingerprints.values())) > 1:
        log.warning(
            "nodes hold different copies of the CLIP (files' fingerprints %s); the run folder records the first",
            fingerprints,
        )
    return node_domains, node_clients, info, federation_classes, next(iter(fingerprints.values()))


def refresh_nodes(
    grid: Grid,
    cfg: DictConfig,
    node_domains: dict[int, str],
    node_clients: dict[int, str],
    info: dict[str, MetricRecord],
    classes: list[str],
    run_config: str,
    idle: set[int],
    refused: dict[int, str],
) -> None:
    """Before a round: forget nodes that left, and take back a client's node when one (re)connects.

    A restarted SuperNode may come back under a new node id, so every connected node that is not
    in the federation (nor known to be idle) is asked for its data; only clients the run started with are taken back.
    """
    connected = set(grid.get_node_ids())
    for node in [n for n in node_domains if n not in connected]:
        node_domains.pop(node)
        log.warning(
            "node %d (%s) is no longer connected: left out until a node with its data connects",
            node,
            node_clients.pop(node),
        )
    new = sorted(connected - set(node_domains) - idle - set(refused))
    if not new:
        return
    for node, domain, client, node_classes, m, _ in query_nodes(grid, cfg, new, run_config, idle, refused):
        if client not in info:
            log.error("node %d left out: client %r was not in this run when it started", node, client)
        elif m[wire.FEATURE_DIM] != info[client][wire.FEATURE_DIM]:
            log.error(
                "node %d left out: its CLIP gives %d features, the run's %d",
                node,
                m[wire.FEATURE_DIM],
                info[client][wire.FEATURE_DIM],
            )
        elif _accept(node, client, node_classes, node_clients, classes):
            node_domains[node], node_clients[node] = domain, client
            log.info("node %d (re)joined holding %r: it takes part from this round on", node, client)


class Federation:
    """The run's nodes: which client each holds (found at discovery, refreshed before every round), and the exchange
    with them."""

    def __init__(self, grid: Grid, cfg: DictConfig, run_config: str) -> None:
        self.grid, self.cfg, self.run_config = grid, cfg, run_config
        self.idle: set[int] = set()
        self.refused: dict[int, str] = {}  # node -> why its site refused to run this app
        self.node_domains, self.node_clients, self.info, self.classes, self.fingerprint = discover_nodes(
            grid, cfg, run_config, self.idle, self.refused
        )
        dims = {int(m[wire.FEATURE_DIM]) for m in self.info.values()}
        if len(dims) != 1:
            raise FederationError(
                f"nodes report different CLIP feature sizes {sorted(dims)}: every node must use the same CLIP"
            )
        self.feature_dim = dims.pop()

    def refresh(self) -> None:
        refresh_nodes(
            self.grid,
            self.cfg,
            self.node_domains,
            self.node_clients,
            self.info,
            self.classes,
            self.run_config,
            self.idle,
            self.refused,
        )

    def exchange(self, messages: list[Message]) -> list[Message]:
        return exchange(self.grid, messages, self.cfg.strategy.round_timeout, self.node_clients)

    @property
    def client_domains(self) -> dict[str, str]:
        return {self.node_clients[n]: d for n, d in self.node_domains.items()}
