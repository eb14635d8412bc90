"""Secure aggregation on the client (strategy.secagg.enabled): Flower's secaggplus_mod around the train handler.

SecAgg+ messages carry its config record; every other message passes untouched. In the stage that
trains, Flower's mod hands the handler the legacy FitIns layout and reads a FitRes back, so this mod
translates: the FitIns adapter becomes the handler's `arrays`, and the handler's trained adapter
becomes the update (trained - received) that secaggplus_mod clips to its clipping range per
coordinate, quantizes, weights and masks. The reply keeps the handler's metrics (its evaluation,
train loss, and `secagg-clipped`: the share of coordinates the clipping range cut); its arrays are
emptied by Flower's mod, so no update leaves the node in the clear.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.recorddict_compat import arrayrecord_to_parameters, parameters_to_arrayrecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from common import wire
from common.transport import decode


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod for the messages of a SecAgg+ round; the handler alone for every other message."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)

    def train_step(message: Message, context: Context) -> Message:
        reply = call_next(as_train_message(message), context)
        if reply.has_error():  # the node cannot take part (client_app/node.py): secaggplus_mod reads no error reply
            raise RuntimeError(reply.error.reason)
        return as_fitres(message, reply, context)

    return secaggplus_mod(msg, ctxt, train_step)


def as_train_message(msg: Message) -> Message:
    """The FitIns a SecAgg+ round trains from, as the train handler reads a message: `arrays` (named) and `config`."""
    config = msg.content["fitins.config"]
    tensors = parameters_to_ndarrays(arrayrecord_to_parameters(msg.content["fitins.parameters"], keep_input=True))
    arrays = ArrayRecord({str(k): Array(t) for k, t in zip(config[wire.ADAPTER_KEYS], tensors, strict=True)})
    # one of each, as Flower's DP clipping mods require
    msg.content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: config})
    return msg


def as_fitres(msg: Message, reply: Message, ctxt: Context) -> Message:
    """The handler's reply in the FitRes layout secaggplus_mod reads: the update and its weight, nothing else in the
    clear."""
    config = msg.content[wire.CONFIG]
    sent, trained = decode(msg.content[wire.ARRAYS]), decode(reply.content.array_records.pop(wire.ARRAYS))
    update = [(trained[k] - sent[k]).numpy() for k in config[wire.ADAPTER_KEYS]]
    examples = reply.content[wire.METRICS][wire.NUM_EXAMPLES]
    weight = 1 if config[wire.SECAGG_WEIGHTING] == "equal" else int(examples)
    protocol = ctxt.state.config_records[RECORD_KEY_STATE]  # what the setup stage said
    # secaggplus_mod clips weight / max_weight x update
    limit = float(protocol["clipping_range"]) * float(protocol["max_weight"]) / weight
    reply.content[wire.METRICS]["secagg-clipped"] = float(
        sum(np.sum(np.abs(u) > limit) for u in update) / sum(u.size for u in update)
    )
    reply.content["fitres.parameters"] = parameters_to_arrayrecord(ndarrays_to_parameters(update), keep_input=False)
    reply.content["fitres.num_examples"] = MetricRecord({"num_examples": weight})
    reply.content["fitres.metrics"] = ConfigRecord()
    reply.content["fitres.status"] = ConfigRecord({"code": 0, "message": "Success"})
    return reply
