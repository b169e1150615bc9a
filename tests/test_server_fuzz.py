"""Fuzz-ish: random malformed Tensors and requests never get past the decoders as anything but a named
INVALID_ARGUMENT (or NOT_FOUND), and the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from support.server import ServerThread, make_repository

from noiserater.core import codec
from noiserater.core.codec import CodecError
from noiserater.core.inference import grpc_service_pb2 as kserve_pb
from noiserater.core.scoring import ScoringError
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.core.v1 import tensor_pb2
from noiserater.server.config import ServerConfig
from noiserater.server.service_kserve import DATATYPES, decode_inputs

FIELD_NAMES = ("x0", "t", "candidates", "eps", "inputs", "raw_input_contents", "keep", "rule", "model", "dataset",
               "temperature")


def random_tensor(rng: np.random.Generator, valid: np.ndarray | None = None) -> tensor_pb2.Tensor:
    """A mutation of a valid tensor, or garbage."""
    base = codec.encode(valid) if valid is not None else tensor_pb2.Tensor()
    choice = rng.integers(8)
    if choice == 0:
        base.dtype = int(rng.choice([0, 5, 99, -3, tensor_pb2.DTYPE_INT32, tensor_pb2.DTYPE_FLOAT16]))
    elif choice == 1:
        base.data = base.data[: int(rng.integers(0, len(base.data) + 1))]
    elif choice == 2:
        base.data = base.data + rng.bytes(int(rng.integers(1, 9)))
    elif choice == 3:
        del base.shape[:]
        base.shape.extend(rng.integers(-3, 70, size=int(rng.integers(0, 5))).tolist())
    elif choice == 4:
        base.shape.append(int(rng.choice([2**40, -1, 0, 1])))
    elif choice == 5:
        base.data = rng.bytes(int(rng.integers(0, 600)))
    elif choice == 6:
        if base.shape:
            base.shape[0] = int(base.shape[0]) + int(rng.choice([-1, 1, 2**31]))
    # choice 7: unchanged (some requests stay valid)
    return base


def test_codec_decode_raises_only_codec_errors():
    rng = np.random.default_rng(0)
    valid = [np.zeros((3, 64), np.float32), np.arange(5, dtype=np.int64), np.ones((2, 4, 64), np.float16)]
    for i in range(3000):
        tensor = random_tensor(rng, valid[i % 3] if i % 5 else None)
        try:
            array = codec.decode(tensor, "x0")
        except CodecError as exc:
            assert str(exc).startswith("x0: ")
            continue
        assert array.nbytes == len(tensor.data)


def test_kserve_decoder_raises_only_scoring_errors():
    rng = np.random.default_rng(1)
    names = ["x0", "t", "eps", "score", ""]
    for _ in range(2000):
        request = kserve_pb.ModelInferRequest(model_name="digits")
        raw = bool(rng.integers(2))
        for _ in range(int(rng.integers(0, 5))):
            datatype = str(rng.choice([*DATATYPES, "BYTES", "", "FP8"]))
            shape = rng.integers(-1, 5, size=int(rng.integers(0, 3))).tolist()
            tensor = request.inputs.add(name=str(rng.choice(names)), datatype=datatype, shape=shape)
            if raw:
                request.raw_input_contents.append(rng.bytes(int(rng.integers(0, 64))))
            else:
                tensor.contents.fp32_contents.extend(rng.standard_normal(int(rng.integers(0, 9))).tolist())
                tensor.contents.int64_contents.extend(rng.integers(0, 9, int(rng.integers(0, 9))).tolist())
        if rng.integers(4) == 0 and request.raw_input_contents:
            request.raw_input_contents.pop()
        try:
            decode_inputs(request)
        except ScoringError as exc:
            assert str(exc).split(":")[0].split("[")[0].split(".")[0] in FIELD_NAMES, str(exc)


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")) as running:
        yield running


def test_random_malformed_requests_get_named_errors_and_the_server_keeps_serving(server):
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((3, 64)).astype(np.float32)
    t = np.array([0, 50, 99], np.int64)
    candidates = rng.standard_normal((3, 4, 64)).astype(np.float32)
    seen: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        for i in range(150):
            fields = {"x0": codec.encode(x0), "t": codec.encode(t), "candidates": codec.encode(candidates)}
            target = ("x0", "t", "candidates")[i % 3]
            fields[target] = random_tensor(rng, {"x0": x0, "t": t, "candidates": candidates}[target])
            request = pb.SelectNoiseRequest(model=pb.ModelRef(name=str(rng.choice(["digits", "digits", "x"]))),
                                            keep=int(rng.integers(-1, 6)), rule=int(rng.choice([0, 1, 2, 3, 7])),
                                            temperature=float(rng.choice([0.0, 1.0, -1.0, np.nan])), **fields)
            try:
                stub.SelectNoise(request, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc.details()
                field = exc.details().split(":")[0].split(".")[0]
                assert field in FIELD_NAMES, exc.details()
            seen[code] = seen.get(code, 0) + 1
        ok = stub.SelectNoise(pb.SelectNoiseRequest(model=pb.ModelRef(name="digits"), keep=1, x0=codec.encode(x0),
                                                    t=codec.encode(t), candidates=codec.encode(candidates)))
        assert codec.decode(ok.indices).shape == (3, 1)
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 50
