"""Every refusal of a run's options (server_app/options.py), from the configuration the run starts with: each with its
whole message (what cannot work, and what to change), before the first message goes out.

What depends on the clients discovery finds is refused when the strategy is built: tests/test_trust.py (a robust rule's
clients a round) and tests/test_secagg.py (SecAgg+'s two).
"""

from __future__ import annotations

import re

import pytest
from flwr.app import Context, RecordDict

from client_app.app import app as client_app
from common.config import load_config
from common.methods.base import load_method
from server_app.app import app as server_app
from server_app.options import refuse_options
from tests.inprocess import InProcessGrid
from tests.test_privacy import NEEDS_MEAN, SECAGG_NEEDS_CLIENT_FIXED

REFUSED = [
    (
        "dataset.held_out=sketchy",
        "dataset.held_out='sketchy' is not one of dataset.domains: photo, sketch, cartoon, painting",
    ),
    (
        "strategy.server_optimizer=sgd",
        "strategy.server_optimizer must be one of mean, fedavgm, fedadam, fedyogi, fedadagrad, got 'sgd'",
    ),
    (
        "method=local strategy.server_optimizer=fedyogi",
        "strategy.server_optimizer=fedyogi steps the global weights; method=local keeps none",
    ),
    ("strategy.weighting=median", "strategy.weighting must be 'equal' or 'examples', got 'median'"),
    ("strategy.fraction_train=1.01", "strategy.fraction_train must be in (0, 1], got 1.01"),
    ("strategy.fraction_evaluate=0.0", "strategy.fraction_evaluate must be in (0, 1], got 0.0"),
    (
        "strategy.aggregation=average",
        "strategy.aggregation must be one of mean, median, trimmed_mean, krum, multikrum, bulyan, got 'average'",
    ),
    ("strategy.on_large_update=drop", "strategy.on_large_update must be 'clip' or 'reject', got 'drop'"),
    (
        "method=fedavg strategy.transport_dtype=float16",
        "strategy.transport_dtype=float16 narrows what travels to 16 bits; method=fedavg sends float32",
    ),
    (
        "method=fedavg strategy.secagg.enabled=true",
        "strategy.secagg.enabled is for a method whose new weights are the mean of the clients' updates; "
        "method=fedavg's are not, so it cannot use it",
    ),
    (
        "strategy.secagg.enabled=true strategy.aggregation=median",
        "strategy.secagg.enabled: the server sees only the sum of the updates, so strategy.aggregation=median, which "
        "needs each update, cannot run; use aggregation=mean, or turn SecAgg+ off",
    ),
    (
        "method=local strategy.aggregation=median",
        "strategy.aggregation=median combines several clients' updates; method=local has none to combine",
    ),
    ("strategy.aggregation=median strategy.num_malicious=-1", "strategy.num_malicious must be >= 0, got -1"),
    (
        "strategy.dp.side=both",
        "strategy.dp.side must be null, server or client and strategy.dp.clipping fixed or adaptive, got 'both', "
        "'fixed'",
    ),
    ("strategy.dp.side=server strategy.weighting=examples", NEEDS_MEAN.format("fedclip", "are")),
    ("strategy.dp.side=server method=local", NEEDS_MEAN.format("local", "are not")),
    ("strategy.dp.side=server strategy.secagg.enabled=true", SECAGG_NEEDS_CLIENT_FIXED),
    (
        "strategy.dp.side=client strategy.transport_dtype=bfloat16",
        "strategy.dp.side=client clips on the clients with Flower's mods, which need strategy.transport_dtype=float32",
    ),
    ("selection=best", "selection='best': choose one of val_mean, val_pooled, last"),
]


@pytest.mark.parametrize("overrides,message", REFUSED, ids=[overrides for overrides, _ in REFUSED])
def test_each_option_combination_that_cannot_work_is_refused_with_what_to_change(overrides, message):
    cfg = load_config(overrides)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        refuse_options(cfg, load_method(cfg))


@pytest.mark.parametrize(
    "overrides",
    [
        "",
        "method=fedavg strategy.server_optimizer=fedadam",
        "strategy.aggregation=krum strategy.num_malicious=1 strategy.transport_dtype=bfloat16",
        "strategy.secagg.enabled=true strategy.dp.side=client",
        "strategy.dp.side=server strategy.dp.clipping=adaptive selection=val_pooled",
        "method=zero_shot",
    ],
)
def test_options_that_work_together_pass(overrides):
    cfg = load_config(overrides)
    refuse_options(cfg, load_method(cfg))


class CountingGrid(InProcessGrid):
    """An in-process grid that counts the messages the ServerApp pushes."""

    pushed = 0

    def push_messages(self, messages):
        messages = list(messages)
        self.pushed += len(messages)
        return super().push_messages(messages)

    def get_node_ids(self):
        self.pushed += 1  # asking for the nodes is the start of discovery
        return super().get_node_ids()


def test_a_run_with_refused_options_stops_before_its_first_message():
    run_config = {"overrides": "strategy.weighting=median"}
    grid = CountingGrid(client_app, run_config, 2)
    with pytest.raises(ValueError, match="strategy.weighting must be 'equal' or 'examples'"):
        server_app(grid, Context(1, 0, {}, RecordDict(), run_config))
    assert grid.pushed == 0
