"""Files the apps write into shared places (the cache, run folders) get the mode any new file gets; tensors go to
safetensors files through one function."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Tensors as a safetensors file with the default mode: trained weights load with `load_state_dict(load_file(path))`
    (an image encoder's with `strict=False`)."""
    save_file({key: value.contiguous() for key, value in tensors.items()}, path, metadata=metadata)
    set_default_mode(path)


def new_folder(parent: Path, name: str) -> Path:
    """A new folder `name` in `parent`, or `name-2`, `name-3`, ... when it exists: two runs started in the same second
    never share a run folder (a run resumed at once would copy its checkpoint onto itself)."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"{parent} has 999 folders named {name}(-n)")


def set_default_mode(path: Path) -> None:
    """Give a file the mode open() gives a new file (0o666 less the umask; 0o644 with the usual 022).

    safetensors' save_file (and so save_pretrained) and mkstemp write 0o600; a cache folder is shared
    between users and containers (the compose demo mounts one into every SuperNode), so what goes into
    it must be readable like any file the process writes.
    """
    path.chmod(0o666 & ~_umask())


def _umask() -> int:
    """This process's umask, read without changing it (os.umask sets it, racing other threads' file creation)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):  # not Linux
        mask = os.umask(0o022)
        os.umask(mask)
        return mask
