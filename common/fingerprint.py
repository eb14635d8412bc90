"""Which CLIP a node holds, and which version of the app's code it runs: hashes of file contents, the same on every
machine that has the same files.

The server compares the nodes' CLIP fingerprints at discovery, predict refuses a CLIP other than its run's, and the
feature cache is keyed by it. File hashes are memoised in the process and, with a cache folder, on disk. A client
refuses a run whose code differs from its own (app_code_fingerprint): a Ray worker imports whatever is installed on it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from common.files import set_default_mode
from common.model import model_unavailable

log = logging.getLogger(__name__)

APP_ROOT = Path(__file__).resolve().parent.parent
CLIENT_CODE = ("client_app", "common", "conf")  # what a ClientApp runs: the FAB's packages less the server's
_MODEL_DIRS: dict[str, Path] = {}
_FILE_HASHES: dict[str, str] = {}


def _file_hash(path: Path) -> str:
    """A content hash of one file, memoised by (path, inode, size, mtime)."""
    stat = path.stat()
    key = f"{path}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in _FILE_HASHES:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def model_files_fingerprint(name_or_path: str, cache_dir: Path | None = None) -> str:
    """A hash of the contents of a CLIP's files (config, processor, tokenizer, weights).

    With cache_dir the file hashes are also kept in <cache_dir>/file-hashes.json, so that a fresh
    process (Flower starts one per message in a deployment) does not read a 600 MB model again.
    """
    memo = Path(cache_dir).expanduser() / "file-hashes.json" if cache_dir is not None else None
    stored: dict[str, str] = {}
    if memo is not None and memo.is_file():
        try:
            stored = json.loads(memo.read_text())
        except (OSError, ValueError):  # a broken memo only costs the hashing
            pass
    _FILE_HASHES.update(stored)
    if (
        name_or_path not in _MODEL_DIRS and Path(name_or_path).expanduser().is_dir()
    ):  # a saved CLIP: no need to import transformers
        _MODEL_DIRS[name_or_path] = Path(name_or_path).expanduser()
    if name_or_path not in _MODEL_DIRS:  # a hub id is resolved to its local snapshot once per process
        from transformers.utils import cached_file

        try:
            _MODEL_DIRS[name_or_path] = Path(cached_file(name_or_path, "config.json")).parent
        except OSError as err:  # no such folder, and the hub id cannot be fetched
            raise model_unavailable(name_or_path, err) from err
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(_MODEL_DIRS[name_or_path].iterdir()):
        if path.resolve().is_file():
            h.update(f"{path.name}:{_file_hash(path.resolve())}\n".encode())
    if memo is not None and not _FILE_HASHES.keys() <= stored.keys():
        try:  # nodes sharing a cache folder may write at once: each writes its own file, then renames it
            memo.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=memo.name)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(_FILE_HASHES))
            set_default_mode(Path(tmp))
            os.replace(tmp, memo)
        except OSError as err:  # the memo only saves time
            log.warning("could not write %s: %s", memo, err)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def app_code_fingerprint() -> str:
    """A hash of the code a ClientApp runs: the .py and .yaml files of CLIENT_CODE by their path in the app, as the FAB
    holds them. The server sends its own with every message; a node whose code differs runs another version."""
    h = hashlib.blake2b(digest_size=16)
    files = sorted(
        path
        for folder in CLIENT_CODE
        for path in (APP_ROOT / folder).rglob("*")
        if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts and path.is_file()
    )
    for path in files:
        h.update(path.relative_to(APP_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
