"""The server's strategy: who gets which weights each round, and how the screened replies make the next global weights.

The method (common/methods) says what travels, who trains and how updates combine; sampling.py who takes part in a
round; screening.py checks every reply once; aggregation.py combines the trained tensors: the mean or one of Flower's
robust rules. The options it cannot work with are refused by options.py before the first round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from omegaconf import DictConfig

from common import wire
from common.methods.base import Method, Update
from common.transport import encode
from server_app import screening
from server_app.aggregation import aggregate_adapters, min_clients
from server_app.options import refuse_clients_a_round, refuse_strategy
from server_app.sampling import RoundSampling

log = logging.getLogger(__name__)


class FedClipStrategy(RoundSampling, FedAvg):
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
        refuse_strategy(
            method,
            weighting=weighting,
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            aggregation=aggregation,
            num_malicious=num_malicious,
            on_large_update=on_large_update,
            transport_dtype=transport_dtype,
            secagg=secagg,
        )
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
        self.rounds = rounds
        self.aggregation, self.num_malicious = aggregation, int(num_malicious)
        self.max_update_norm, self.max_norm_ratio = max_update_norm, max_norm_ratio
        self.on_large_update = on_large_update
        self.transport_dtype = transport_dtype
        self.secagg = secagg  # SecAgg+ rounds (server_app/secagg.py): only the mean update is seen (aggregate_secure)
        self.client_num_train = client_num_train or {}  # what each client reported at discovery
        self.global_state: dict[str, np.ndarray] = {}  # what the round's updates were trained from (configure_train)
        refuse_clients_a_round(
            aggregation=aggregation,
            num_malicious=self.num_malicious,
            secagg=secagg,
            clients_a_round=len(self.train_sample(1)),  # every round samples as many
            training=len(self.train_nodes),
            fraction_train=fraction_train,
        )

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
            aggregation=options.aggregation,
            num_malicious=options.num_malicious,
            max_update_norm=options.max_update_norm,
            max_norm_ratio=options.max_norm_ratio,
            on_large_update=options.on_large_update,
            transport_dtype=options.transport_dtype,
            secagg=bool(options.secagg.enabled),
            client_num_train=client_num_train,
        )

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
        if self.secagg:
            log.info(
                "SecAgg+: the server sees only the mean update; per-update screening (norm bounds, num-examples) "
                "cannot apply, each coordinate of an update is clipped to strategy.secagg.clipping_range on its client"
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
        """Evaluation metrics keyed `<client>/<metric>` (screening.screen_evaluations)."""
        return screening.screen_evaluations(server_round, replies, self.client)
