"""Checkpoint after every round, so a run that stops (server crash, restart) can resume.

`<run folder>/checkpoint.safetensors` holds the global weights (whatever the method trains) and the server
optimizer's moments; its metadata holds the round, what the strategy learnt on the way (adaptive DP's clipping norm)
and the length and hash of metrics.jsonl as written up to that round, in one file replaced atomically, so the adapter,
the round, that state and the report rows always agree. The rows themselves stay in metrics.jsonl: a checkpoint that
copied them grew with every round (at 1,000 clients a row is about half a megabyte, and every round rewrote them all).
`resume=<run folder>` starts a new run folder from there: the earlier rows are copied over and training goes on with
the next round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import load_file

from common.files import save_tensors
from server_app.report import ROWS_FILE
from server_app.server_optimizer import STATE_PREFIX, ServerOptimizer
from server_app.weights import weights_path

if TYPE_CHECKING:
    from server_app.report import RunReport  # the report imports nothing of this module: no circle

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class Checkpoint:
    """What a run needs to go on: the global adapter after `round` and the report rows up to it."""

    round: int
    arrays: ArrayRecord
    rows: list[dict]
    protocol: dict
    optimizer: dict[str, np.ndarray]  # the server optimizer's moments (server_app/server_optimizer.py), if it has any
    # the strategy's checkpoint_state() (adaptive DP's clipping norm)
    strategy: dict[str, float] = field(default_factory=dict)
    run_key: str | None = None  # the app's run, which clients' kept state is saved under (None: an older checkpoint)


class StrategyState(Protocol):
    """A strategy whose state outlives a round (FedClipStrategy has none; adaptive DP keeps its clipping norm)."""

    def checkpoint_state(self) -> dict[str, float]: ...

    def load_checkpoint_state(self, state: Mapping[str, float]) -> None: ...


def protocol(cfg: DictConfig) -> dict:
    """What must not change between a run and its resumption: the rows before and after must mean the same."""
    return {
        "method": cfg.method.name,
        "held_out": cfg.dataset.held_out,
        "seed": cfg.seed,
        "split": list(cfg.dataset.split),
        "clients_per_domain": cfg.dataset.clients_per_domain,
        "partition": cfg.dataset.partition,
        "model": cfg.model.name_or_path,
    }


def save_checkpoint(
    report: RunReport,
    arrays: ArrayRecord,
    optimizer: ServerOptimizer | None = None,
    strategy_state: Mapping[str, float] | None = None,
) -> None:
    """Write the adapter (and the server optimizer's moments), where the rows of every round so far end in
    metrics.jsonl and the strategy's state (the one the next round starts from), replacing the last checkpoint
    atomically."""
    path = report.dir / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    meta = {
        "round": str(report.rows[-1]["round"]),
        "rows-bytes": str(report.rows_bytes),
        "rows-hash": report.rows_hash.hexdigest(),
        "protocol": json.dumps(protocol(report.cfg)),
        "strategy": json.dumps(dict(strategy_state or {})),
        "run-key": report.run_key,
    }
    moments = optimizer.state() if optimizer is not None else {}
    state = ArrayRecord({**{k: v for k, v in arrays.items()}, **{k: Array(v) for k, v in moments.items()}})
    save_tensors(state.to_torch_state_dict(), tmp, meta)
    os.replace(tmp, path)


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """The checkpoint of a run folder, with an error that says what to pass when there is none."""
    path = Path(folder).expanduser() / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"resume={folder}: no {CHECKPOINT} there. Pass the run folder the run logged as 'run folder: ...' "
            '(it gets a checkpoint after every round), e.g. overrides="resume=outputs/2026-01-01_12-00-00"'
        )
    with safe_open(path, "pt") as fh:
        meta = fh.metadata() or {}
    if "round" not in meta or ("rows" not in meta and "rows-bytes" not in meta):
        raise ValueError(f"{path} is not a FedCLIP checkpoint (no round/rows metadata)")
    rows = json.loads(meta["rows"]) if "rows" in meta else checkpointed_rows(path.parent, meta)  # "rows": older ones
    if not rows or rows[-1]["round"] != int(meta["round"]):
        raise ValueError(f"{path} is inconsistent: round {meta['round']} but {len(rows)} report rows")
    tensors = load_file(path)
    weights = ArrayRecord({k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)})
    moments = {k: v.numpy() for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    return Checkpoint(
        int(meta["round"]),
        weights,
        rows,
        json.loads(meta.get("protocol", "{}")),
        moments,
        json.loads(meta.get("strategy", "{}")),
        meta.get("run-key"),
    )


def checkpointed_rows(folder: Path, meta: dict[str, str]) -> list[dict]:
    """The rows of metrics.jsonl up to the checkpoint: its first `rows-bytes` bytes, which must hash as the checkpoint
    says (rows written after it, a round the server had not checkpointed yet, are left out)."""
    path = folder / ROWS_FILE
    try:
        size = int(meta["rows-bytes"])
        with open(path, "rb") as fh:
            written = fh.read(size)
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder / CHECKPOINT} names rows that cannot be read from {path}: {err}") from err
    if len(written) != size or hashlib.blake2b(written, digest_size=16).hexdigest() != meta.get("rows-hash"):
        raise ValueError(
            f"{path} is not what the checkpoint was written with (its first {size} bytes differ): "
            "the report rows of the run were changed or cut; resume from a copy of the run folder as it was"
        )
    return [json.loads(line) for line in written.decode().splitlines()]


def resume_run(
    folder: str | Path,
    report: RunReport,
    arrays: ArrayRecord,
    optimizer: ServerOptimizer | None = None,
    strategy: StrategyState | None = None,
) -> tuple[ArrayRecord, int]:
    """Continue from a run folder's checkpoint: the adapter to start from and the next round.

    The earlier rows go into the new run folder's metrics and the best adapter so far is copied,
    so the summary covers the whole run. `arrays` is this run's fresh adapter: the checkpoint must
    have the same keys and shapes (same CLIP), and the same domains must be in the federation.
    The server optimizer (if given) goes on with its moments and the strategy (if given) with its state (adaptive DP's
    clipping norm); the run key goes on, so clients find what they kept between rounds (client_app/kept_state.py).
    """
    ckpt = load_checkpoint(folder)
    changed = {k: (v, ckpt.protocol.get(k)) for k, v in protocol(report.cfg).items() if ckpt.protocol.get(k) != v}
    if changed:
        raise ValueError(
            f"resume={folder}: this run differs from the checkpoint's "
            f"in {', '.join(f'{k} (now {a!r}, then {b!r})' for k, (a, b) in changed.items())}; "
            "resume with the same settings, or start a new run"
        )
    expected = {k: tuple(v.shape) for k, v in arrays.items()}
    found = {k: tuple(v.shape) for k, v in ckpt.arrays.items()}
    if found != expected:
        raise ValueError(
            f"resume={folder}: the checkpoint's adapter {found} does not fit this run's {expected}; was it made with "
            f"another CLIP?"
        )
    old_domains = {k.removeprefix("acc/") for k in ckpt.rows[0] if k.startswith("acc/")}
    if old_domains != set(report.domains):
        raise ValueError(
            f"resume={folder}: the checkpoint's run had domains {sorted(old_domains)}, this federation "
            f"has {sorted(report.domains)}"
        )
    # in this run's order, not the file's (sorted): Flower's
    weights = ArrayRecord({k: ckpt.arrays[k] for k in arrays.keys()})
    # clipping mods (strategy.dp.side=client) refuse a reply whose tensors come in another order than those the
    # client was sent
    report.append_rows(ckpt.rows)
    if ckpt.run_key:  # the clients find what they kept between rounds under the same key
        report.run_key = ckpt.run_key
        report.write_run_info()
        before = Path(folder).expanduser().resolve().parent
        if before != Path(str(report.cfg.output_dir)).expanduser().resolve():
            log.warning(
                "resume=%s: that run wrote under %s, this one under output_dir=%s; the nodes of Flower's simulation "
                "keep what they kept between rounds under the run's output_dir (clients/<run key>/), so theirs "
                "start afresh: resume with output_dir=%s to keep them (a deployment's sites keep theirs under their "
                "own output-dir, whatever the run's)",
                folder,
                before,
                report.cfg.output_dir,
                before,
            )
    else:
        log.warning(
            "resume=%s: an older checkpoint with no run key; the clients' optimiser moments start afresh", folder
        )
    for row in ckpt.rows:  # the new run folder's TensorBoard and MLflow curves start at round 0 too
        report.tracking.log_round(row)
    for row in ckpt.rows[1:]:  # the best round so far, chosen as add_round chose it
        report.selection.choose(row)
    if report.selection.best is not None:
        shutil.copyfile(
            weights_path(Path(folder).expanduser(), report.weights_name, "best"),
            weights_path(report.dir, report.weights_name, "best"),
        )
    if optimizer is not None:
        optimizer.load_state(ckpt.optimizer)
    if strategy is not None:
        strategy.load_checkpoint_state(ckpt.strategy)
    save_checkpoint(report, weights, optimizer, strategy.checkpoint_state() if strategy is not None else None)
    log.info("resumed from %s after round %d; going on with round %d", folder, ckpt.round, ckpt.round + 1)
    return weights, ckpt.round + 1
