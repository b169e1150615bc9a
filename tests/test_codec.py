import numpy as np
import pytest
import torch

from noiserater.core import codec
from noiserater.core.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.int32])
def test_numpy_round_trip(dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    out = codec.decode(codec.encode(arr))
    assert out.dtype == np.dtype(dtype) and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64])
def test_torch_round_trip(dtype):
    x = (torch.randn(3, 5) * 10).to(dtype)
    y = codec.decode_torch(codec.encode(x))
    assert y.dtype == dtype
    assert torch.equal(x, y)
    y.add_(1)  # a decoded torch tensor owns writable memory


def test_big_endian_input_is_sent_little_endian():
    arr = np.arange(5, dtype=">f4")
    msg = codec.encode(arr)
    assert msg.data == np.arange(5, dtype="<f4").tobytes()
    np.testing.assert_array_equal(codec.decode(msg), arr)


def test_numpy_decode_is_zero_copy():
    msg = codec.encode(np.ones((4, 4), np.float32))
    out = codec.decode(msg)
    assert not out.flags.owndata and not out.flags.writeable


def test_byte_count_mismatch_names_field():
    msg = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(codec.CodecError, match=r"candidates: byte count 20 does not match shape \[2, 3\]"):
        codec.decode(msg, "candidates")


def test_unknown_dtype_and_negative_shape():
    with pytest.raises(codec.CodecError, match="unsupported dtype"):
        codec.decode(tensor_pb2.Tensor(dtype=0, shape=[1], data=b"\0" * 4), "x0")
    with pytest.raises(codec.CodecError, match="negative dimension"):
        codec.decode(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1], data=b""), "x0")


def test_unsupported_encode_dtype():
    with pytest.raises(codec.CodecError, match="not supported"):
        codec.encode(np.zeros(3, np.float64))
