"""The global weights a run folder keeps: `<weights_name>_best.safetensors`, the selected round's, and
`<weights_name>_final.safetensors`, the last round's, with the round and the method in their metadata (what
fedclip-predict loads; the checkpoint copies the best on resume)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord

from common.files import save_tensors

KEPT = ("best", "final")


def weights_path(folder: Path, weights_name: str, which: str) -> Path:
    """The file of a run folder that holds its `which` weights (one of KEPT)."""
    return folder / f"{weights_name}_{which}.safetensors"


def save_weights(
    arrays: ArrayRecord, folder: Path, weights_name: str, which: str, server_round: int, method: str
) -> None:
    """Write the `which` weights (one of KEPT): those after `server_round`."""
    save_tensors(
        arrays.to_torch_state_dict(),
        weights_path(folder, weights_name, which),
        {"round": str(server_round), "method": method},
    )
