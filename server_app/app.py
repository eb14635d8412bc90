"""The FedCLIP ServerApp: find which node holds which client, then the leave-one-domain-out rounds."""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import wire
from common.config import load_config, message_config, setup_logging
from common.methods.base import load_method
from server_app.checkpoint import resume_run
from server_app.federation import Federation, FederationError
from server_app.options import refuse_options
from server_app.privacy import with_privacy
from server_app.report import RunReport, write_failed_run
from server_app.rounds import run_rounds
from server_app.server_optimizer import ServerOptimizer
from server_app.strategy import FedClipStrategy

setup_logging()
log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Discover the nodes, then one exchange per round: round r's training carries round r-1's evaluation."""
    # checked before the first message: a mistyped value stops here
    cfg = load_config(str(context.run_config.get("overrides", "")))
    run_config = message_config(cfg)  # the clients get the run's checked configuration with every message
    method = load_method(cfg)
    refuse_options(cfg, method)  # every option combination that cannot work stops here (server_app/options.py)
    optimizer = ServerOptimizer.from_config(cfg.strategy)
    started = time.time()
    try:
        federation = Federation(grid, cfg, run_config)
    except FederationError as err:  # nodes failed: a run folder says which and why (a refused app gets none)
        if err.failed:
            write_failed_run(cfg, err, {"discovery": err.failed})
        raise

    weights = method.initial_weights(cfg, federation.feature_dim)
    arrays = ArrayRecord(weights)
    last_round = cfg.training.rounds if method.trains else 0
    template = {k: v.numpy() for k, v in arrays.items()}
    num_train = {c: int(m[wire.NUM_TRAIN]) for c, m in federation.info.items()}
    strategy = FedClipStrategy.from_config(
        cfg, method, template, federation.node_domains, federation.node_clients, num_train
    )
    strategy = with_privacy(strategy, cfg.strategy.dp)  # Flower's central-DP wrapper when strategy.dp.side is set
    strategy.summary()
    trained = sum(v.numel() for v in weights.values()) if method.trains else 0
    report = RunReport(
        cfg,
        federation.client_domains,
        [federation.node_clients[n] for n in strategy.train_nodes],
        trained,
        method.weights_name,
        federation.classes,
        federation.fingerprint,
        context.run_id,
        discovery_seconds=time.time() - started,
    )
    report.traffic.images_encoded += sum(int(m.get(wire.IMAGES_ENCODED, 0)) for m in federation.info.values())
    try:
        arrays, first_round = resume_run(cfg.resume, report, arrays, optimizer, strategy) if cfg.resume else (arrays, 1)
        final = run_rounds(grid, context, cfg, federation, strategy, report, optimizer, arrays, first_round, last_round)
    except BaseException as err:  # summary.json says why; the MLflow run is marked FAILED rather than left running
        report.abort(err)
        raise
    report.finish(final)
