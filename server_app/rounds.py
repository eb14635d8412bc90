"""The round schedule: one exchange a round, in which round r's training also carries the evaluation of round r-1's
weights.

Round r pushes the train messages of round r (each also asks its node to evaluate the weights it
brings: round r-1's) together with evaluate messages for the nodes that do not train (held out, or
not sampled), in one push. Its replies give round r-1's row of the report and round r's updates.
After the last round one more exchange evaluates the final weights. With strategy.secagg.enabled a
round's training takes SecAgg+'s four exchanges (server_app/secagg.py); its replies are split and
aggregated the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from omegaconf import DictConfig

from common import wire
from common.fingerprint import app_code_fingerprint
from server_app.checkpoint import save_checkpoint
from server_app.federation import Federation, FederationError
from server_app.report import RunReport, last_line
from server_app.secagg import secure_exchange
from server_app.server_optimizer import ServerOptimizer
from server_app.strategy import FedClipStrategy


@dataclass
class Trained:
    """Weights whose evaluation rides on the next exchange: those after round `round`, with that round's train
    metrics."""

    round: int
    arrays: ArrayRecord
    train: MetricRecord
    started: float  # when the round that trained them started


def split_replies(sent: list[Message], replies: list[Message]) -> tuple[list[Message], list[Message]]:
    """(replies to the messages that brought weights to train, replies to evaluate messages) of one exchange.

    SecAgg+'s protocol stages send train messages without weights: their replies are in neither list.
    """
    train_ids = {
        m.metadata.message_id for m in sent if m.metadata.message_type == MessageType.TRAIN and m.content.array_records
    }
    evaluate_ids = {m.metadata.message_id for m in sent if m.metadata.message_type == MessageType.EVALUATE}
    return (
        [r for r in replies if r.metadata.reply_to_message_id in train_ids],
        [r for r in replies if r.metadata.reply_to_message_id in evaluate_ids],
    )


def failed_clients(sent: list[Message], replies: list[Message], node_clients: dict[int, str]) -> dict[str, str]:
    """The clients of an exchange that failed, and why: an error reply's reason (an exception, an import error in the
    ClientApp), or no reply (its node was lost, or did not answer in time)."""
    answered = {r.metadata.reply_to_message_id: r for r in replies}
    failed = {}
    for msg in sent:
        node = msg.metadata.dst_node_id
        reply = answered.get(msg.metadata.message_id)
        if reply is None:
            failed[node_clients.get(node, f"node {node}")] = "no reply: its node was lost or did not answer in time"
        elif reply.has_error():
            failed[node_clients.get(node, f"node {node}")] = reply.error.reason
    return failed


def stop_if_too_few_trained(
    server_round: int, train: list[Message], failed: dict[str, str], cfg: DictConfig, node_clients: dict[int, str]
) -> None:
    """Stop the run (FederationError) when fewer than strategy.min_train_fraction of a round's training clients
    replied without an error: a run that trains on what is left would report numbers of a federation it is not."""
    training = {node_clients.get(m.metadata.dst_node_id) for m in train}
    lost = sorted(c for c in failed if c in training)
    fraction = float(cfg.strategy.min_train_fraction)
    if len(training) - len(lost) < fraction * len(training):
        raise FederationError(
            f"round {server_round}: {len(lost)} of {len(training)} training clients failed ({', '.join(lost)}; "
            f"{lost[0]}: {last_line(failed[lost[0]])}), fewer than strategy.min_train_fraction={fraction:g} of them "
            "trained: the run stops. Every failure is in the log above and in summary.json's failed_clients"
        )


def run_rounds(
    grid: Grid,
    context: Context,
    cfg: DictConfig,
    federation: Federation,
    strategy: FedClipStrategy,
    report: RunReport,
    optimizer: ServerOptimizer,
    arrays: ArrayRecord,
    first_round: int,
    last_round: int,
) -> ArrayRecord:
    """Rounds first_round .. last_round from `arrays`, then the last evaluation; returns the final weights.

    The strategy's combined weights become the next global ones through the server optimizer (the mean: as they are).
    The weights to start from are evaluated first (round 0: zero-shot), unless the report already has their row (a
    resumed run).
    """
    trained = None if report.rows else Trained(first_round - 1, arrays, MetricRecord(), time.time())
    config = {
        wire.RUN_CONFIG: federation.run_config,
        wire.RUN_KEY: report.run_key,
        wire.APP_CODE: app_code_fingerprint(),
    }
    for server_round in range(first_round, last_round + 2):
        started, final = time.time(), server_round > last_round
        federation.refresh()
        evaluation = {wire.EVALUATE_ROUND: trained.round, wire.ZERO_SHOT: trained.round == 0} if trained else {}
        train = (
            []
            if final
            else list(strategy.configure_train(server_round, arrays, ConfigRecord({**config, **evaluation}), grid))
        )
        evaluate = []
        if trained:  # the nodes that do not train now get their evaluation in the same push
            training = {m.metadata.dst_node_id for m in train}
            weights = trained.arrays if trained.round else ArrayRecord()  # round 0 is zero-shot
            evaluate = [
                m
                for m in strategy.configure_evaluate(
                    trained.round, weights, ConfigRecord({**config, **evaluation}), grid
                )
                if m.metadata.dst_node_id not in training
            ]
        secure = strategy.secagg and bool(train)
        if secure:
            sent, replies, mean_update = secure_exchange(
                grid, federation.exchange, train, evaluate, cfg.strategy, strategy.client_num_train.values(), context
            )
        else:
            sent, replies, mean_update = train + evaluate, federation.exchange(train + evaluate), None
        train_replies, eval_replies = split_replies(sent, replies)
        failed = failed_clients(sent, replies, federation.node_clients)
        report.add_failures("last evaluation" if final else str(server_round), failed)
        if final:  # the last evaluation's exchange belongs to the last round's row
            report.traffic.count(federation.node_clients, sent, replies)
        if trained:
            metrics = strategy.aggregate_evaluate(trained.round, eval_replies + train_replies)
            seconds = ((time.time() if final else started) - trained.started) if trained.round else 0.0
            report.add_round(trained.round, trained.train, metrics, seconds, trained.arrays)
            # the state round trained.round + 1 starts from
            save_checkpoint(report, trained.arrays, optimizer, strategy.checkpoint_state())
        if final:
            break
        stop_if_too_few_trained(server_round, train, failed, cfg, federation.node_clients)
        report.traffic.count(federation.node_clients, sent, replies)
        if secure:
            new_arrays, train_metrics = strategy.aggregate_secure(server_round, train_replies, mean_update)
        else:
            new_arrays, train_metrics = strategy.aggregate_train(server_round, train_replies)
        arrays = optimizer.step(server_round, arrays, new_arrays) if new_arrays is not None else arrays
        trained = Trained(server_round, arrays, train_metrics, started)
    return arrays
