"""The one tensor codec of NoiseRater: numpy and torch arrays <-> `noiserater.v1.Tensor`.

Tensors travel as raw little-endian bytes in C order with a dtype and a shape. Decoding to numpy is
zero-copy (the array is a read-only view of the message's bytes); decoding to torch copies once, because
torch tensors over read-only memory are unsafe to hand to training code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from noiserater.core.v1 import tensor_pb2

Dtype = tensor_pb2.Dtype

NUMPY_DTYPES: dict[int, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
}
# Keyed by (kind, itemsize) so that native, little- and big-endian arrays all map to one wire dtype.
_WIRE_DTYPES: dict[tuple[str, int], int] = {(v.kind, v.itemsize): k for k, v in NUMPY_DTYPES.items()}


class CodecError(ValueError):
    """A Tensor that cannot be decoded; the message names the field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def dtype_name(dtype: int) -> str:
    return tensor_pb2.Dtype.Name(dtype) if dtype in tensor_pb2.Dtype.values() else f"<unknown {dtype}>"


def to_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array or a torch tensor (moved to CPU if needed)."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch
        return array.detach().cpu().numpy()
    return np.asarray(array)


def encode(array: Any) -> tensor_pb2.Tensor:
    """Encode a numpy array or torch tensor (float32, float16, int64, int32)."""
    arr = to_numpy(array)
    wire = _WIRE_DTYPES.get((arr.dtype.kind, arr.dtype.itemsize))
    if wire is None:
        raise CodecError("tensor", f"dtype {arr.dtype} is not supported (float32, float16, int64, int32)")
    little = arr.astype(NUMPY_DTYPES[wire], copy=False)
    return tensor_pb2.Tensor(dtype=wire, shape=list(arr.shape), data=np.ascontiguousarray(little).tobytes())


def decode(tensor: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Zero-copy, read-only numpy view of a Tensor; CodecError names `field` when it is malformed."""
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise CodecError(field, f"unsupported dtype {dtype_name(tensor.dtype)}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise CodecError(field, f"negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # each read of a bytes field copies it: read once
    if len(data) != expected:
        raise CodecError(
            field,
            f"byte count {len(data)} does not match shape {list(shape)} x "
            f"{dtype_name(tensor.dtype)} ({expected} bytes expected)",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_torch(tensor: tensor_pb2.Tensor, field: str = "tensor", device: Any = None, dtype: Any = None):
    """Decode into a new torch tensor (one copy), optionally moved to `device` and cast to `dtype`."""
    import torch

    out = torch.from_numpy(decode(tensor, field).copy())
    if device is not None or dtype is not None:
        out = out.to(device=device, dtype=dtype)
    return out
