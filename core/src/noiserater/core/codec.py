"""The one tensor codec of NoiseRater: numpy and torch arrays <-> `noiserater.v1.Tensor`.

Tensors travel as raw little-endian bytes in C order with a dtype and a shape. Decoding to numpy is
zero-copy (the array is a read-only view of the message's bytes); decoding to torch copies once, because
torch tensors over read-only memory are unsafe to hand to training code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from noiserater.core.text import clip_shape
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
MAX_DIMS = 32  # no tensor of the wire has more than a handful; numpy itself stops at 64
MAX_BYTES = 1 << 62  # a shape whose (non-zero) dimensions multiply beyond this cannot be an array


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


def _wire(array: Any) -> tuple[int, tuple[int, ...], bytes]:
    arr = to_numpy(array)
    wire = _WIRE_DTYPES.get((arr.dtype.kind, arr.dtype.itemsize))
    if wire is None:
        raise CodecError("tensor", f"dtype {arr.dtype} is not supported (float32, float16, int64, int32)")
    little = arr.astype(NUMPY_DTYPES[wire], copy=False)
    return wire, arr.shape, np.ascontiguousarray(little).tobytes()


def encode(array: Any) -> tensor_pb2.Tensor:
    """Encode a numpy array or torch tensor (float32, float16, int64, int32)."""
    wire, shape, data = _wire(array)
    return tensor_pb2.Tensor(dtype=wire, shape=shape, data=data)


def encode_into(tensor: tensor_pb2.Tensor, array: Any) -> tensor_pb2.Tensor:
    """`encode` into the (empty) Tensor field of a message, `encode_into(request.x0, x0)`: one copy of the
    data fewer than assigning an encoded Tensor, which copies it into the message."""
    wire, shape, data = _wire(array)
    tensor.dtype = wire
    tensor.shape.extend(shape)
    tensor.data = data
    return tensor


def check_shape(field: str, dims: Any, itemsize: int) -> tuple[int, ...]:
    """A wire shape as a tuple, once it is one numpy can make an array of: at most MAX_DIMS dimensions, none
    negative, and (zeros aside) not multiplying beyond MAX_BYTES. CodecError names `field` otherwise."""
    if len(dims) > MAX_DIMS:
        raise CodecError(field, f"shape has {len(dims)} dimensions (at most {MAX_DIMS})")
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise CodecError(field, f"negative dimension in shape {clip_shape(shape)}")
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_BYTES:
        raise CodecError(field, f"shape {clip_shape(shape)} is too large")
    return shape


def decode(tensor: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Zero-copy, read-only numpy view of a Tensor; CodecError names `field` when it is malformed."""
    dtype = NUMPY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise CodecError(field, f"unsupported dtype {dtype_name(tensor.dtype)}")
    shape = check_shape(field, tensor.shape, dtype.itemsize)
    expected = math.prod(shape) * dtype.itemsize
    data = tensor.data  # each read of a bytes field copies it: read once
    if len(data) != expected:
        raise CodecError(
            field,
            f"byte count {len(data)} does not match shape {clip_shape(shape)} x "
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
