"""Hot deploys under load, corrupt uploads, admin auth, unload and default versions."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from support import SelectStream, select_in_process
from support.server import ServerThread, make_repository

from noiserater.core import codec
from noiserater.core.scoring import RaterSession
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig

TOKEN = "s3cret-token"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
CLIENTS = 32


@pytest.fixture
def server(tmp_path, rater_onnx):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, auth_token_file=str(token_file),
                          max_delay_ms=1.0)
    with ServerThread(config) as running:
        yield running


def score_request(seed: int, n: int = 4) -> tuple[pb.ScoreRequest, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    x0, eps = rng.standard_normal((2, n, 64)).astype(np.float32)
    t = rng.integers(0, 100, n).astype(np.int64)
    req = pb.ScoreRequest(model=pb.ModelRef(name="digits"), x0=codec.encode(x0), t=codec.encode(t),
                          eps=codec.encode(eps))
    return req, (x0, t, eps)


def select_request(seed: int, n: int = 4) -> tuple[pb.SelectNoiseRequest, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, 64)).astype(np.float32)
    t = rng.integers(0, 100, n).astype(np.int64)
    candidates = rng.standard_normal((n, 4, 64)).astype(np.float32)
    req = pb.SelectNoiseRequest(model=pb.ModelRef(name="digits"), x0=codec.encode(x0), t=codec.encode(t),
                                candidates=codec.encode(candidates), keep=1)
    return req, (x0, t, candidates)


@pytest.mark.parametrize("transport", ["unary", "stream"])
def test_32_clients_see_no_error_while_a_new_version_is_deployed(server, rater_onnx, rater_onnx_v2, transport):
    """Unary: Score calls; stream: SelectNoiseStream, one stream per client kept open across the deploy."""
    sessions = {1: RaterSession(rater_onnx, device="cpu"), 2: RaterSession(rater_onnx_v2, device="cpu")}
    deployed = threading.Event()
    warmed = threading.Barrier(CLIENTS + 1)
    errors: list[str] = []
    seen: list[set[int]] = [set() for _ in range(CLIENTS)]

    def unary_call(stub, seed: int):
        req, triple = score_request(seed)
        response = stub.Score(req, timeout=60)
        ok = np.allclose(codec.decode(response.scores), sessions[response.model.version].score(*triple),
                         rtol=1e-5, atol=1e-6)
        return response.model.version, ok

    def stream_call(stream: SelectStream, seed: int):
        req, arrays = select_request(seed)
        answer = stream.call(req)
        if answer.error_code:
            raise RuntimeError(f"status {answer.error_code}: {answer.error_message}")
        version = answer.response.model.version
        want, _ = select_in_process(sessions[version], *arrays)
        return version, np.array_equal(codec.decode(answer.response.indices), want)

    def client(i: int) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RaterServiceStub(channel)
            stream = SelectStream(stub) if transport == "stream" else None
            try:
                for j in range(400):
                    try:
                        version, ok = stream_call(stream, 1000 * i + j) if stream else unary_call(stub, 1000 * i + j)
                    except (grpc.RpcError, RuntimeError) as exc:
                        errors.append(f"client {i}: {exc}")
                        return
                    seen[i].add(version)
                    if not ok:
                        errors.append(f"client {i}: wrong answer from version {version}")
                        return
                    if j == 2:
                        warmed.wait(timeout=60)  # every client is mid-run before the deploy starts
                    if deployed.is_set() and version == 2 and j >= 5:
                        return
            finally:
                if stream is not None:
                    stream.close()
        errors.append(f"client {i} never saw version 2")

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures = [pool.submit(client, i) for i in range(CLIENTS)]
        warmed.wait(timeout=60)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RaterServiceStub(channel)
            response = stub.DeployModel(pb.DeployModelRequest(name="digits", onnx=rater_onnx_v2.read_bytes()),
                                        metadata=ADMIN, timeout=60)
            assert response.model.version == 2
        deployed.set()
        for future in futures:
            future.result()
    assert errors == []
    assert all(s == {1, 2} for s in seen)  # each client was served by version 1, then by 2
    assert (server.config.repository / "digits" / "2" / "model.onnx").read_bytes() == rater_onnx_v2.read_bytes()


def test_admin_rpcs_need_the_token(server, rater_onnx_v2):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        deploy = pb.DeployModelRequest(name="digits", onnx=rater_onnx_v2.read_bytes())
        for metadata in (None, (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.DeployModel(deploy, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization" in err.value.details()
        for call, req in ((stub.UnloadModel, pb.UnloadModelRequest(model=pb.ModelRef(name="digits"))),
                          (stub.SetDefaultVersion, pb.SetDefaultVersionRequest(model=pb.ModelRef(name="digits")))):
            with pytest.raises(grpc.RpcError) as err:
                call(req)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Scoring needs no token unless --auth-all.
        assert stub.Score(score_request(0)[0]).model.version == 1
        assert not (server.config.repository / "digits" / "2").exists()


def test_corrupt_uploads_are_rejected_and_the_old_version_keeps_serving(server, rater_onnx, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    good = rater_onnx.read_bytes()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    wrong_signature = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                        opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    no_metadata = onnx.load_model_from_string(good)
    del no_metadata.metadata_props[:]
    cases = {
        b"this is not onnx at all": "onnx:",
        good[: len(good) // 2]: "onnx:",
        b"": "onnx: the upload is empty",
        wrong_signature.SerializeToString(): "signature",
        no_metadata.SerializeToString(): "metadata",
    }
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        for data, fragment in cases.items():
            with pytest.raises(grpc.RpcError) as err:
                stub.DeployModel(pb.DeployModelRequest(name="digits", onnx=data), metadata=ADMIN)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert fragment in err.value.details()
            assert stub.Score(score_request(1)[0]).model.version == 1
        with pytest.raises(grpc.RpcError) as err:
            stub.DeployModel(pb.DeployModelRequest(name="../../etc", onnx=good), metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.DeployModel(pb.DeployModelRequest(name="digits", version=1, onnx=good), metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert sorted(p.name for p in (server.config.repository / "digits").iterdir()) == ["1"]
    assert not (tmp_path / "etc").exists()


def test_pinned_default_and_unload(server, rater_onnx_v2):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        stub.DeployModel(pb.DeployModelRequest(name="digits", onnx=rater_onnx_v2.read_bytes()), metadata=ADMIN)
        assert stub.Score(score_request(2)[0]).model.version == 2
        stub.SetDefaultVersion(pb.SetDefaultVersionRequest(model=pb.ModelRef(name="digits", version=1)),
                               metadata=ADMIN)
        assert stub.Score(score_request(2)[0]).model.version == 1
        pinned, _ = score_request(3)
        pinned.model.version = 2
        assert stub.Score(pinned).model.version == 2
        stub.UnloadModel(pb.UnloadModelRequest(model=pb.ModelRef(name="digits", version=2)), metadata=ADMIN)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(pinned)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "version" in err.value.details()
        listing = stub.ListModels(pb.ListModelsRequest())
        assert [(m.name, [v.version for v in m.versions], m.default_version) for m in listing.models] == [
            ("digits", [1], 1)]
        stub.UnloadModel(pb.UnloadModelRequest(model=pb.ModelRef(name="digits")), metadata=ADMIN)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(score_request(4)[0])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_auth_all_protects_scoring_but_not_health(tmp_path, rater_onnx):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, auth_token_file=str(token_file),
                          auth_all=True)
    with ServerThread(config) as running, grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(score_request(0)[0])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Score(score_request(0)[0], metadata=ADMIN).model.version == 1
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
