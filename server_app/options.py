"""Every refusal of an option combination lives here, so a reader finds them all in one place.

The ServerApp calls `refuse_options` once, before the first message: the run's options against each other and
against what its method says of itself (common/methods/base.py: `combines_updates`, `narrows_to_16_bits`,
`averages_updates`, `weights_name`; `Method.refuse` for the method's own). What depends on the clients discovery
finds, `refuse_clients_a_round`, is refused as soon as they are known, before the first round. FedClipStrategy and
`with_privacy` call the checks of their own arguments too, so that one built directly (a test) refuses alike.
Each message says what cannot work, and what to change.
"""

from __future__ import annotations

from omegaconf import DictConfig

from common.methods.base import Method
from common.transport import TRANSPORT_DTYPES
from server_app.aggregation import AGGREGATIONS, min_clients
from server_app.screening import ON_LARGE_UPDATE
from server_app.selection import SELECTIONS
from server_app.server_optimizer import SERVER_OPTIMIZERS

# Flower's central-DP wrappers: one for each side and clipping (server_app/privacy.py)
DP_SIDES = ("server", "client")
DP_CLIPPINGS = ("fixed", "adaptive")


def refuse_options(cfg: DictConfig, method: Method) -> None:
    """Raise a ValueError, saying what to change, for a run's options that cannot work together or with its method."""
    dataset, options = cfg.dataset, cfg.strategy
    if dataset.domains and dataset.held_out not in dataset.domains:
        raise ValueError(
            f"dataset.held_out={dataset.held_out!r} is not one of dataset.domains: {', '.join(dataset.domains)}"
        )
    method.refuse(cfg)
    refuse_server_optimizer(options.server_optimizer, method)
    secagg = bool(options.secagg.enabled)
    refuse_strategy(
        method,
        weighting=options.weighting,
        fraction_train=options.fraction_train,
        fraction_evaluate=options.fraction_evaluate,
        aggregation=options.aggregation,
        num_malicious=options.num_malicious,
        on_large_update=options.on_large_update,
        transport_dtype=options.transport_dtype,
        secagg=secagg,
    )
    refuse_privacy(
        options.dp,
        method,
        aggregation=options.aggregation,
        weighting=options.weighting,
        transport_dtype=options.transport_dtype,
        secagg=secagg,
    )
    if not 0 <= options.min_train_fraction <= 1:
        raise ValueError(f"strategy.min_train_fraction must be in [0, 1], got {options.min_train_fraction}")
    if cfg.selection not in SELECTIONS:
        raise ValueError(f"selection={cfg.selection!r}: choose one of {', '.join(SELECTIONS)}")


def refuse_server_optimizer(kind: str, method: Method) -> None:
    """strategy.server_optimizer: one of Flower's, and a step needs global weights to step."""
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"strategy.server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {kind!r}")
    if kind != "mean" and not method.weights_name:
        raise ValueError(f"strategy.server_optimizer={kind} steps the global weights; method={method.name} keeps none")


def refuse_strategy(
    method: Method,
    *,
    weighting: str,
    fraction_train: float,
    fraction_evaluate: float,
    aggregation: str,
    num_malicious: int,
    on_large_update: str,
    transport_dtype: str,
    secagg: bool,
) -> None:
    """How the updates are combined and travel (conf/strategy), against each other and the method."""
    if weighting not in ("equal", "examples"):
        raise ValueError(f"strategy.weighting must be 'equal' or 'examples', got {weighting!r}")
    for name, fraction in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
        if not 0 < fraction <= 1:
            raise ValueError(f"strategy.{name} must be in (0, 1], got {fraction}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"strategy.aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    if on_large_update not in ON_LARGE_UPDATE:
        raise ValueError(f"strategy.on_large_update must be 'clip' or 'reject', got {on_large_update!r}")
    if transport_dtype not in TRANSPORT_DTYPES:
        raise ValueError(
            f"strategy.transport_dtype must be one of {', '.join(TRANSPORT_DTYPES)}, got {transport_dtype!r}"
        )
    if transport_dtype != "float32" and not method.narrows_to_16_bits:
        raise ValueError(
            f"strategy.transport_dtype={transport_dtype} narrows what travels to 16 bits; method={method.name} sends "
            "float32"
        )
    if secagg:  # SecAgg+ hides every update: only the mean of several can be computed
        if not method.averages_updates:
            raise ValueError(
                "strategy.secagg.enabled is for a method whose new weights are the mean of the clients' updates; "
                f"method={method.name}'s are not, so it cannot use it"
            )
        if aggregation != "mean":
            raise ValueError(
                "strategy.secagg.enabled: the server sees only the sum of the updates, so "
                f"strategy.aggregation={aggregation}, which needs each update, cannot run; use aggregation=mean, or "
                "turn SecAgg+ off"
            )
    if aggregation != "mean":
        if not method.combines_updates:
            raise ValueError(
                f"strategy.aggregation={aggregation} combines several clients' updates; method={method.name} has "
                "none to combine"
            )
        if num_malicious < 0:
            raise ValueError(f"strategy.num_malicious must be >= 0, got {num_malicious}")


def refuse_clients_a_round(
    *, aggregation: str, num_malicious: int, secagg: bool, clients_a_round: int, training: int, fraction_train: float
) -> None:
    """What the training clients discovery found cannot carry, `clients_a_round` of `training` in every round:
    SecAgg+'s two, a robust rule's bound."""
    if secagg and clients_a_round < 2:
        raise ValueError(
            f"strategy.secagg.enabled needs at least 2 training clients a round, this run has {clients_a_round}"
        )
    if aggregation != "mean" and clients_a_round < (need := min_clients(aggregation, num_malicious)):
        raise ValueError(
            f"strategy.aggregation={aggregation} with strategy.num_malicious={num_malicious} needs at least {need} "
            f"training clients, this federation has {clients_a_round} a round ({training} training, "
            f"strategy.fraction_train={fraction_train}); lower num_malicious, raise fraction_train or choose another "
            "rule (docs/trust.md)"
        )


def refuse_privacy(
    dp: DictConfig, method: Method, *, aggregation: str, weighting: str, transport_dtype: str, secagg: bool
) -> None:
    """strategy.dp (when dp.side is set): what Flower's wrappers can account for, against how the updates are combined
    and travel."""
    if dp.side is None:
        return
    if dp.side not in DP_SIDES or dp.clipping not in DP_CLIPPINGS:
        raise ValueError(
            "strategy.dp.side must be null, server or client and strategy.dp.clipping fixed or adaptive, "
            f"got {dp.side!r}, {dp.clipping!r}"
        )
    if not method.averages_updates or aggregation != "mean" or weighting != "equal":
        raise ValueError(
            "strategy.dp needs a method whose new weights are the mean of the clients' updates (conf/method/ says "
            f"which: method={method.name}'s {'are' if method.averages_updates else 'are not'}), "
            "strategy.aggregation=mean and strategy.weighting=equal: the noise is calibrated to the equal-weight "
            "mean of clipped updates, whose sensitivity to one client is clip / clients"
        )
    if secagg and (dp.side, dp.clipping) != ("client", "fixed"):
        raise ValueError(
            "strategy.dp with strategy.secagg.enabled needs strategy.dp.side=client and strategy.dp.clipping=fixed: "
            "the server sees only the sum, so the clients clip and the server adds the noise to the unmasked mean "
            "(docs/trust.md)"
        )
    if dp.side == "client" and transport_dtype != "float32":
        raise ValueError(
            "strategy.dp.side=client clips on the clients with Flower's mods, which need "
            "strategy.transport_dtype=float32"
        )
