"""Hardening, answers to client mistakes: a malformed request is the client's fault and must come back
INVALID_ARGUMENT (never INTERNAL or UNKNOWN), an error message must not echo a huge input back, wrong dtypes
must not be cast silently, an unauthenticated stream must be refused at once, and metadata anyone may read must
not expose the server's file system. One in-process server (support.server.ServerThread) per configuration."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from support.hostile import (
    TOKEN,
    IdleStream,
    call_error,
    plain_rater_bytes,
    rater_metadata,
    rater_stub,
    raw_unary,
    score_request,
    select_request,
    write_repository,
)
from support.server import ServerThread

from noiserater.core import codec
from noiserater.core.inference import grpc_service_pb2 as kpb
from noiserater.core.inference import grpc_service_pb2_grpc as kgrpc
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import tensor_pb2
from noiserater.server.config import ServerConfig

INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Provenance with absolute paths, as `nrctl export` records the checkpoint it exported.
SECRET_PATHS = {"checkpoint": "/home/alice/runs/2025-01-01/rater.pt", "output_dir": "/srv/noiserater/exports"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = {"digits": plain_rater_bytes(), "prov": plain_rater_bytes(rater_metadata(provenance=SECRET_PATHS))}
    repo = write_repository(tmp_path_factory.mktemp("errors") / "repo", models)
    # Admin RPCs allowed without a token, so that a garbage DeployModel reaches the request parser.
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu", insecure_admin=True)
    with ServerThread(config) as running:
        yield running


def tensor(dtype: int, shape: list[int], data: bytes = b"") -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def v1_score(**fields) -> pb.ScoreRequest:
    request = score_request(2)
    for name, value in fields.items():
        getattr(request, name).CopyFrom(value)
    return request


def v1_select(**fields) -> pb.SelectNoiseRequest:
    request = select_request(2, 4)
    for name, value in fields.items():
        getattr(request, name).CopyFrom(value)
    return request


def infer_request(x0_shape=(2, 64), x0_data: bytes | None = None, x0_type="FP32", eps_type="FP32",
                  eps_data: bytes | None = None, version: str = "", model: str = "digits") -> kpb.ModelInferRequest:
    n = 2
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((n, 64)).astype(np.float32).tobytes() if x0_data is None else x0_data
    eps = rng.standard_normal((n, 64)).astype(np.float32).tobytes() if eps_data is None else eps_data
    tensor_spec = kpb.ModelInferRequest.InferInputTensor
    return kpb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[tensor_spec(name="x0", datatype=x0_type, shape=list(x0_shape)),
                tensor_spec(name="t", datatype="INT64", shape=[n]),
                tensor_spec(name="eps", datatype=eps_type, shape=[n, 64])],
        raw_input_contents=[x0, np.zeros(n, np.int64).tobytes(), eps])


F32 = tensor_pb2.DTYPE_FLOAT32
HUGE_ZERO_SIZE = [0, 2**62, 2**62]  # no elements, but a byte size far beyond int64
MISTAKES = [
    pytest.param("v1", "Score", lambda: v1_score(x0=tensor(F32, [2**32] * 3)), id="v1-score-shape-product-overflow"),
    pytest.param("v1", "Score", lambda: v1_score(x0=tensor(F32, HUGE_ZERO_SIZE)), id="v1-score-zero-size-overflow"),
    pytest.param("v1", "SelectNoise", lambda: v1_select(candidates=tensor(F32, HUGE_ZERO_SIZE)),
                 id="v1-select-zero-size-overflow"),
    pytest.param("v1", "Score", lambda: v1_score(x0=tensor(F32, [1] * 65, b"\0" * 4)), id="v1-score-65-dims"),
    pytest.param("kserve", "ModelInfer", lambda: infer_request(x0_shape=[2**32] * 3, x0_data=b""),
                 id="kserve-infer-shape-product-overflow"),
    pytest.param("kserve", "ModelInfer", lambda: infer_request(x0_shape=HUGE_ZERO_SIZE, x0_data=b""),
                 id="kserve-infer-zero-size-overflow"),
    pytest.param("kserve", "ModelInfer", lambda: infer_request(x0_shape=[1] * 65, x0_data=b"\0" * 4),
                 id="kserve-infer-65-dims"),
    pytest.param("kserve", "ModelInfer", lambda: infer_request(version="²"), id="kserve-infer-version-superscript"),
    pytest.param("kserve", "ModelMetadata", lambda: kpb.ModelMetadataRequest(name="digits", version="²"),
                 id="kserve-metadata-version-superscript"),
    pytest.param("kserve", "ModelConfig", lambda: kpb.ModelConfigRequest(name="digits", version="²"),
                 id="kserve-config-version-superscript"),
    pytest.param("kserve", "ModelInfer", lambda: infer_request(version="9" * 10_000),
                 id="kserve-infer-version-10000-digits"),
]


def stub_for(channel, service: str):
    return rater_stub(channel) if service == "v1" else kgrpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("service, method, make", MISTAKES)
def test_malformed_request_is_invalid_argument(channel, service, method, make):
    """A request with a shape whose byte size overflows int64 (with or without zero-size axes), more than 64
    dimensions, or a model version that is not an ASCII integer ('²') or far beyond int64 (10,000 digits) is
    answered INVALID_ARGUMENT."""
    code, details = call_error(getattr(stub_for(channel, service), method), make(), timeout=10)
    assert code == INVALID, (code, details[:300])


def test_model_ready_with_a_non_ascii_version_is_not_ready(channel):
    """ModelReady with version '²' answers ready=false (as for any version that is not loaded) or
    INVALID_ARGUMENT."""
    stub = kgrpc.GRPCInferenceServiceStub(channel)
    try:
        assert not stub.ModelReady(kpb.ModelReadyRequest(name="digits", version="²"), timeout=10).ready
    except grpc.RpcError as exc:
        assert exc.code() == INVALID, (exc.code(), exc.details())


@pytest.mark.parametrize("method", ["/noiserater.v1.RaterService/SelectNoise",
                                    "/noiserater.v1.RaterService/DeployModel",
                                    "/inference.GRPCInferenceService/ModelInfer",
                                    "/inference.GRPCInferenceService/ServerLive"])
def test_garbage_request_bytes_are_invalid_argument(channel, method):
    """Bytes that are not a protobuf message of the method's request type are answered INVALID_ARGUMENT."""
    code, details = call_error(raw_unary, channel, method, b"\xff\xff\xff\xff\x0f not a protobuf message")
    assert code == INVALID, (code, details[:300])


LONG = "n" * 10_000
ECHO_CASES = [
    pytest.param("v1", "SelectNoise", lambda: select_request(2, 4, model=LONG), id="v1-select-model"),
    pytest.param("v1", "SelectNoise", lambda: select_request(2, 4, dataset=LONG), id="v1-select-dataset"),
    pytest.param("v1", "Score", lambda: score_request(2, model=LONG), id="v1-score-model"),
    pytest.param("v1", "GetModelMetadata", lambda: pb.GetModelMetadataRequest(model=pb.ModelRef(name=LONG)),
                 id="v1-metadata-model"),
    pytest.param("v1", "GetStats", lambda: pb.GetStatsRequest(dataset=LONG), id="v1-stats-dataset"),
    pytest.param("kserve", "ModelInfer", lambda: infer_request(model=LONG), id="kserve-infer-model"),
    pytest.param("kserve", "ModelMetadata", lambda: kpb.ModelMetadataRequest(name=LONG), id="kserve-metadata-model"),
]


@pytest.mark.parametrize("service, method, make", ECHO_CASES)
def test_error_message_does_not_echo_a_huge_input(channel, service, method, make):
    """A request naming a 10 KB model name or dataset id is refused (INVALID_ARGUMENT or NOT_FOUND) with
    an error message under 512 characters."""
    code, details = call_error(getattr(stub_for(channel, service), method), make(), timeout=10)
    assert code in (INVALID, grpc.StatusCode.NOT_FOUND), (code, details[:200])
    assert len(details) < 512, f"{len(details)} characters of details"


def as_int32(array: np.ndarray) -> tensor_pb2.Tensor:
    return codec.encode(np.asarray(array).astype(np.int32))


INT_CASES = [
    pytest.param("v1", "SelectNoise", lambda: v1_select(candidates=as_int32(np.ones((2, 4, 64)))),
                 id="v1-select-int32-candidates"),
    pytest.param("v1", "Score", lambda: v1_score(eps=as_int32(np.ones((2, 64)))), id="v1-score-int32-eps"),
    pytest.param("kserve", "ModelInfer",
                 lambda: infer_request(eps_type="INT32", eps_data=np.ones((2, 64), np.int32).tobytes()),
                 id="kserve-infer-int32-eps"),
    pytest.param("kserve", "ModelInfer",
                 lambda: infer_request(x0_type="FP64", x0_data=np.ones((2, 64), np.float64).tobytes()),
                 id="kserve-infer-fp64-x0"),
]


@pytest.mark.parametrize("service, method, make", INT_CASES)
def test_wrong_input_dtype_is_invalid_argument(channel, service, method, make):
    """Integer (int32) candidates or eps, and FP64 x0 on KServe, are refused with INVALID_ARGUMENT rather than
    cast to float32: the rater's inputs are float32."""
    code, details = call_error(getattr(stub_for(channel, service), method), make(), timeout=10)
    assert code == INVALID, (code, details[:300])


def strings_in(value) -> list[str]:
    """Every string in a metadata value, looking inside JSON objects and lists."""
    try:
        parsed = json.loads(value)
    except ValueError:
        return [value]
    found, stack = [], [parsed]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found or [value]


def test_model_metadata_exposes_no_absolute_paths(channel):
    """GetModelMetadata and KServe ModelConfig, which need no token, show no absolute file-system path in any
    metadata value of a rater whose provenance records where it was trained."""
    metadata = rater_stub(channel).GetModelMetadata(
        pb.GetModelMetadataRequest(model=pb.ModelRef(name="prov")), timeout=10).metadata
    config = kgrpc.GRPCInferenceServiceStub(channel).ModelConfig(kpb.ModelConfigRequest(name="prov"), timeout=10)
    values = [*metadata.values(), *(p.string_value for p in config.config.parameters.values())]
    exposed = [s for v in values for s in strings_in(v) if s.startswith("/")]
    assert not exposed, exposed


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory):
    """An in-process server with --auth-all."""
    folder = tmp_path_factory.mktemp("locked")
    (folder / "token").write_text(TOKEN + "\n")
    repo = write_repository(folder / "repo", {"digits": plain_rater_bytes()})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu",
                          auth_token_file=str(folder / "token"), auth_all=True)
    with ServerThread(config) as running:
        yield running


def test_unauthenticated_stream_without_messages_is_refused_at_once(locked_server):
    """With --auth-all, a SelectNoiseStream or ModelStreamInfer call without a token that sends no message is
    answered UNAUTHENTICATED, not left open until the client's 5 s deadline."""
    with grpc.insecure_channel(locked_server.target) as opened:
        streams = [IdleStream(rater_stub(opened).SelectNoiseStream, timeout=5),
                   IdleStream(kgrpc.GRPCInferenceServiceStub(opened).ModelStreamInfer, timeout=5)]
        try:
            codes = [stream.call.code() for stream in streams]
        finally:
            for stream in streams:
                stream.close()
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2, codes
