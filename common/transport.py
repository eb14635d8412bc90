"""How the adapter travels between server and clients: float32, or 16 bits each way (half the bytes).

Everything is computed in float32; only the messages carry the narrower type. numpy, which Flower's
Array holds, has no bfloat16, so a bfloat16 tensor travels as the raw bits of its 16-bit words
(dtype uint16) and is decoded from the dtype alone: uint16 on the wire always means bfloat16.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

TRANSPORT_DTYPES = ("float32", "float16", "bfloat16")
WIRE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}


def encode_array(value: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    """A float32 tensor as it travels: cast to float16, or bfloat16 (round to nearest even) as its uint16 bits."""
    tensor = torch.as_tensor(value).detach().cpu().float()
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return tensor.to(getattr(torch, dtype)).numpy()


def decode_array(value: np.ndarray) -> np.ndarray:
    """A received tensor in float32: float16 widened, uint16 read as bfloat16 bits."""
    if value.dtype == np.uint16:
        return (value.astype(np.uint32) << 16).view(np.float32)
    return value.astype(np.float32)


def array_values(array: Array) -> np.ndarray:
    """An Array's values, read-only. Bytes exactly as np.save writes them for the Array's declared dtype and shape
    (Flower's own encoding) are read in place, without np.load's header parsing (a fifth of its time, twice a train
    message on a client and once an update on the server); anything else goes through Flower's `Array.numpy()`
    (np.load, pickles refused), which decodes what the bytes say or raises."""
    try:
        dtype, shape = np.dtype(array.dtype), tuple(array.shape)
    except (TypeError, ValueError):
        return array.numpy()
    data = array.data
    if array.stype == SType.NUMPY and dtype.kind in "fiub" and all(type(n) is int and n >= 0 for n in shape):
        size = math.prod(shape) * dtype.itemsize
        if size < len(data):  # a header of the right length cannot ask for more memory than the bytes hold
            header = _npy_header(dtype.str, shape)
            if len(header) + size == len(data) and data.startswith(header):
                return np.frombuffer(data, dtype, offset=len(header)).reshape(shape)
    return array.numpy()


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """What np.save writes before the values of a C-ordered array of this dtype and shape."""
    empty, buffer = np.empty(shape, np.dtype(dtype)), io.BytesIO()
    np.save(buffer, empty, allow_pickle=False)
    return buffer.getvalue()[: -empty.nbytes or None]


def encode(state: Mapping[str, np.ndarray | torch.Tensor], dtype: str) -> ArrayRecord:
    """An adapter's tensors as the ArrayRecord a message carries, in the transport dtype."""
    return ArrayRecord({key: Array(np.ascontiguousarray(encode_array(value, dtype))) for key, value in state.items()})


def decode(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A received ArrayRecord as float32 torch tensors (for load_state_dict)."""
    return {key: torch.from_numpy(decode_array(array_values(array))) for key, array in record.items()}
