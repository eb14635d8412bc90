"""FedCLIP's server strategy: the adapter's tensors aggregated (mean, or a robust rule), every reply screened first.

Screening drops a reply that is malformed or claims more examples than its node holds, and clips
or rejects an update that moved too far from the global adapter it was trained from. The robust
rules are Flower's own (flwr.server.strategy.aggregate), applied to the adapter tensors only.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg
from flwr.serverapp.strategy import FedAvg

from common.transport import EVALUATION_PREFIX, WIRE_DTYPES, check_transport_dtype, decode_array, encode

log = logging.getLogger(__name__)


def adapter_update(content: RecordDict, template: dict[str, np.ndarray], transport_dtype: str = "float32") -> tuple[dict[str, np.ndarray] | None, str | None]:
    """A training reply's adapter tensors, decoded to the template's dtype and checked, or None and why it cannot be used.

    Each tensor must come in the transport dtype or in the template's own (float32: what Flower's
    DP wrappers hand on after clipping).
    """
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
        allowed = {expected.dtype, WIRE_DTYPES[transport_dtype]} if expected.dtype == np.float32 else {expected.dtype}
        if array.dtype not in allowed:
            return None, f"{key} has dtype {array.dtype}, expected {' or '.join(sorted(map(str, allowed)))}"
        array = decode_array(array) if expected.dtype == np.float32 else array
        if not np.isfinite(array).all():
            return None, f"{key} holds NaN or Inf"
        state[key] = array
    return state, None


def add_train_metrics(metrics: MetricRecord, client: str, reply_metrics: MetricRecord) -> None:
    """A train reply's own metrics as `<client>/<metric>`; the evaluation it carries goes to aggregate_evaluate."""
    for key, value in reply_metrics.items():
        if not key.startswith(EVALUATION_PREFIX):
            metrics[f"{client}/{key}"] = value


AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan")


def min_clients(aggregation: str, num_malicious: int) -> int:
    """The fewest updates with which a rule still tolerates `num_malicious` faulty ones (its paper's bound)."""
    f = num_malicious
    return {"mean": 1, "median": 2 * f + 1, "trimmed_mean": 2 * f + 1, "krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}[aggregation]


def aggregate_adapters(states: list[dict[str, np.ndarray]], weights: list[float], aggregation: str = "mean",
                       num_malicious: int = 0) -> dict[str, np.ndarray]:
    """Adapter tensors combined key by key, in float32: the weighted mean, or one of Flower's robust rules.

    median, trimmed_mean (cuts `num_malicious` updates from each end of every coordinate), krum and
    bulyan ignore the weights; multikrum averages the n - num_malicious updates Krum scores best,
    with the weights.
    """
    keys = list(states[0])
    if aggregation == "mean":
        total = float(sum(weights))
        return {k: sum(w / total * s[k].astype(np.float64) for s, w in zip(states, weights)).astype(np.float32) for k in keys}
    results = [([s[k] for k in keys], w) for s, w in zip(states, weights)]
    f = num_malicious
    if aggregation == "median":
        combined = aggregate_median(results)
    elif aggregation == "trimmed_mean":
        combined = aggregate_trimmed_avg(results, (f + 0.5) / len(results))  # int(fraction * n) == f, whatever float rounding does
    elif aggregation == "krum":
        combined = aggregate_krum(results, f, to_keep=0)
    elif aggregation == "multikrum":
        combined = aggregate_krum(results, f, to_keep=len(results) - f)
    elif aggregation == "bulyan":
        combined = aggregate_bulyan(results, f, aggregate_krum, to_keep=0)
    else:
        raise ValueError(f"strategy.aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    return {k: np.asarray(v, dtype=np.float32) for k, v in zip(keys, combined)}


def update_norm(state: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> float:
    """L2 distance between an adapter and the one it was trained from, over all its tensors."""
    return math.sqrt(sum(float(np.sum(np.square(state[k].astype(np.float64) - base[k]))) for k in base))


def clipped(state: dict[str, np.ndarray], base: dict[str, np.ndarray], norm: float, bound: float) -> dict[str, np.ndarray]:
    """The adapter moved back towards `base` until its update has L2 norm `bound`."""
    scale = bound / norm
    return {k: (base[k] + scale * (state[k].astype(np.float64) - base[k])).astype(np.float32) for k in base}


def sample_clients(clients: list[str], n: int, seed: int, purpose: str, server_round: int) -> list[str]:
    """n of the client names, sorted: the sorted names sampled by a generator seeded by the run's seed, the purpose
    ("train", "evaluate") and the round; all of them when n >= len(clients). benchmarks/noop_app.py draws the same way."""
    clients = sorted(clients)
    if n >= len(clients):
        return clients
    return sorted(random.Random(f"{seed}/{purpose}/{server_round}").sample(clients, n))


def trust_options(strategy_cfg: Mapping) -> dict:
    """FedClipStrategy's screening, robust-aggregation and transport keyword arguments, from conf/strategy (docs/trust.md)."""
    keys = ("aggregation", "num_malicious", "max_update_norm", "max_norm_ratio", "on_large_update", "transport_dtype")
    return {**{k: strategy_cfg[k] for k in keys}, "secagg": bool(strategy_cfg.secagg.enabled)}


class FedClipStrategy(FedAvg):
    """Sends the global weights to the training domains' nodes only and aggregates what comes back.

    `node_domains` maps node id -> domain; the held-out domain's nodes are evaluated, never trained.
    `node_clients` names each node's client (the domain, or "<domain>#<shard>" with several per domain).
    `template` is the trained part's tensors (the adapter, or the image encoder for fedavg/fedprox).
    Every reply is screened (`screen`): malformed replies (wrong keys, shapes or dtype, NaN/Inf, no
    example count, more examples than the client's `num-train` at discovery) are dropped, and an
    update longer than `max_update_norm`, or than `max_norm_ratio` times the round's median update
    norm, is clipped or rejected (`on_large_update`); each is logged with the node id. The rest are
    combined by `aggregation` (mean, or a robust rule tolerating `num_malicious` faulty clients);
    with fewer than `min_train_nodes`, or than the rule needs, the weights are not changed.
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
        *,
        aggregation: str = "mean",
        num_malicious: int = 0,
        max_update_norm: float | None = None,
        max_norm_ratio: float | None = None,
        on_large_update: str = "reject",
        transport_dtype: str = "float32",
        secagg: bool = False,
        client_num_train: dict[str, int] | None = None,
    ) -> None:
        if weighting not in ("equal", "examples"):
            raise ValueError(f"strategy.weighting must be 'equal' or 'examples', got {weighting!r}")
        for name, fraction in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if not 0 < fraction <= 1:
                raise ValueError(f"strategy.{name} must be in (0, 1], got {fraction}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"strategy.aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if on_large_update not in ("clip", "reject"):
            raise ValueError(f"strategy.on_large_update must be 'clip' or 'reject', got {on_large_update!r}")
        check_transport_dtype(transport_dtype)
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
        self.aggregation, self.num_malicious = aggregation, int(num_malicious)
        self.max_update_norm, self.max_norm_ratio, self.on_large_update = max_update_norm, max_norm_ratio, on_large_update
        self.transport_dtype = transport_dtype
        self.secagg = secagg  # SecAgg+ rounds (server_app/secagg.py): only the mean update is ever seen, see aggregate_secure
        self.client_num_train = client_num_train or {}  # what each client reported at discovery
        self.client_states: dict[str, ArrayRecord] = {}  # method=local: each client's own adapter, by client name
        self.global_state: dict[str, np.ndarray] = {}  # the weights this round's updates were trained from (set in configure_train)
        self._check_trust_options()

    def _check_trust_options(self) -> None:
        """Options that cannot work with this federation fail here, before the first round."""
        if self.transport_dtype != "float32" and self.method not in ("fedclip", "local", "centralized"):
            raise ValueError(f"strategy.transport_dtype={self.transport_dtype} is for the adapter methods; method={self.method} sends float32")
        if self.secagg:
            self._check_secagg()
        if self.aggregation == "mean":
            return
        if self.method not in ("fedclip", "fedavg", "fedprox"):
            raise ValueError(f"strategy.aggregation={self.aggregation} combines several clients' updates; method={self.method} has none to combine")
        if self.num_malicious < 0:
            raise ValueError(f"strategy.num_malicious must be >= 0, got {self.num_malicious}")
        need, have = min_clients(self.aggregation, self.num_malicious), len(self.train_nodes)
        if have < need:
            raise ValueError(f"strategy.aggregation={self.aggregation} with strategy.num_malicious={self.num_malicious} needs at least {need} "
                             f"training clients, this federation has {have}; lower num_malicious or choose another rule (docs/trust.md)")

    def _check_secagg(self) -> None:
        """SecAgg+ hides every update: only the mean of at least two can be computed, so what needs one update fails here."""
        if self.method != "fedclip":
            raise ValueError(f"strategy.secagg.enabled is for method=fedclip (the adapter is averaged); method={self.method} cannot use it")
        if self.aggregation != "mean":
            raise ValueError(f"strategy.secagg.enabled: the server sees only the sum of the updates, so strategy.aggregation={self.aggregation}, "
                             "which needs each update, cannot run; use aggregation=mean, or turn SecAgg+ off")
        if (have := len(self.train_sample(1))) < 2:
            raise ValueError(f"strategy.secagg.enabled needs at least 2 training clients a round, this run has {have}")
        log.info("SecAgg+: the server sees only the mean update; per-update screening (norm bounds, num-examples) cannot apply, "
                 "each coordinate of an update is clipped to strategy.secagg.clipping_range on its client")

    @property
    def train_nodes(self) -> list[int]:
        """The nodes that train: every training domain's, or for method=centralized the first one."""
        nodes = sorted((n for n, d in self.node_domains.items() if d != self.held_out), key=lambda n: self.node_clients[n])
        return nodes[:1] if self.method == "centralized" else nodes

    def summary(self) -> None:
        train = sorted(self.node_clients[n] for n in self.train_nodes)
        log.info("FedClipStrategy (%s): train on %s, hold out %s, %s weighting, %s aggregation (tolerates %d faulty), %s transport",
                 self.method, train, self.held_out, self.weighting, self.aggregation, self.num_malicious, self.transport_dtype)
        if self.fraction_train < 1 or self.fraction_evaluate < 1:
            log.info("each round trains %.0f%% and evaluates at least %.0f%% of the training clients (seeded); held-out clients: all",
                     100 * self.fraction_train, 100 * self.fraction_evaluate)

    def _sample(self, nodes: list[int], n: int, purpose: str, server_round: int) -> list[int]:
        """n of the nodes, drawn by client name with a generator seeded by the run's seed, the purpose and the round."""
        if n >= len(nodes):
            return nodes
        ordered = sorted(nodes, key=lambda node: self.node_clients[node])
        names = [self.node_clients[node] for node in ordered]
        if len(set(names)) < len(names):  # nodes named alike (no node_clients given): told apart, in the same order
            names = [f"{name}\0{i:09d}" for i, name in enumerate(names)]
        by_name = dict(zip(names, ordered))
        return [by_name[name] for name in sample_clients(names, n, self.seed, purpose, server_round)]

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
        self.global_state = {k: v.numpy() for k, v in arrays.items()}  # screening measures each update from it
        arrays = self.outgoing(arrays)
        if self.method == "local":  # each node continues its own adapter
            return [self._message({"arrays": self.client_states.get(self.node_clients[n], arrays)}, config, n, MessageType.TRAIN)
                    for n in nodes]
        return self._construct_messages(RecordDict({"arrays": arrays, "config": config}), nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        nodes = self.evaluate_sample(server_round)
        arrays = self.outgoing(arrays)
        if self.method == "local" and self.client_states:
            every = {f"arrays/{client}": state for client, state in self.client_states.items()}
            records = {n: {"arrays": self.client_states.get(self.node_clients[n], arrays)} for n in nodes}
            records.update({n: every for n in nodes if self.node_domains[n] == self.held_out})
            return [self._message(records[n], config, n, MessageType.EVALUATE) for n in nodes]
        return self._construct_messages(RecordDict({"arrays": arrays, "config": config}), nodes, MessageType.EVALUATE)

    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global weights as they travel: in strategy.transport_dtype."""
        return arrays if self.transport_dtype == "float32" else encode({k: v.numpy() for k, v in arrays.items()}, self.transport_dtype)

    @staticmethod
    def _message(arrays: dict[str, ArrayRecord], config: ConfigRecord, node: int, message_type: str) -> Message:
        return Message(RecordDict({**arrays, "config": config}), dst_node_id=node, message_type=message_type)

    def _client(self, message: Message) -> str:
        return self.node_clients.get(message.metadata.src_node_id, f"node-{message.metadata.src_node_id}")

    def _max_examples(self, client: str) -> int | None:
        """The most examples a client can have trained on: its train split (all training clients' for method=centralized)."""
        if self.method == "centralized":
            return sum(self.client_num_train.values()) or None
        return self.client_num_train.get(client)

    def screen(self, server_round: int, replies: Iterable[Message]) -> tuple[list[tuple[Message, str, dict[str, np.ndarray]]], MetricRecord]:
        """The replies fit to aggregate, each with its client and decoded (maybe clipped) adapter, and their train metrics.

        Each update is measured against the global weights it was trained from (method=local: the
        client's own adapter); the round's median norm needs 3 updates or more to be a reference.
        """
        accepted, metrics = [], MetricRecord()
        for msg in replies:
            node, client = msg.metadata.src_node_id, self._client(msg)
            state, reason = (None, msg.error.reason) if msg.has_error() else adapter_update(msg.content, self.template, self.transport_dtype)
            if state is not None and (limit := self._max_examples(client)) is not None and msg.content["metrics"]["num-examples"] > limit:
                state, reason = None, f"num-examples {msg.content['metrics']['num-examples']} exceeds the {limit} training examples it reported at discovery"
            if state is None:
                log.warning("round %d: dropped the update of node %d (%s): %s", server_round, node, client, reason)
                continue
            accepted.append((msg, client, state))
            add_train_metrics(metrics, client, msg.content["metrics"])
        if not self.global_state or not accepted:
            return accepted, metrics
        bases = [self._base(client) for _, client, _ in accepted]
        norms = [update_norm(state, base) for (_, _, state), base in zip(accepted, bases)]
        bounds = [self.max_update_norm] if self.max_update_norm is not None else []
        if self.max_norm_ratio is not None and len(norms) >= 3:
            bounds.append(self.max_norm_ratio * float(np.median(norms)))
        bound = min(bounds, default=math.inf)
        kept = []
        for (msg, client, state), base, norm in zip(accepted, bases, norms):
            metrics[f"{client}/update-norm"] = norm
            if norm > bound:
                log.warning("round %d: update of node %d (%s) has norm %.4g > %.4g: %s", server_round, msg.metadata.src_node_id, client,
                            norm, bound, "clipped" if self.on_large_update == "clip" else "rejected")
                if self.on_large_update == "reject":
                    continue
                state = clipped(state, base, norm, bound)
            kept.append((msg, client, state))
        return kept, metrics

    def _base(self, client: str) -> dict[str, np.ndarray]:
        if self.method == "local" and client in self.client_states:
            return {k: decode_array(v.numpy()) for k, v in self.client_states[client].items()}
        return self.global_state

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregated weights (None keeps the current ones) and per-client train metrics."""
        accepted, metrics = self.screen(server_round, replies)
        need = max(self.min_train_nodes, 1, min_clients(self.aggregation, self.num_malicious))
        if len(accepted) < need:
            log.warning("round %d: %d valid update(s), need %d: the global adapter is unchanged", server_round, len(accepted), need)
            return None, metrics
        if self.method == "local":  # nothing is averaged; each client's own adapter is kept
            for _, client, state in accepted:
                self.client_states[client] = encode(state, self.transport_dtype)
            return None, metrics
        states = [state for _, _, state in accepted]
        weights = [float(msg.content["metrics"]["num-examples"]) if self.weighting == "examples" else 1.0 for msg, _, _ in accepted]
        combined = aggregate_adapters(states, weights, self.aggregation, self.num_malicious)
        return ArrayRecord({k: Array(v.astype(self.template[k].dtype, copy=False)) for k, v in combined.items()}), metrics

    def aggregate_secure(self, server_round: int, replies: Iterable[Message], mean_update: dict[str, np.ndarray] | None
                         ) -> tuple[ArrayRecord | None, MetricRecord]:
        """A SecAgg+ round: the global adapter plus the unmasked mean update (None: the protocol halted), and the replies' train metrics.

        No single update reached the server, so none can be screened; the mean is checked like one (tensors, shapes, finite).
        """
        metrics, count = MetricRecord(), 0
        for msg in replies:
            if not msg.has_error() and "metrics" in msg.content.metric_records:
                add_train_metrics(metrics, self._client(msg), msg.content["metrics"])
                count += 1
        if mean_update is None or count < max(self.min_train_nodes, 2):
            log.warning("round %d: secure aggregation gave no mean (%d update(s) collected): the global adapter is unchanged", server_round, count)
            return None, metrics
        if (set(mean_update) != set(self.template) or any(u.shape != self.template[k].shape for k, u in mean_update.items())
                or not all(np.isfinite(u).all() for u in mean_update.values())):
            log.warning("round %d: the securely aggregated update has wrong keys, shapes or NaN/Inf: the global adapter is unchanged", server_round)
            return None, metrics
        combined = {k: (self.global_state[k] + mean_update[k]).astype(self.template[k].dtype) for k in self.template}
        return ArrayRecord({k: Array(v) for k, v in combined.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """Evaluation metrics keyed `<client>/<metric>`; failed replies are logged and left out.

        A train reply carries the evaluation of the weights it was sent in its metrics, under EVALUATION_PREFIX.
        """
        metrics = MetricRecord()
        for msg in replies:
            fused = msg.metadata.message_type == MessageType.TRAIN
            reason = msg.error.reason if msg.has_error() else None
            if reason is None and "metrics" not in msg.content.metric_records:
                reason = "no 'metrics' record"
            found = {} if reason else {k.removeprefix(EVALUATION_PREFIX) if fused else k: v for k, v in msg.content["metrics"].items()
                                       if k.startswith(EVALUATION_PREFIX) == fused}
            if reason is None and not found:
                reason = "its train reply carries no evaluation" if fused else "no evaluation metrics"
            if reason is not None:
                log.warning("round %d: evaluation of node %d (%s) left out: %s", server_round, msg.metadata.src_node_id, self._client(msg), reason)
                continue
            for key, value in found.items():
                metrics[f"{self._client(msg)}/{key}"] = value
        return metrics
