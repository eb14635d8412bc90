"""The server's strategy: who gets which weights each round, and how the screened replies make the next global weights.

The method (common/methods) says what travels, who trains and how updates combine; screening
(server_app/screening.py) checks every reply once; the robust rules are Flower's own
(flwr.server.strategy.aggregate), applied to the trained tensors only.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from omegaconf import DictConfig

from common import wire
from common.methods.base import Method, Update
from common.transport import check_transport_dtype, encode
from server_app import screening

log = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan")


def min_clients(aggregation: str, num_malicious: int) -> int:
    """The fewest updates with which a rule still tolerates `num_malicious` faulty ones (its paper's bound)."""
    f = num_malicious
    return {
        "mean": 1,
        "median": 2 * f + 1,
        "trimmed_mean": 2 * f + 1,
        "krum": 2 * f + 3,
        "multikrum": 2 * f + 3,
        "bulyan": 4 * f + 3,
    }[aggregation]


def aggregate_adapters(
    states: list[dict[str, np.ndarray]], weights: list[float], aggregation: str, num_malicious: int
) -> dict[str, np.ndarray]:
    """Tensors combined key by key, in float32: the weighted mean, or one of Flower's robust rules.

    median, trimmed_mean (cuts `num_malicious` updates from each end of every coordinate), krum and
    bulyan ignore the weights; multikrum averages the n - num_malicious updates Krum scores best,
    with the weights.
    """
    keys = list(states[0])
    if aggregation == "mean":
        total = float(sum(weights))
        return {
            k: sum(w / total * s[k].astype(np.float64) for s, w in zip(states, weights)).astype(np.float32)
            for k in keys
        }
    results = [([s[k] for k in keys], w) for s, w in zip(states, weights)]
    f = num_malicious
    if aggregation == "median":
        combined = aggregate_median(results)
    elif aggregation == "trimmed_mean":
        # int(fraction * n) == f, whatever float rounding does
        combined = aggregate_trimmed_avg(results, (f + 0.5) / len(results))
    elif aggregation == "krum":
        combined = aggregate_krum(results, f, to_keep=0)
    elif aggregation == "multikrum":
        combined = aggregate_krum(results, f, to_keep=len(results) - f)
    elif aggregation == "bulyan":
        combined = aggregate_bulyan(results, f, aggregate_krum, to_keep=0)
    else:
        raise ValueError(f"strategy.aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    return {k: np.asarray(v, dtype=np.float32) for k, v in zip(keys, combined)}


def sample_clients(clients: list[str], n: int, seed: int, purpose: str, server_round: int) -> list[str]:
    """n of the client names, sorted: the sorted names sampled by a generator seeded by the run's seed, the purpose
    ("train", "evaluate") and the round; all of them when n >= len(clients). benchmarks/noop_app.py draws the same
    way."""
    clients = sorted(clients)
    if n >= len(clients):
        return clients
    return sorted(random.Random(f"{seed}/{purpose}/{server_round}").sample(clients, n))


class FedClipStrategy(FedAvg):
    """Sends the global weights to the training clients' nodes and combines what comes back, as the method says.

    `node_domains` maps node id -> domain; the held-out domain's nodes are evaluated, never trained.
    `node_clients` names each node's client (the domain, or "<domain>#<shard>" with several per domain).
    `template` is the trained tensors (the adapter, or the image encoder for fedavg/fedprox).
    Every reply is screened once (`screen`); the accepted updates are combined by `aggregation`
    (mean, or a robust rule tolerating `num_malicious` faulty clients); with fewer than
    `min_train_nodes`, or than the rule needs, the weights are not changed.
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
        method: Method,
        *,
        node_clients: dict[int, str] | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        seed: int = 0,
        rounds: int = 0,
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
        if on_large_update not in screening.ON_LARGE_UPDATE:
            raise ValueError(f"strategy.on_large_update must be 'clip' or 'reject', got {on_large_update!r}")
        check_transport_dtype(transport_dtype)
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            arrayrecord_key=wire.ARRAYS,
            configrecord_key=wire.CONFIG,
        )
        self.node_domains = node_domains
        # names metrics: "<client>/<metric>"
        self.node_clients = node_clients if node_clients is not None else dict(node_domains)
        self.held_out = held_out
        self.template = template
        self.weighting = weighting
        self.method = method
        self.seed = seed
        self.rounds = rounds  # the last round: its evaluation has no next round's training to ride on
        self.aggregation, self.num_malicious = aggregation, int(num_malicious)
        self.max_update_norm, self.max_norm_ratio, self.on_large_update = (
            max_update_norm,
            max_norm_ratio,
            on_large_update,
        )
        self.transport_dtype = transport_dtype
        # SecAgg+ rounds (server_app/secagg.py): only the mean update is ever seen, see aggregate_secure
        self.secagg = secagg
        self.client_num_train = client_num_train or {}  # what each client reported at discovery
        self.global_state: dict[
            str, np.ndarray
        ] = {}  # the weights this round's updates were trained from (set in configure_train)
        self._check_options()

    @classmethod
    def from_config(
        cls,
        cfg: DictConfig,
        method: Method,
        template: dict[str, np.ndarray],
        node_domains: dict[int, str],
        node_clients: dict[int, str],
        client_num_train: dict[str, int],
    ) -> FedClipStrategy:
        """The run's strategy from its configuration (conf/strategy), its method and the federation discovery found."""
        options = cfg.strategy
        trust = (
            "aggregation",
            "num_malicious",
            "max_update_norm",
            "max_norm_ratio",
            "on_large_update",
            "transport_dtype",
        )
        return cls(
            node_domains,
            cfg.dataset.held_out,
            template,
            options.weighting,
            options.min_train_nodes,
            method,
            node_clients=node_clients,
            fraction_train=options.fraction_train,
            fraction_evaluate=options.fraction_evaluate,
            seed=cfg.seed,
            rounds=cfg.training.rounds if method.trains else 0,
            **{key: options[key] for key in trust},
            secagg=bool(options.secagg.enabled),
            client_num_train=client_num_train,
        )

    def _check_options(self) -> None:
        """Options that cannot work with this method or federation fail here, before the first round."""
        method = self.method.name
        if self.transport_dtype != "float32" and not self.method.narrows_to_16_bits:
            raise ValueError(
                f"strategy.transport_dtype={self.transport_dtype} narrows what travels to 16 bits; method={method} "
                f"sends float32"
            )
        if self.secagg:
            self._check_secagg()
        if self.aggregation == "mean":
            return
        if not self.method.combines_updates:
            raise ValueError(
                f"strategy.aggregation={self.aggregation} combines several clients' updates; method={method} has "
                f"none to combine"
            )
        if self.num_malicious < 0:
            raise ValueError(f"strategy.num_malicious must be >= 0, got {self.num_malicious}")
        # every round samples as many
        need, have = (
            min_clients(self.aggregation, self.num_malicious),
            len(self.train_sample(1)),
        )
        if have < need:
            raise ValueError(
                f"strategy.aggregation={self.aggregation} with strategy.num_malicious={self.num_malicious} needs at "
                f"least {need} "
                f"training clients, this federation has {have} a round ({len(self.train_nodes)} training, "
                f"strategy.fraction_train="
                f"{self.fraction_train}); lower num_malicious, raise fraction_train or choose another rule "
                f"(docs/trust.md)"
            )

    def _check_secagg(self) -> None:
        """SecAgg+ hides every update: only the mean of at least two can be computed, so what needs one update fails
        here."""
        if not self.method.averages_updates:
            raise ValueError(
                f"strategy.secagg.enabled is for a method whose new weights are the mean of the clients' updates; "
                f"method={self.method.name}'s "
                "are not, so it cannot use it"
            )
        if self.aggregation != "mean":
            raise ValueError(
                f"strategy.secagg.enabled: the server sees only the sum of the updates, so "
                f"strategy.aggregation={self.aggregation}, "
                "which needs each update, cannot run; use aggregation=mean, or turn SecAgg+ off"
            )
        if (have := len(self.train_sample(1))) < 2:
            raise ValueError(f"strategy.secagg.enabled needs at least 2 training clients a round, this run has {have}")
        log.info(
            "SecAgg+: the server sees only the mean update; per-update screening (norm bounds, num-examples) cannot "
            "apply, "
            "each coordinate of an update is clipped to strategy.secagg.clipping_range on its client"
        )

    @property
    def train_nodes(self) -> list[int]:
        """The nodes that train: of every training domain's, those the method trains (in client order)."""
        nodes = sorted(
            (n for n, d in self.node_domains.items() if d != self.held_out), key=lambda n: self.node_clients[n]
        )
        return self.method.train_nodes(nodes)

    def checkpoint_state(self) -> dict[str, float]:
        """What the strategy learnt during the run and the next round needs, for the checkpoint: nothing (the weights
        and the server optimizer are checkpointed themselves); adaptive DP adds its clipping norm
        (server_app/privacy.py)."""
        return {}

    def load_checkpoint_state(self, state: Mapping[str, float]) -> None:
        """Take back what checkpoint_state() gave, on resume: nothing to take here."""

    def summary(self) -> None:
        log.info(
            "FedClipStrategy (%s): train on %s, hold out %s, %s weighting, %s aggregation (tolerates %d faulty), %s "
            "transport",
            self.method.name,
            sorted(self.node_clients[n] for n in self.train_nodes),
            self.held_out,
            self.weighting,
            self.aggregation,
            self.num_malicious,
            self.transport_dtype,
        )
        if self.fraction_train < 1 or self.fraction_evaluate < 1:
            log.info(
                "each round trains %.0f%% and evaluates at least %.0f%% of the training clients (seeded); held-out "
                "clients: all",
                100 * self.fraction_train,
                100 * self.fraction_evaluate,
            )

    def _sample(self, nodes: list[int], n: int, purpose: str, server_round: int) -> list[int]:
        """n of the nodes, drawn by client name (sample_clients), in client order."""
        if n >= len(nodes):
            return nodes
        by_client = {self.node_clients[node]: node for node in nodes}
        return [by_client[client] for client in sample_clients(list(by_client), n, self.seed, purpose, server_round)]

    def train_sample(self, server_round: int) -> list[int]:
        """The nodes that train in a round: strategy.fraction_train of the training nodes (at least min_train_nodes)."""
        nodes = self.train_nodes
        return self._sample(
            nodes, max(self.min_train_nodes, math.ceil(self.fraction_train * len(nodes))), "train", server_round
        )

    def evaluate_sample(self, server_round: int) -> list[int]:
        """The nodes evaluated on round `server_round`'s weights that get an evaluate message: every held-out node,
        and training nodes that do not train in the next round (their train message carries the evaluation),
        drawn so that at least strategy.fraction_evaluate of the training nodes are evaluated."""
        training = [n for n, d in self.node_domains.items() if d != self.held_out]
        riding = set(self.train_sample(server_round + 1)) if server_round < self.rounds else set()
        rest = [n for n in training if n not in riding]
        wanted = max(0, math.ceil(self.fraction_evaluate * len(training)) - len(riding))
        return [n for n, d in self.node_domains.items() if d == self.held_out] + self._sample(
            rest, wanted, "evaluate", server_round
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[wire.SERVER_ROUND] = server_round
        self.global_state = {k: v.numpy() for k, v in arrays.items()}  # screening measures each update from it
        return self._messages(self.train_sample(server_round), arrays, config, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[wire.SERVER_ROUND] = server_round
        return self._messages(self.evaluate_sample(server_round), arrays, config, MessageType.EVALUATE)

    def _messages(
        self, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord, message_type: str
    ) -> list[Message]:
        """One message per node with the weights the method gives its client, in strategy.transport_dtype (each
        record encoded once)."""
        travelling: dict[int, ArrayRecord] = {}

        def outgoing(record: ArrayRecord) -> ArrayRecord:
            if self.transport_dtype == "float32":
                return record
            if id(record) not in travelling:
                travelling[id(record)] = encode({k: v.numpy() for k, v in record.items()}, self.transport_dtype)
            return travelling[id(record)]

        messages = []
        for node in nodes:
            records = self.method.records(self.node_clients[node], arrays, self.node_domains[node] == self.held_out)
            content = RecordDict({**{key: outgoing(record) for key, record in records.items()}, wire.CONFIG: config})
            messages.append(Message(content, dst_node_id=node, message_type=message_type))
        return messages

    def client(self, message: Message) -> str:
        """The client a reply comes from."""
        return self.node_clients.get(message.metadata.src_node_id, f"node-{message.metadata.src_node_id}")

    def screen(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[tuple[Message, Update]], MetricRecord]:
        """The replies fit to aggregate with their decoded (maybe clipped) updates, and their train metrics
        (screening.py)."""
        base = (lambda client: self.method.update_base(client, self.global_state)) if self.global_state else None
        return screening.screen_updates(
            server_round,
            replies,
            self.client,
            self.template,
            self.transport_dtype,
            lambda client: self.method.max_examples(client, self.client_num_train),
            base,
            self.max_update_norm,
            self.max_norm_ratio,
            self.on_large_update,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global weights (None keeps the current ones) and per-client train metrics: each reply screened,
        then combined."""
        accepted, metrics = self.screen(server_round, replies)
        return self.combine(server_round, [update for _, update in accepted]), metrics

    def combine(self, server_round: int, updates: list[Update]) -> ArrayRecord | None:
        """Screened updates made into the next global weights, by the method with strategy.aggregation."""
        need = max(self.min_train_nodes, min_clients(self.aggregation, self.num_malicious))  # min_clients is 1 or more
        if len(updates) < need:
            log.warning(
                "round %d: %d valid update(s), need %d: the global adapter is unchanged",
                server_round,
                len(updates),
                need,
            )
            return None
        combined = self.method.aggregate(updates, self._rule)
        if combined is None:
            return None
        return ArrayRecord({k: Array(v.astype(self.template[k].dtype)) for k, v in combined.items()})

    def _rule(self, updates: list[Update]) -> dict[str, np.ndarray]:
        """strategy.aggregation over the updates, weighted by strategy.weighting."""
        weights = [u.num_examples if self.weighting == "examples" else 1.0 for u in updates]
        return aggregate_adapters([u.state for u in updates], weights, self.aggregation, self.num_malicious)

    def aggregate_secure(
        self, server_round: int, replies: Iterable[Message], mean_update: dict[str, np.ndarray] | None
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """A SecAgg+ round: the global adapter plus the unmasked mean update (None: the protocol halted), and the
        replies' train metrics.

        No single update reached the server, so none can be screened; the mean is checked like one (checked_tensors).
        """
        metrics, count = MetricRecord(), 0
        for msg in replies:
            if not msg.has_error() and wire.METRICS in msg.content.metric_records:
                screening.add_train_metrics(metrics, self.client(msg), msg.content[wire.METRICS])
                count += 1
        if mean_update is None or count < max(self.min_train_nodes, 2):
            log.warning(
                "round %d: secure aggregation gave no mean (%d update(s) collected): the global adapter is unchanged",
                server_round,
                count,
            )
            return None, metrics
        # SecAgg+ dequantizes to float64
        unmasked = {k: np.empty(v.shape, np.float64) for k, v in self.template.items()}
        # a float64 template takes float64 only: no transport dtype applies
        mean, reason = screening.checked_tensors(mean_update, unmasked, "float32")
        if mean is None:
            log.warning(
                "round %d: the securely aggregated update is unusable (%s): the global adapter is unchanged",
                server_round,
                reason,
            )
            return None, metrics
        combined = {k: (self.global_state[k] + mean[k]).astype(self.template[k].dtype) for k in self.template}
        return ArrayRecord({k: Array(v) for k, v in combined.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """Evaluation metrics keyed `<client>/<metric>`; replies without one are logged and left out
        (screening.evaluation)."""
        metrics = MetricRecord()
        for msg in replies:
            found, reason = screening.evaluation(msg)
            if found is None:
                log.warning(
                    "round %d: evaluation of node %d (%s) left out: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    self.client(msg),
                    reason,
                )
                continue
            for key, value in found.items():
                metrics[f"{self.client(msg)}/{key}"] = value
        return metrics
