"""Central differential privacy: Flower's DP strategy wrappers around FedClipStrategy, and the privacy spent.

strategy.dp.side=server clips every update on the server, client clips on the clients (Flower's
clipping mods, client_app/clipping.py); strategy.dp.clipping=fixed or adaptive picks Flower's
fixed- or adaptive-clipping wrapper. Either way the server adds Gaussian noise of standard deviation
noise_multiplier x clipping_norm / clients to the mean of the clipped updates: each round is a
Gaussian mechanism of that noise multiplier on one client's whole data (Flower's adaptive wrappers
split it between the update and the clipped-count query so that the pair keeps it, Andrew et
al. 2021; the direction in which they move the norm is corrected here: TowardsTargetQuantile).
The privacy spent after t rounds is taken from dp-accounting's RDP accountant, composing t such
rounds; a round in which nothing was released counts as spent (an upper bound).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import dp_accounting
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.differential_privacy_constants import KEY_NORM_BIT
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from omegaconf import DictConfig

from common import wire
from common.methods.base import Update
from server_app import screening
from server_app.options import refuse_privacy
from server_app.strategy import FedClipStrategy

log = logging.getLogger(__name__)

CLIPPING_NORM_STATE = "dp-clipping-norm"  # adaptive clipping's norm in the checkpoint (server_app/checkpoint.py)


def privacy_spent(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` Gaussian releases of this noise multiplier (every client in every round)."""
    if rounds == 0:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


class ScreenedReplies:
    """The FedCLIP strategy as Flower's DP wrapper calls it: the replies reaching it were screened before Flower
    clipped them (ScreenedPrivacy), so they are combined, never screened twice."""

    def __init__(self, strategy: FedClipStrategy) -> None:
        self.strategy = strategy

    def __getattr__(self, name: str):
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord]:
        updates = [
            Update(
                self.strategy.client(msg),
                {k: v.numpy() for k, v in msg.content[wire.ARRAYS].items()},
                float(msg.content[wire.METRICS][wire.NUM_EXAMPLES]),
            )
            for msg in replies
        ]
        return self.strategy.combine(server_round, updates), MetricRecord()


class ScreenedPrivacy:
    """What FedCLIP adds to Flower's DP wrappers, ahead of them in the class order.

    Replies are screened once and decoded (16-bit -> float32) before Flower clips them (Flower's
    clipping would crash on a wrong shape), the noise is calibrated to the clients whose updates
    are averaged this round, and the privacy spent so far is added to the train metrics as `dp-epsilon`.
    """

    strategy: ScreenedReplies
    num_sampled_clients: int
    delta: float
    total_noise_multiplier: float

    def __getattr__(self, name: str):
        """Everything else (train_nodes, node_clients, ...) is the wrapped strategy's, so the main loop need not
        know about DP."""
        if name == "strategy":
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def spent(self, server_round: int) -> float:
        """Epsilon after `server_round` rounds; a round that released nothing counts too (an upper bound)."""
        return privacy_spent(self.total_noise_multiplier, server_round, self.delta)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, screened_metrics = self.strategy.screen(server_round, replies)
        if isinstance(
            self, DifferentialPrivacyClientSideAdaptiveClipping
        ):  # Flower's wrapper raises if one lacks the norm bit
            for msg, update in [a for a in accepted if KEY_NORM_BIT not in a[0].content[wire.METRICS]]:
                log.warning(
                    "round %d: dropped the update of node %d (%s): no %r from adaptiveclipping_mod",
                    server_round,
                    msg.metadata.src_node_id,
                    update.client,
                    KEY_NORM_BIT,
                )
                screened_metrics[f"{update.client}/{screening.REJECTED}"] = 1
            accepted = [a for a in accepted if KEY_NORM_BIT in a[0].content[wire.METRICS]]
        arrays = None
        if accepted:
            for msg, update in accepted:
                msg.content[wire.ARRAYS] = ArrayRecord({k: Array(v) for k, v in update.state.items()})
            self.num_sampled_clients = len(accepted)  # the noise's std is noise_multiplier x clip / clients averaged
            # Flower's metrics are ScreenedReplies' (none): the round's are the screened replies' (update norms
            # before clipping)
            arrays, _ = super().aggregate_train(server_round, [msg for msg, _ in accepted])  # type: ignore[misc]
        else:  # nothing to release; Flower's adaptive wrappers would divide the clipped count by zero replies
            log.warning(
                "round %d: no update to aggregate: the global adapter and the clipping norm are unchanged", server_round
            )
        screened_metrics["dp-epsilon"] = self.spent(server_round)
        return arrays, screened_metrics

    def aggregate_secure(
        self, server_round: int, replies: Iterable[Message], mean_update: dict | None
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """SecAgg+ with client-side fixed clipping: Flower's noise added to the unmasked mean of the clipped updates."""
        replies = [r for r in replies if not r.has_error()]
        arrays, metrics = self.strategy.aggregate_secure(server_round, replies, mean_update)
        # the updates in the sum (the noise is added only when there are 2 or more)
        self.num_sampled_clients = len(replies)
        if arrays is not None:  # the noise of Flower's client-side fixed-clipping wrapper
            arrays = self._add_noise_to_aggregated_arrays(arrays)  # type: ignore[attr-defined]
        metrics["dp-epsilon"] = self.spent(server_round)
        return arrays, metrics


class TowardsTargetQuantile:
    """The clipping norm's update of Andrew et al. 2021, in the sign that fits what Flower's adaptive wrappers count.

    Flower 1.28's adaptive wrappers (and its adaptiveclipping_mod) count an update in the clipped-count
    query when it *was* clipped (`norm_bit`: scaled down), yet apply the paper's rule for the count of
    updates that were *not*, C <- C exp(-lr (fraction - target)): a norm that clips every update shrinks
    further, one that clips none grows, and the norm runs away from target_clipped_quantile instead of
    towards it. With the clipped fraction the paper's rule is C <- C exp(lr (fraction - target)). The
    noisy count is the same query (one bit per client, the same noise), so the privacy is unchanged.
    """

    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))

    def checkpoint_state(self) -> dict[str, float]:
        """The clipping norm the next round clips to: learnt over the rounds, so a resumed run must go on with it."""
        return {CLIPPING_NORM_STATE: self.clipping_norm}

    def load_checkpoint_state(self, state: Mapping[str, float]) -> None:
        if CLIPPING_NORM_STATE not in state:
            log.warning(
                "the checkpoint holds no adaptive clipping norm (its run did not clip adaptively): the norm starts "
                "again "
                "from strategy.dp.clipping_norm=%s",
                self.clipping_norm,
            )
            return
        self.clipping_norm = float(state[CLIPPING_NORM_STATE])
        log.info("adaptive clipping goes on from the checkpoint's clipping norm %.6g", self.clipping_norm)


class ServerSideFixedClipping(ScreenedPrivacy, DifferentialPrivacyServerSideFixedClipping):
    pass


class ServerSideAdaptiveClipping(ScreenedPrivacy, TowardsTargetQuantile, DifferentialPrivacyServerSideAdaptiveClipping):
    pass


class ClientSideFixedClipping(ScreenedPrivacy, DifferentialPrivacyClientSideFixedClipping):
    pass


class ClientSideAdaptiveClipping(ScreenedPrivacy, TowardsTargetQuantile, DifferentialPrivacyClientSideAdaptiveClipping):
    pass


WRAPPERS = {
    ("server", "fixed"): ServerSideFixedClipping,
    ("server", "adaptive"): ServerSideAdaptiveClipping,
    ("client", "fixed"): ClientSideFixedClipping,
    ("client", "adaptive"): ClientSideAdaptiveClipping,
}


def with_privacy(strategy: FedClipStrategy, dp: DictConfig) -> Strategy:
    """The strategy wrapped in Flower's central-DP wrapper that strategy.dp asks for (itself when dp.side is null)."""
    if dp.side is None:
        return strategy
    refuse_privacy(
        dp,
        strategy.method,
        aggregation=strategy.aggregation,
        weighting=strategy.weighting,
        transport_dtype=strategy.transport_dtype,
        secagg=strategy.secagg,
    )
    clients = len(strategy.train_nodes)
    if dp.clipping == "fixed":
        wrapper = WRAPPERS[dp.side, "fixed"](ScreenedReplies(strategy), dp.noise_multiplier, dp.clipping_norm, clients)
    else:
        wrapper = WRAPPERS[dp.side, "adaptive"](
            ScreenedReplies(strategy),
            dp.noise_multiplier,
            clients,
            dp.clipping_norm,
            dp.target_clipped_quantile,
            dp.clip_norm_lr,
            dp.clipped_count_stddev,
        )
    wrapper.delta, wrapper.total_noise_multiplier = float(dp.delta), float(dp.noise_multiplier)
    log.info(
        "central DP (%s side, %s clipping): noise multiplier %s, clipping norm %s, delta %s",
        dp.side,
        dp.clipping,
        dp.noise_multiplier,
        dp.clipping_norm,
        dp.delta,
    )
    return wrapper
