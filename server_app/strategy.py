"""FedCLIP's server strategy: FedAvg over the adapter's tensors only, with every reply checked first."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

log = logging.getLogger(__name__)


def adapter_update(content: RecordDict, template: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """A training reply's adapter tensors, decoded and checked, or None and why it cannot be used."""
    if "arrays" not in content.array_records:
        return None, "no 'arrays' record"
    if "metrics" not in content.metric_records or "num-examples" not in content["metrics"]:
        return None, "no 'metrics' record with 'num-examples'"
    num_examples = content["metrics"]["num-examples"]
    if not isinstance(num_examples, int | float) or not 0 < num_examples < math.inf:
        return None, f"num-examples must be a positive finite number, got {num_examples!r}"
    arrays = content["arrays"]
    if set(arrays.keys()) != set(template):
        missing, extra = sorted(set(template) - set(arrays.keys())), sorted(set(arrays.keys()) - set(template))
        return None, f"adapter keys differ (missing {missing}, unexpected {extra})"
    state = {}
    for key, expected in template.items():
        try:
            array = arrays[key].numpy()  # the decoded bytes, not the shape and dtype the reply declares
        except Exception as err:  # noqa: BLE001 - any undecodable payload is a bad reply
            return None, f"{key} cannot be decoded: {err}"
        if array.shape != expected.shape:
            return None, f"{key} has shape {array.shape}, expected {expected.shape}"
        if array.dtype != expected.dtype:
            return None, f"{key} has dtype {array.dtype}, expected {expected.dtype}"
        if not np.isfinite(array).all():
            return None, f"{key} holds NaN or Inf"
        state[key] = array
    return state, None


def aggregate_adapters(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """The weighted average of adapter tensors, key by key, in the adapter's own dtype."""
    total = float(sum(weights))
    return {
        key: (sum(w / total * state[key].astype(np.float64) for state, w in zip(states, weights))).astype(states[0][key].dtype)
        for key in states[0]
    }


class FedClipStrategy(FedAvg):
    """Sends the global weights to the training domains' nodes only and averages what comes back.

    `node_domains` maps node id -> domain; the held-out domain's nodes are evaluated, never trained.
    `node_clients` names each node's client (the domain, or "<domain>#<shard>" with several per domain).
    `template` is the trained part's tensors (the adapter, or the image encoder for fedavg/fedprox).
    Malformed replies (wrong keys, shapes or dtype, NaN/Inf, no example count) are dropped and
    logged with the node id; if fewer than `min_train_nodes` remain, the weights are not changed.
    method=local keeps one adapter per client instead of averaging (`client_states`, by name, so a
    node that rejoins under a new id goes on with its own); the held-out nodes are evaluated with every one. method=centralized trains on one node only.
    One exchange a round: round r's train messages also carry the evaluation of round r-1's weights,
    so `configure_evaluate` addresses only the nodes that do not train in the next round.
    """

    def __init__(
        self,
        node_domains: dict[int, str],
        held_out: str,
        template: dict[str, np.ndarray],
        weighting: str,
        min_train_nodes: int,
        method: str = "fedclip",
        node_clients: dict[int, str] | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        seed: int = 0,
        rounds: int = 0,
    ) -> None:
        if weighting not in ("equal", "examples"):
            raise ValueError(f"strategy.weighting must be 'equal' or 'examples', got {weighting!r}")
        for name, fraction in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if not 0 < fraction <= 1:
                raise ValueError(f"strategy.{name} must be in (0, 1], got {fraction}")
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=min_train_nodes,
                         arrayrecord_key="arrays", configrecord_key="config")
        self.node_domains = node_domains
        self.node_clients = node_clients if node_clients is not None else dict(node_domains)  # names metrics: "<client>/<metric>"
        self.held_out = held_out
        self.template = template
        self.weighting = weighting
        self.method = method
        self.seed = seed
        self.rounds = rounds  # the last round: its evaluation has no next round's training to ride on
        self.client_states: dict[str, ArrayRecord] = {}  # method=local: each client's own adapter, by client name

    @property
    def train_nodes(self) -> list[int]:
        """The nodes that train: every training domain's, or for method=centralized the first one."""
        nodes = sorted((n for n, d in self.node_domains.items() if d != self.held_out), key=lambda n: self.node_clients[n])
        return nodes[:1] if self.method == "centralized" else nodes

    def summary(self) -> None:
        train = sorted(self.node_clients[n] for n in self.train_nodes)
        log.info("FedClipStrategy (%s): train on %s, hold out %s, %s weighting", self.method, train, self.held_out, self.weighting)
        if self.fraction_train < 1 or self.fraction_evaluate < 1:
            log.info("each round trains %.0f%% and evaluates at least %.0f%% of the training clients (seeded); held-out clients: all",
                     100 * self.fraction_train, 100 * self.fraction_evaluate)

    def _sample(self, nodes: list[int], n: int, purpose: str, server_round: int) -> list[int]:
        """n of the nodes, drawn by client name with a generator seeded by the run's seed, the purpose and the round."""
        if n >= len(nodes):
            return nodes
        rng = random.Random(f"{self.seed}/{purpose}/{server_round}")
        return sorted(rng.sample(sorted(nodes, key=lambda node: self.node_clients[node]), n), key=lambda node: self.node_clients[node])

    def train_sample(self, server_round: int) -> list[int]:
        """The nodes that train in a round: strategy.fraction_train of the training nodes (at least min_train_nodes)."""
        nodes = self.train_nodes
        return self._sample(nodes, max(self.min_train_nodes, math.ceil(self.fraction_train * len(nodes))), "train", server_round)

    def evaluate_sample(self, server_round: int) -> list[int]:
        """The nodes evaluated on round `server_round`'s weights that get an evaluate message: every held-out node,
        and training nodes that do not train in the next round (their train message carries the evaluation),
        drawn so that at least strategy.fraction_evaluate of the training nodes are evaluated."""
        training = [n for n, d in self.node_domains.items() if d != self.held_out]
        riding = set(self.train_sample(server_round + 1)) if server_round < self.rounds else set()
        rest = [n for n in training if n not in riding]
        wanted = max(0, math.ceil(self.fraction_evaluate * len(training)) - len(riding))
        return [n for n, d in self.node_domains.items() if d == self.held_out] + self._sample(rest, wanted, "evaluate", server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        nodes = self.train_sample(server_round)
        if self.method == "local":  # each node continues its own adapter
            return [self._message({"arrays": self.client_states.get(self.node_clients[n], arrays)}, config, n, MessageType.TRAIN)
                    for n in nodes]
        return self._construct_messages(RecordDict({"arrays": arrays, "config": config}), nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        nodes = self.evaluate_sample(server_round)
        if self.method == "local" and self.client_states:
            every = {f"arrays/{client}": state for client, state in self.client_states.items()}
            records = {n: {"arrays": self.client_states.get(self.node_clients[n], arrays)} for n in nodes}
            records.update({n: every for n in nodes if self.node_domains[n] == self.held_out})
            return [self._message(records[n], config, n, MessageType.EVALUATE) for n in nodes]
        return self._construct_messages(RecordDict({"arrays": arrays, "config": config}), nodes, MessageType.EVALUATE)

    @staticmethod
    def _message(arrays: dict[str, ArrayRecord], config: ConfigRecord, node: int, message_type: str) -> Message:
        return Message(RecordDict({**arrays, "config": config}), dst_node_id=node, message_type=message_type)

    def _client(self, message: Message) -> str:
        return self.node_clients.get(message.metadata.src_node_id, f"node-{message.metadata.src_node_id}")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The averaged weights (None keeps the current ones) and per-client train metrics."""
        states, weights, metrics = [], [], MetricRecord()
        for msg in replies:
            node, client = msg.metadata.src_node_id, self._client(msg)
            state, reason = (None, msg.error.reason) if msg.has_error() else adapter_update(msg.content, self.template)
            if state is None:
                log.warning("round %d: dropped the update of node %d (%s): %s", server_round, node, client, reason)
                continue
            states.append(state)
            if self.method == "local":
                self.client_states[client] = msg.content["arrays"]
            weights.append(float(msg.content["metrics"]["num-examples"]) if self.weighting == "examples" else 1.0)
            for key, value in msg.content["metrics"].items():
                metrics[f"{client}/{key}"] = value
        if len(states) < max(self.min_train_nodes, 1):
            log.warning("round %d: %d valid update(s), need %d: the global adapter is unchanged", server_round, len(states), self.min_train_nodes)
            return None, metrics
        if self.method == "local":  # nothing is averaged; the node states were kept above
            return None, metrics
        return ArrayRecord({k: Array(v) for k, v in aggregate_adapters(states, weights).items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """Evaluation metrics keyed `<client>/<metric>`; failed replies are logged and left out.

        A train reply carries the evaluation of the weights it was sent in its 'eval-metrics' record.
        """
        metrics = MetricRecord()
        for msg in replies:
            record = "eval-metrics" if msg.metadata.message_type == MessageType.TRAIN else "metrics"
            reason = msg.error.reason if msg.has_error() else None
            if reason is None and record not in msg.content.metric_records:
                reason = f"no {record!r} record"
            if reason is not None:
                log.warning("round %d: evaluation of node %d (%s) left out: %s", server_round, msg.metadata.src_node_id, self._client(msg), reason)
                continue
            for key, value in msg.content[record].items():
                metrics[f"{self._client(msg)}/{key}"] = value
        return metrics
