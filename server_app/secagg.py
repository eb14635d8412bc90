"""Secure aggregation: one round of Flower's SecAgg+ run from this app's message-API main loop.

With strategy.secagg.enabled the server never sees a client's update, only their (weighted) mean:
each client sends its update to the adapter masked, the masks cancel in the sum. Flower 1.28 ships
SecAgg+ for its legacy strategy API only: `SecAggPlusWorkflow` wants a `LegacyContext` whose strategy
answers `configure_fit` / `aggregate_fit`. This module is the bridge, built of Flower's own pieces:
a legacy `FedAvg` that hands out the round's train messages as `FitIns` and keeps the unmasked
result, `GridClientProxy`s in a `SimpleClientManager`, and a grid whose `send_and_receive` is the
app's own exchange (fast polling, lost nodes named). The clients answer with Flower's
`secaggplus_mod` (client_app/secagg.py). A round takes four exchanges instead of one (setup, share
keys, collect masked vectors, unmask); the round's evaluate-only messages ride on the first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from omegaconf import DictConfig

from common import wire

log = logging.getLogger(__name__)

Send = Callable[[list[Message]], list[Message]]  # the app's exchange: messages out, the nodes' replies back


class SecureRound(LegacyFedAvg):
    """The legacy strategy SecAggPlusWorkflow asks: this round's train messages as FitIns, and the unmasked mean
    kept."""

    def __init__(self, fitins: list[tuple[ClientProxy, FitIns]]) -> None:
        super().__init__()
        self.fitins = fitins
        self.mean_update: list[np.ndarray] | None = None  # None until the workflow has unmasked the sum

    def configure_fit(self, server_round, parameters, client_manager) -> list[tuple[ClientProxy, FitIns]]:
        return self.fitins

    def aggregate_fit(
        self, server_round, results: list[tuple[ClientProxy, FitRes]], failures
    ) -> tuple[Parameters | None, dict]:
        """Every result carries the same unmasked mean (the workflow put it there); no update of one client exists
        here."""
        if results:
            self.mean_update = parameters_to_ndarrays(results[0][1].parameters)
        return (results[0][1].parameters if results else None), {}


class ExchangeGrid:
    """What the workflow sends goes through the app's exchange; `riders` go out with its first push, and every
    message and reply is kept for the traffic count."""

    def __init__(self, send: Send, riders: list[Message]) -> None:
        self.send, self.riders = send, riders
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        batch, self.riders = list(messages) + self.riders, []
        replies = self.send(batch)
        self.sent += batch
        self.replies += replies
        own = {m.metadata.message_id for m in batch if m.metadata.message_type == MessageType.TRAIN}
        return [r for r in replies if r.metadata.reply_to_message_id in own]


def share_count(clients: int, most: int) -> int | float:
    """SecAggPlusWorkflow's num_shares: every client of the round (1.0) up to `most`, else `most` made odd (Flower
    wants it odd).

    Each client masks against and shares its secrets with this many neighbours, so a round's cost grows
    as clients x shares rather than clients^2 (Bell et al. 2020 take O(log n) neighbours).
    """
    return 1.0 if clients <= most else most | 1


def secure_exchange(
    grid: Grid,
    send: Send,
    train: list[Message],
    others: list[Message],
    strategy_cfg: DictConfig,
    num_train: Iterable[int],
    context: Context,
) -> tuple[list[Message], list[Message], dict[str, np.ndarray] | None]:
    """One SecAgg+ round for the train messages (and the evaluate-only `others`, sent alongside its first stage).

    Each train message's adapter and config go out as FitIns (the adapter's tensor names in the config);
    a client answers with its update masked, weighted by 1 (strategy.weighting=equal) or its examples
    (at most the largest of `num_train`, the clients' train splits: SecAgg+'s max_weight).
    Returns every message sent, every reply (the round loop splits them as any exchange's: the replies to the
    stage that brings the adapter carry the train metrics, no arrays), and the mean update by tensor name
    (None when the protocol halted: too few nodes left).
    """
    # method=fedclip: every node trains from the same global adapter, serialized once
    arrays = train[0].content[wire.ARRAYS]
    parameters, keys = ndarrays_to_parameters([a.numpy() for a in arrays.values()]), list(arrays.keys())
    proxies, fitins = SimpleClientManager(), []
    for msg in train:
        proxy = GridClientProxy(msg.metadata.dst_node_id, grid, context.run_id)
        proxies.register(proxy)
        config = {**msg.content[wire.CONFIG], wire.ADAPTER_KEYS: keys, wire.SECAGG_WEIGHTING: strategy_cfg.weighting}
        fitins.append((proxy, FitIns(parameters, config)))
    strategy = SecureRound(fitins)
    legacy = LegacyContext(context, strategy=strategy, client_manager=proxies)
    legacy.state[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: int(train[0].content[wire.CONFIG][wire.SERVER_ROUND])}
    )
    legacy.state[MAIN_PARAMS_RECORD] = ArrayRecord()  # the workflow reads it; configure_fit ignores it
    options = strategy_cfg.secagg
    max_weight = 1.0 if strategy_cfg.weighting == "equal" else float(max(num_train, default=1))
    workflow = SecAggPlusWorkflow(
        share_count(len(train), int(options.num_shares)),
        float(options.reconstruction_threshold),
        max_weight=max_weight,
        clipping_range=float(options.clipping_range),
        quantization_range=int(options.quantization_range),
    )
    channel = ExchangeGrid(send, others)
    flower, level = logging.getLogger("flwr"), logging.getLogger("flwr").level
    flower.setLevel(logging.WARNING)  # the workflow's four INFO lines a round; the round table says what happened
    try:
        workflow(channel, legacy)  # type: ignore[arg-type] - the workflow only calls send_and_receive
    finally:
        flower.setLevel(level)
    if channel.riders:  # it halted before its first exchange: the evaluations go out all the same
        channel.send_and_receive([])
    mean = None if strategy.mean_update is None else dict(zip(keys, strategy.mean_update))  # in the order sent
    return channel.sent, channel.replies, mean
