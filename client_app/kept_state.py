"""What a client keeps between rounds (its method's `Kept`: optimiser moments, a personal part), saved at the site
every round.

Flower keeps a ClientApp's context state for one Flower run, in the SuperNode's memory: a run resumed with `resume=`
(a new Flower run) or a SuperNode that restarts starts without it, and training goes on from fresh moments, so the
resumed run ends elsewhere than the same run uninterrupted. The server names the app's run with a key that survives a
resume (`run-key` in every train message); after training round r a client writes what it keeps to
`<output_dir>/clients/<run key>/<client>/state-r<r>.safetensors` (a site's own output folder, never the run's), and
each message reads back the newest file from before its round. By default (training.client_state_in_memory false)
that is all: Flower's context, which a simulation keeps for every client in one process and sends to the Ray actor and
back with every message, stays empty, and the tensors never go through Flower's arrays. With
training.client_state_in_memory the context holds them too (as ArrayRecords, marked with the run key), and a message
reads them from there. The two newest files are kept: a server that stopped after its clients trained round r, but
before it checkpointed it, resumes with round r again, which must start from round r-1's state. A site keeps the state
of the 16 runs it trained in last. A missing file is a fresh start; an unreadable one too, with a warning: it never
stops the round.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import safetensors
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from omegaconf import OmegaConf

from common import wire
from common.files import save_tensors
from common.fingerprint import model_files_fingerprint
from common.local_data import LocalData
from common.methods.base import Kept
from common.model import model_name_or_path

log = logging.getLogger(__name__)

MARK = "kept-state"  # in memory: Flower state's ConfigRecord naming the run key its arrays belong to
KEPT_FILES = 2
# runs whose state a site keeps: a server sending a new run key with every message cannot fill the site's disk
KEPT_RUNS = 16
_PRUNED: set[Path] = set()  # the run folders for whose first save this process pruned the site's older runs


def run_key(value: object) -> str:
    """The server's run key, checked: a UUID in hex, which is also what names the folder (nothing else of the text)."""
    try:
        return uuid.UUID(hex=str(value)).hex
    except ValueError as err:
        raise ValueError(f"run-key {str(value)[:40]!r} is not a run key (32 hex digits)") from err


def restored(config: ConfigRecord, state: RecordDict, local: LocalData, before_round: int) -> tuple[str | None, Kept]:
    """The message's run key (None: a server that sends none, whose client keeps what it keeps in Flower's context
    `state` only) and what the client kept before `before_round`: from `state` where it holds this run's, else from
    the site's files."""
    if wire.RUN_KEY not in config:
        return None, in_context(state)
    key = run_key(config[wire.RUN_KEY])
    mark = state.config_records.get(MARK)
    if mark is not None and mark.get("run-key") == key:
        return key, in_context(state)
    kept = restore(local, key, before_round)
    if local.cfg.training.client_state_in_memory:
        _into_context(state, key, kept)
    return key, kept


def in_context(state: RecordDict) -> Kept:
    """What Flower's context state holds of the client's kept records, as tensors."""
    return {name: record.to_torch_state_dict() for name, record in state.array_records.items()}


def keep(state: RecordDict, local: LocalData, key: str | None, server_round: int, kept: Kept) -> None:
    """After training `server_round`: save what the client keeps at the site, and in Flower's context `state` only
    where it lives in memory (training.client_state_in_memory), or where it could not be saved (the run goes on from
    memory, without what a restart would need)."""
    saved = key is not None and save(kept, local, key, server_round)
    _into_context(state, key, kept if local.cfg.training.client_state_in_memory or not saved else None)


def _into_context(state: RecordDict, key: str | None, kept: Kept | None) -> None:
    """Flower's context `state` holding `kept` for the run `key` (None: nothing)."""
    for name in [*state.array_records, MARK]:
        if name in state:
            del state[name]
    if kept is None:
        return
    for name, tensors in kept.items():
        state[name] = ArrayRecord({array: t.detach().cpu().contiguous() for array, t in tensors.items()})
    if key is not None:
        state[MARK] = ConfigRecord({"run-key": key})


def state_folder(local: LocalData, key: str) -> Path:
    """This client's folder of kept state for the run `key`."""
    if local.client in ("", ".", "..") or Path(local.client).name != local.client:
        raise ValueError(f"client name {local.client!r} cannot name a folder")
    return Path(str(local.cfg.output_dir)).expanduser() / "clients" / key / local.client


def _round_of(path: Path) -> int:
    return int(path.stem.removeprefix("state-r"))


def _saved(folder: Path) -> list[Path]:
    """The state files in `folder`, oldest round first."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    rounds = [
        n[len("state-r") : -len(".safetensors")]
        for n in names
        if n.startswith("state-r") and n.endswith(".safetensors")
    ]
    return [folder / f"state-r{r}.safetensors" for r in sorted(int(r) for r in rounds if r.isdigit())]


def restore(local: LocalData, key: str, server_round: int) -> Kept:
    """What the client kept in the newest file saved before `server_round` (none saved: a fresh start, nothing)."""
    earlier = [p for p in _saved(state_folder(local, key)) if _round_of(p) < server_round]
    if not earlier:
        return {}
    path = earlier[-1]
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            names = json.loads((fh.metadata() or {}).get("records", "[]"))  # an empty record has no tensor to name it
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open is no Mapping
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError("its list of records is not a list of names")
        kept: Kept = {name: {} for name in names}
        for name, tensor in tensors.items():
            record, _, array = name.partition("/")
            if not record or not array or not torch.isfinite(tensor).all():
                raise ValueError(f"tensor {name!r} is not a kept state's")
            kept.setdefault(record, {})[array] = tensor
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        log.warning(
            "client %s: could not read its kept state %s (%s); it goes on from a fresh one", local.client, path, err
        )
        return {}
    # with the state in files, reading it back is every message's routine; a restart's or a resume's is news
    routine = not local.cfg.training.client_state_in_memory
    log.log(
        logging.DEBUG if routine else logging.INFO,
        "client %s: restored what it kept after round %d (%s)",
        local.client,
        _round_of(path),
        path,
    )
    return kept


def save(kept: Kept, local: LocalData, key: str, server_round: int) -> bool:
    """Write what the client keeps as after `server_round`, atomically, and keep the two newest files; whether they are
    on disk. A folder the site cannot write to is a warning, never a failed round: the run goes on, without what a
    restart would need."""
    if not kept:
        return False
    tensors = {
        f"{name}/{array}": tensor.detach().cpu() for name, record in kept.items() for array, tensor in record.items()
    }
    folder = state_folder(local, key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"state-r{server_round}.safetensors"
        partial = path.with_suffix(".tmp")
        records = json.dumps(sorted(kept))
        info = {"run-key": key, "client": local.client, "round": str(server_round), "records": records}
        save_tensors(tensors, partial, info)
        os.replace(partial, path)
        os.utime(folder.parent)  # the run's folder: when this site last trained in it
        for old in _saved(folder)[:-KEPT_FILES]:
            old.unlink(missing_ok=True)
        if folder.parent not in _PRUNED:  # a run's first save in this process: a new run may have come
            runs = [p for p in folder.parent.parent.iterdir() if p.is_dir() and _is_run_key(p.name)]
            for old in sorted(runs, key=lambda p: p.stat().st_mtime_ns)[:-KEPT_RUNS]:
                shutil.rmtree(old, ignore_errors=True)
            _PRUNED.add(folder.parent)
    except OSError as err:
        log.warning(
            "client %s: could not save what it keeps between rounds in %s (%s); a restart would start it afresh. "
            "Give the node a writable output-dir",
            local.client,
            folder,
            err,
        )
        return False
    return True


def _is_run_key(name: str) -> bool:
    try:
        return run_key(name) == name
    except ValueError:
        return False


def save_site_weights(local: LocalData, key: str, weights_name: str, weights: dict[str, torch.Tensor]) -> Path | None:
    """The weights this client predicts with after the run, in a run folder of its own in the client's state folder,
    which `fedclip-predict --run FOLDER --which final` reads: config.yaml (the configuration as this site ran it),
    run.json (the classes, the CLIP's files' fingerprint, the run key) and <weights_name>_final.safetensors. A folder
    the site cannot write to is a warning (None), not a failed evaluation."""
    folder = state_folder(local, key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(local.cfg, folder / "config.yaml")
        fingerprint = model_files_fingerprint(model_name_or_path(local.cfg), local.cfg.cache_dir)
        info = {"classes": local.images.classes, "model_fingerprint": fingerprint, "run_key": key}
        (folder / "run.json").write_text(json.dumps(info, indent=2))
        path = folder / f"{weights_name}_final.safetensors"
        save_tensors({name: t.detach().float().cpu() for name, t in weights.items()}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    except OSError as err:
        log.warning("client %s: could not write its own weights to %s (%s)", local.client, folder, err)
        return None
    log.info("client %s: its own weights for fedclip-predict are in %s", local.client, folder)
    return folder
