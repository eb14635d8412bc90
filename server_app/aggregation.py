"""The rules that combine a round's updates into one: the weighted mean, or one of Flower's robust rules
(flwr.server.strategy.aggregate), and how many updates each needs to tolerate its faulty ones (docs/trust.md)."""

from __future__ import annotations

import numpy as np
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum, aggregate_median, aggregate_trimmed_avg

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
    else:  # a run's is refused before its first message (server_app/options.py); this is a direct caller's
        raise ValueError(f"strategy.aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    return {k: np.asarray(v, dtype=np.float32) for k, v in zip(keys, combined)}
