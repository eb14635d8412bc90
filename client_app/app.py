"""The FedCLIP ClientApp: one client's images (a domain, or a share of one), a frozen CLIP, and what the run's
method trains.

A node builds its local data (configuration, images, cached features, split) on a run's first
message and reuses it for every later message this process handles (client_app/node.py). One
message a round does the work: a train message also carries the evaluation of the weights it brings
(the last round's global ones). What a message makes the client do is the method's (common/methods).
"""

from __future__ import annotations

import functools
import logging
import time

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client_app import kept_state
from client_app.clipping import dp_clipping_mod
from client_app.node import KEPT, NoClient, NodeUnusable, local_data
from client_app.secagg import secagg_mod
from common import wire
from common.config import config_from_message, setup_logging
from common.features import images_encoded
from common.fingerprint import model_files_fingerprint
from common.local_data import LocalData
from common.methods.base import Method, load_method
from common.model import model_name_or_path
from common.transport import encode

setup_logging()
log = logging.getLogger(__name__)

app = ClientApp()


def method_of(message: Message) -> Method:
    """The method of the message's run (building it takes about a millisecond: once, not per message)."""
    return _method(str(message.content[wire.CONFIG][wire.RUN_CONFIG]))


# one method object for every node of this process in the run (a Local method keeps theirs)
@functools.lru_cache(maxsize=KEPT)
def _method(run_config: str) -> Method:
    return load_method(config_from_message(run_config))


def _unusable(message: Message, err: NodeUnusable) -> Message:
    """The error reply of a node that cannot take part: the server groups the nodes that failed for the same reason."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=message)


def _local(message: Message, context: Context) -> tuple[LocalData, int]:
    """The node's local data, and the images that building it encoded now (0 when kept or cached): counted in the reply
    to whichever message found them missing (under Ray, a client's query and its training may run in different
    processes, on different machines)."""
    before = images_encoded()
    local = local_data(message, context)
    return local, images_encoded() - before


def _reply(message: Message, local: LocalData, records: dict) -> Message:
    info = ConfigRecord({"domain": local.domain, "client": local.client, "classes": local.images.classes})
    return Message(content=RecordDict({**records, wire.INFO: info}), reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which domain this node holds and how much data; encodes the features once.

    A node with no client in this run says so (`idle`), and the server leaves it alone.
    """
    try:
        local, encoded = _local(message, context)
    except NoClient as idle:
        return Message(
            content=RecordDict({wire.INFO: ConfigRecord({"idle": f"no data in this run: {idle}"})}), reply_to=message
        )
    except NodeUnusable as err:
        return _unusable(message, err)
    metrics = {
        wire.FEATURE_DIM: local.feats.image.shape[1],
        "num-images": len(local.feats.labels),
        "num-skipped": len(local.feats.skipped),
        wire.NUM_TRAIN: len(local.split.train),
        "num-val": len(local.split.val),
        "num-test": len(local.split.test),
        wire.IMAGES_ENCODED: encoded,
    }
    reply = _reply(message, local, {wire.METRICS: MetricRecord(metrics)})
    reply.content[wire.INFO]["model-fingerprint"] = model_files_fingerprint(
        model_name_or_path(local.cfg), local.cfg.cache_dir
    )
    return reply


# Flower's SecAgg+ and client-side DP clipping, when the server asks for them
@app.train(mods=[secagg_mod, dp_clipping_mod])
def train(message: Message, context: Context) -> Message:
    """Evaluate the received weights if asked (config `evaluate-round`), then train from them locally.

    The weights a round-r train message brings are round r-1's global ones, so their evaluation rides
    along: one exchange per round.
    """
    try:
        local, encoded = _local(message, context)
    except NodeUnusable as err:
        return _unusable(message, err)
    if local.held_out:
        raise RuntimeError(f"domain {local.domain!r} is held out and must never train")
    method, config = method_of(message), message.content[wire.CONFIG]
    server_round = int(config[wire.SERVER_ROUND])
    key, kept = kept_state.restored(config, context.state, local, server_round)
    evaluation = {}
    if wire.EVALUATE_ROUND in config:
        evaluation = method.evaluate(
            local,
            message.content,
            kept,
            int(config[wire.EVALUATE_ROUND]),
            bool(config.get(wire.ZERO_SHOT, False)),
        )
    t0 = time.time()
    trained, metrics = method.train(local, message.content, kept, server_round)
    kept_state.keep(context.state, local, key, server_round, kept)
    metrics = {
        **metrics,
        "train-seconds": time.time() - t0,
        wire.IMAGES_ENCODED: int(metrics.get(wire.IMAGES_ENCODED, 0)) + encoded,
        **{wire.EVALUATION_PREFIX + name: value for name, value in evaluation.items()},
    }
    arrays = encode(trained, local.cfg.strategy.transport_dtype)
    return _reply(message, local, {wire.METRICS: MetricRecord(metrics), wire.ARRAYS: arrays})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluation only: the held-out nodes, clients that do not train this round, and the run's last evaluation,
    after which a client with weights of its own writes them to the site's folder."""
    try:
        local, encoded = _local(message, context)
    except NodeUnusable as err:
        return _unusable(message, err)
    method, config = method_of(message), message.content[wire.CONFIG]
    server_round = int(config.get(wire.SERVER_ROUND, 0))
    key, kept = kept_state.restored(config, context.state, local, server_round + 1)  # what it kept after this round
    metrics = method.evaluate(local, message.content, kept, server_round, bool(config.get(wire.ZERO_SHOT, False)))
    metrics[wire.IMAGES_ENCODED] = int(metrics.get(wire.IMAGES_ENCODED, 0)) + encoded
    last = server_round == int(local.cfg.training.rounds) and not local.held_out
    if key is not None and last and (weights := method.site_weights(message.content, kept)) is not None:
        kept_state.save_site_weights(local, key, method.weights_name, weights)
    return _reply(message, local, {wire.METRICS: MetricRecord(metrics)})
