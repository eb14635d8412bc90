"""Every reply a server reads is checked here, once, before anything uses it: updates, evaluations, discovery answers.

An update is dropped when it is malformed (wrong keys, shapes or dtype, NaN/Inf, no example count)
or claims more examples than its client holds, and clipped or rejected when it moved too far from
the weights it was trained from: beyond `max_update_norm`, or `max_norm_ratio` times the round's
median update norm (docs/trust.md). Each drop is logged with its node and the reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from common import wire
from common.methods.base import Update
from common.transport import WIRE_DTYPES, array_values, decode_array

log = logging.getLogger(__name__)

ON_LARGE_UPDATE = ("clip", "reject")
REJECTED = (
    "rejected"  # `<client>/rejected` = 1 in a round's train metrics: its update was left out (the report counts them)
)


def checked_tensors(
    arrays: Mapping, template: dict[str, np.ndarray], transport_dtype: str
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """Tensors by name decoded to the template's dtype and checked, or None and why they cannot be used.

    Each must come in the transport dtype or in the template's own (float32: what Flower's DP
    wrappers hand on after clipping, and SecAgg+'s unmasked mean).
    """
    if set(arrays.keys()) != set(template):
        missing, extra = sorted(set(template) - set(arrays.keys())), sorted(set(arrays.keys()) - set(template))
        return None, f"tensor names differ (missing {missing}, unexpected {extra})"
    state = {}
    for key, expected in template.items():
        try:
            # the decoded bytes, not the declared shape
            array = arrays[key] if isinstance(arrays[key], np.ndarray) else array_values(arrays[key])
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


def checked_update(
    content: RecordDict, template: dict[str, np.ndarray], transport_dtype: str
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """A training reply's tensors, decoded and checked (checked_tensors), with a usable example count; or None and
    why not."""
    if wire.ARRAYS not in content.array_records:
        return None, f"no {wire.ARRAYS!r} record"
    if wire.METRICS not in content.metric_records or wire.NUM_EXAMPLES not in content[wire.METRICS]:
        return None, f"no {wire.METRICS!r} record with {wire.NUM_EXAMPLES!r}"
    num_examples = content[wire.METRICS][wire.NUM_EXAMPLES]
    if not isinstance(num_examples, int | float) or not 0 < num_examples < math.inf:
        return None, f"{wire.NUM_EXAMPLES} must be a positive finite number, got {num_examples!r}"
    return checked_tensors(content[wire.ARRAYS], template, transport_dtype)


def update_norm(state: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> float:
    """L2 distance between weights and those they were trained from, over all their tensors."""
    return math.sqrt(sum(float(np.sum(np.square(state[k].astype(np.float64) - base[k]))) for k in base))


def clipped(
    state: dict[str, np.ndarray], base: dict[str, np.ndarray], norm: float, bound: float
) -> dict[str, np.ndarray]:
    """The weights moved back towards `base` until their update has L2 norm `bound`."""
    scale = bound / norm
    return {k: (base[k] + scale * (state[k].astype(np.float64) - base[k])).astype(np.float32) for k in base}


def add_train_metrics(metrics: MetricRecord, client: str, reply_metrics: MetricRecord) -> None:
    """A train reply's own metrics as `<client>/<metric>`; the evaluation it carries is read by `evaluation`."""
    for key, value in reply_metrics.items():
        if not key.startswith(wire.EVALUATION_PREFIX):
            metrics[f"{client}/{key}"] = value


def screen_updates(
    server_round: int,
    replies: Iterable[Message],
    client_of: Callable[[Message], str],
    template: dict[str, np.ndarray],
    transport_dtype: str,
    max_examples: Callable[[str], int | None],
    base: Callable[[str], dict[str, np.ndarray]] | None,
    max_update_norm: float | None,
    max_norm_ratio: float | None,
    on_large_update: str,
) -> tuple[list[tuple[Message, Update]], MetricRecord]:
    """The replies fit to aggregate, in client order, each with its decoded (maybe clipped) update, and their train
    metrics.

    Each update is measured against `base(client)`, the weights it was trained from (base None: not
    known, no round was configured); the round's median norm needs 3 updates or more to be a reference.
    """
    accepted, metrics = [], MetricRecord()
    # by client, not in the order replies arrived: the same updates always sum in the same order, so a seed gives the
    # same global weights to the last bit however the network or Ray scheduled the clients
    for msg in sorted(replies, key=lambda msg: (client_of(msg), msg.metadata.src_node_id)):
        node, client = msg.metadata.src_node_id, client_of(msg)
        state, reason = (
            (None, msg.error.reason) if msg.has_error() else checked_update(msg.content, template, transport_dtype)
        )
        if state is not None:
            examples = msg.content[wire.METRICS][wire.NUM_EXAMPLES]
            if (limit := max_examples(client)) is not None and examples > limit:
                state, reason = (
                    None,
                    f"{wire.NUM_EXAMPLES} {examples} exceeds the {limit} training examples it reported at discovery",
                )
        if state is None:
            log.warning("round %d: dropped the update of node %d (%s): %s", server_round, node, client, reason)
            if (
                not msg.has_error()
            ):  # an error reply is a lost client (the report counts those from the traffic), not a rejected update
                metrics[f"{client}/{REJECTED}"] = 1
            continue
        accepted.append((msg, Update(client, state, float(examples))))
        add_train_metrics(metrics, client, msg.content[wire.METRICS])
    if base is None or not accepted:
        return accepted, metrics
    bases = [base(update.client) for _, update in accepted]
    norms = [update_norm(update.state, b) for (_, update), b in zip(accepted, bases)]
    bounds = [max_update_norm] if max_update_norm is not None else []
    if max_norm_ratio is not None and len(norms) >= 3:
        bounds.append(max_norm_ratio * float(np.median(norms)))
    bound = min(bounds, default=math.inf)
    kept = []
    for (msg, update), b, norm in zip(accepted, bases, norms):
        metrics[f"{update.client}/update-norm"] = norm
        if norm > bound:
            log.warning(
                "round %d: update of node %d (%s) has norm %.4g > %.4g: %s",
                server_round,
                msg.metadata.src_node_id,
                update.client,
                norm,
                bound,
                "clipped" if on_large_update == "clip" else "rejected",
            )
            if on_large_update == "reject":
                metrics[f"{update.client}/{REJECTED}"] = 1
                continue
            update.state = clipped(update.state, b, norm, bound)
        kept.append((msg, update))
    return kept, metrics


def evaluation(msg: Message) -> tuple[dict | None, str | None]:
    """The evaluation metrics a reply carries (a train reply's under EVALUATION_PREFIX), or None and why there are
    none."""
    if msg.has_error():
        return None, msg.error.reason
    if wire.METRICS not in msg.content.metric_records:
        return None, f"no {wire.METRICS!r} record"
    fused = msg.metadata.message_type == MessageType.TRAIN
    # a train reply's, under the prefix; an evaluate reply's, without
    found = {
        k.removeprefix(wire.EVALUATION_PREFIX): v
        for k, v in msg.content[wire.METRICS].items()
        if k.startswith(wire.EVALUATION_PREFIX) == fused
    }
    if not found:
        return None, "its train reply carries no evaluation" if fused else "no evaluation metrics"
    return found, None


def screen_evaluations(
    server_round: int, replies: Iterable[Message], client_of: Callable[[Message], str]
) -> MetricRecord:
    """The evaluation metrics of the replies, keyed `<client>/<metric>`; a reply without one is logged and left out."""
    metrics = MetricRecord()
    for msg in replies:
        found, reason = evaluation(msg)
        if found is None:
            log.warning(
                "round %d: evaluation of node %d (%s) left out: %s",
                server_round,
                msg.metadata.src_node_id,
                client_of(msg),
                reason,
            )
            continue
        for key, value in found.items():
            metrics[f"{client_of(msg)}/{key}"] = value
    return metrics


def query_answer(msg: Message) -> str | None:
    """Why a discovery answer cannot be used (None: it can); an idle node's answer is usable."""
    if msg.has_error():
        return f"the query failed: {msg.error.reason}"
    content = msg.content
    if wire.INFO in content.config_records and "idle" in content[wire.INFO]:
        return None
    if (
        wire.INFO not in content.config_records
        or wire.METRICS not in content.metric_records
        or not set(wire.QUERY_METRICS) <= set(content[wire.METRICS])
    ):
        return f"its query reply lacks {wire.INFO!r} or the metrics {sorted(wire.QUERY_METRICS)}"
    return None
