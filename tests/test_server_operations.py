"""Operating a rater server safely: admin RPCs off unless a token or --insecure-admin, auth decided before a
stream sends anything, a port in use is an error, the drain (late calls refused with UNAVAILABLE, idle
streams ended at once, a true count of dropped requests), per-stream backpressure and the RPC cap, the Redis
URL kept secret, TLS files checked at start, and the `rater-server health` probe."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import SelectStream, free_port
from support.server import ServerThread, make_repository

from noiserater.core import codec
from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.app import startup_warnings
from noiserater.server.config import ConfigError, ServerConfig, _redact
from noiserater.server.metrics import ServerMetrics
from noiserater.server.rpc import DRAINING_MESSAGE, RpcRuntime
from noiserater.server.tls import check_server_pair

TOKEN = "ops-token"


def rater_server(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "rater-server"
    return [str(script) if script.exists() else sys.executable, *([] if script.exists() else
                                                                   ["-m", "noiserater.server.main"]), *args]


def select_request(n: int = 4, seed: int = 0) -> pb.SelectNoiseRequest:
    rng = np.random.default_rng(seed)
    return pb.SelectNoiseRequest(
        model=pb.ModelRef(name="digits"), keep=1, x0=codec.encode(rng.standard_normal((n, 64)).astype(np.float32)),
        t=codec.encode(rng.integers(0, 100, n)),
        candidates=codec.encode(rng.standard_normal((n, 4, 64)).astype(np.float32)))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, rater_onnx) -> Path:
    return make_repository(tmp_path_factory.mktemp("ops-repo"), {"digits": [rater_onnx]})


def serve(repo: Path, **options) -> ServerThread:
    return ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu", **options))


# --- admin RPCs ---------------------------------------------------------------------------------------


def test_admin_rpcs_are_refused_without_a_token_unless_insecure_admin(tmp_path, rater_onnx):
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    admin_calls = [
        ("DeployModel", pb.DeployModelRequest(name="digits", onnx=rater_onnx.read_bytes())),
        ("SetDefaultVersion", pb.SetDefaultVersionRequest(model=pb.ModelRef(name="digits", version=1))),
        ("UnloadModel", pb.UnloadModelRequest(model=pb.ModelRef(name="digits", version=1))),
    ]
    with serve(repo) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        for method, request in admin_calls:
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, method)(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert "--auth-token-file" in err.value.details() and "--insecure-admin" in err.value.details()
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models] == ["digits"]
        assert stub.SelectNoise(select_request(), timeout=30).model.version == 1
    with serve(repo, insecure_admin=True) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        deployed = stub.DeployModel(admin_calls[0][1], timeout=60)
        assert deployed.model.version == 2
        stub.SetDefaultVersion(pb.SetDefaultVersionRequest(model=pb.ModelRef(name="digits", version=1)), timeout=30)
        stub.UnloadModel(pb.UnloadModelRequest(model=pb.ModelRef(name="digits", version=2)), timeout=30)
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "2"]


def test_startup_warnings(tmp_path):
    assert startup_warnings(ServerConfig(repository=tmp_path, host="127.0.0.1")) == []
    assert startup_warnings(ServerConfig(repository=tmp_path, host="::1")) == []
    exposed = startup_warnings(ServerConfig(repository=tmp_path))  # 0.0.0.0, plaintext
    assert len(exposed) == 1 and "plaintext on 0.0.0.0" in exposed[0]
    assert startup_warnings(ServerConfig(repository=tmp_path, tls_cert="c", tls_key="k")) == []
    (insecure,) = startup_warnings(ServerConfig(repository=tmp_path, host="localhost", insecure_admin=True))
    assert insecure.startswith("--insecure-admin:")


def test_insecure_admin_and_a_token_exclude_each_other(tmp_path):
    from test_server_config import parse

    token = tmp_path / "token"
    token.write_text(TOKEN)
    with pytest.raises(ConfigError, match="exclude each other"):
        parse(["--repository", str(tmp_path), "--insecure-admin", "--auth-token-file", str(token)])


def test_auth_all_refuses_a_stream_that_sends_nothing(tmp_path, repo):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    never = threading.Event()

    def silent():
        never.wait(30)
        return
        yield  # a generator that sends no message

    with serve(repo, auth_token_file=str(token), auth_all=True) as server, \
            grpc.insecure_channel(server.target) as channel:
        calls = [pb_grpc.RaterServiceStub(channel).SelectNoiseStream,
                 kserve_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer]
        try:
            for call in calls:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    next(call(silent(), timeout=20))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
                assert time.monotonic() - started < 15
        finally:
            never.set()
        # With the token, the stream works.
        responses = pb_grpc.RaterServiceStub(channel).SelectNoiseStream(
            iter([pb.SelectNoiseStreamRequest(request_id="1", request=select_request())]), timeout=60,
            metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert [r.error_code for r in responses] == [0]


# --- the port --------------------------------------------------------------------------------------------


def test_a_port_in_use_is_an_error_unless_reuse_port(repo):
    port = free_port()
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=port, device="cpu")):
        result = subprocess.run(rater_server("serve", "--repository", str(repo), "--host", "127.0.0.1", "--port",
                                             str(port), "--device", "cpu", "--insecure-admin"),
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"rater-server: error: --port: 127.0.0.1:{port} is already in use (another rater-server? --reuse-port "
        "lets servers share a port)"]
    port = free_port()
    shared = ServerConfig(repository=repo, host="127.0.0.1", port=port, device="cpu", reuse_port=True)
    with ServerThread(shared) as first, ServerThread(shared) as second:
        assert first.port == second.port == port


# --- the drain -------------------------------------------------------------------------------------------


def test_an_idle_stream_is_ended_at_once_by_the_drain(repo):
    server = serve(repo, grace_s=60).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stream = SelectStream(pb_grpc.RaterServiceStub(channel), timeout=120)
            assert stream.call(select_request()).error_code == 0
            started = time.monotonic()
            server.stop()
            server = None
            assert time.monotonic() - started < 10  # not the 60 s grace period
            with pytest.raises(grpc.RpcError) as err:
                stream.call(select_request())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and err.value.details() == DRAINING_MESSAGE
            stream.close()
    finally:
        if server is not None:
            server.stop()


def test_calls_that_reached_grpc_before_the_drain_are_refused_with_unavailable_not_cancelled(repo):
    """Calls that gRPC received while the event loop was busy (not yet seen by the server's handlers) when
    the drain began: each is answered or refused with UNAVAILABLE, none is cancelled, and the counts add up."""
    calls = 24
    server = serve(repo, grace_s=30).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RaterServiceStub(channel)
            assert stub.SelectNoise(select_request(), timeout=30).model.version == 1
            busy = threading.Event()

            def block_the_loop() -> None:
                busy.set()
                time.sleep(1.5)

            server.loop.call_soon_threadsafe(block_the_loop)
            assert busy.wait(10)
            futures = [stub.SelectNoise.future(select_request(seed=i), timeout=60) for i in range(calls)]
            time.sleep(0.5)  # the calls reach gRPC while the loop sleeps
            server.stop()
            codes = []
            for future in futures:
                try:
                    future.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        counters = server.server.runtime.counters
        assert counters.dropped == 0 and counters.received == counters.answered == 1 + codes.count(grpc.StatusCode.OK)
        server = None
    finally:
        if server is not None:
            server.stop()


class FakeStreamContext:
    """The part of grpc.aio.ServicerContext that serve_stream uses; `write` may block or fail."""

    def __init__(self, write_gate: asyncio.Event | None = None, fail_writes: bool = False):
        self.written: list = []
        self.write_gate = write_gate
        self.fail_writes = fail_writes

    async def write(self, message) -> None:
        if self.write_gate is not None:
            await self.write_gate.wait()
        if self.fail_writes:
            raise ConnectionError("the stream is gone")
        self.written.append(message)

    async def abort(self, code, details):
        raise RuntimeError(f"aborted {code.name}: {details}")


def run_stream(runtime: RpcRuntime, requests, context, handler, until):
    """Serve `requests` through runtime.serve_stream until `until()` holds; returns the serving task."""

    async def main():
        async def iterate():
            for request in requests:
                yield request

        task = asyncio.get_running_loop().create_task(
            runtime.serve_stream("SelectNoiseStream", iterate(), context, handler, lambda req, out: (req, out.code)))
        await until(task)
        return task

    return asyncio.run(main())


def test_a_response_that_cannot_be_written_counts_as_dropped():
    runtime = RpcRuntime(ServerMetrics())

    async def handler(request, call):
        return request

    async def until(task):
        with pytest.raises(ConnectionError):
            await task

    run_stream(runtime, [1], FakeStreamContext(fail_writes=True), handler, until)
    c = runtime.counters
    assert (c.received, c.answered, c.dropped, c.in_flight) == (1, 0, 1, 0)


def test_a_stream_is_not_read_past_its_in_flight_cap():
    runtime = RpcRuntime(ServerMetrics(), max_stream_in_flight=8)
    pulled = []

    def produce():
        for i in range(1000):
            pulled.append(i)
            yield i

    gate = asyncio.Event()

    async def handler(request, call):
        return request

    async def until(task):
        for _ in range(50):
            await asyncio.sleep(0.002)
        assert len(pulled) <= 9, len(pulled)  # the cap, plus the one the reader holds
        assert runtime.counters.in_flight <= 8
        gate.set()
        await asyncio.wait_for(task, 60)

    context = FakeStreamContext(write_gate=gate)  # writes wait: the client reads nothing
    run_stream(runtime, produce(), context, handler, until)
    assert len(context.written) == 1000 and runtime.counters.answered == 1000 and runtime.counters.in_flight == 0


def test_max_concurrent_rpcs(repo):
    with serve(repo, max_concurrent_rpcs=1) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        stream = SelectStream(stub, timeout=60)
        try:
            assert stream.call(select_request()).error_code == 0  # the stream holds the one RPC
            with pytest.raises(grpc.RpcError) as err:
                stub.SelectNoise(select_request(), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            stream.close()


# --- secrets and TLS -------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, shown", [
    ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
    ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://secret@host/0", "redis://***@host/0"),
    ("rediss://host:6380/0?password=secret&ssl_cert_reqs=none", "rediss://host:6380/0?password=***&ssl_cert_reqs=none"),
    ("unix:///run/redis.sock?db=0&password=secret", "unix:///run/redis.sock?db=0&password=***"),
    ("redis://host:6379/0", "redis://host:6379/0"),
])
def test_the_redis_url_is_printed_without_its_password(url, shown):
    assert _redact(url) == shown


def test_the_redis_url_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from test_server_config import parse

    url_file = tmp_path / "redis-url"
    url_file.write_text("\nredis://:s3cret@redis:6379/0\n")
    config = parse(["--repository", str(tmp_path), "--redis-url-file", str(url_file)])
    assert config.redis_url == "redis://:s3cret@redis:6379/0" and "s3cret" not in config.describe()
    with pytest.raises(ConfigError, match="^--redis-url and --redis-url-file exclude each other$"):
        parse(["--repository", str(tmp_path), "--redis-url-file", str(url_file), "--redis-url", "redis://x"])
    url_file.write_text("\n")
    with pytest.raises(ConfigError, match="is empty$"):
        parse(["--repository", str(tmp_path), "--redis-url-file", str(url_file)])
    monkeypatch.setenv("RATER_SERVER_REDIS_URL", "redis://:env-secret@redis:6379/1")
    assert parse(["--repository", str(tmp_path)]).redis_url == "redis://:env-secret@redis:6379/1"


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("certs")
    return make_cert(directory, "a"), make_cert(directory, "b")


@pytest.fixture(scope="module")
def ca_signed(certs, tmp_path_factory) -> tuple[Path, Path]:
    """A server certificate that is not a CA, for raters.example.com only, signed by certificate "a"."""
    (ca_cert, ca_key), _ = certs
    directory = tmp_path_factory.mktemp("leaf")
    cert, key, request, extensions = (directory / n for n in ("leaf.crt", "leaf.key", "leaf.csr", "ext.cnf"))
    extensions.write_text("subjectAltName=DNS:raters.example.com\nbasicConstraints=CA:FALSE\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=raters.example.com",
                    "-keyout", str(key), "-out", str(request)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_files_are_checked_at_start(certs, repo, tmp_path):
    (cert, key), (_, other_key) = certs
    check_server_pair(str(cert), str(key))
    with pytest.raises(ConfigError, match=f"^--tls-key: {other_key} does not match the certificate in --tls-cert"):
        check_server_pair(str(cert), str(other_key))
    with pytest.raises(ConfigError, match="^--tls-key: .* holds no PEM private key$"):
        check_server_pair(str(cert), str(cert))
    with pytest.raises(ConfigError, match="^--tls-cert: .* holds no PEM certificate$"):
        check_server_pair(str(key), str(key))
    result = subprocess.run(rater_server("serve", "--repository", str(repo), "--host", "127.0.0.1", "--port", "0",
                                         "--tls-cert", str(cert), "--tls-key", str(other_key)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"rater-server: error: --tls-key: {other_key} does not match the certificate in --tls-cert {cert}"]


def test_certificate_names(certs, ca_signed):
    from noiserater.server.tls import certificate_names

    (cert, key), _ = certs
    assert certificate_names(str(cert)) == ["localhost", "127.0.0.1"]
    assert certificate_names(str(ca_signed[0])) == ["raters.example.com"]
    assert certificate_names(str(key)) == []


def test_health_probe_speaks_tls_when_the_server_does(certs, ca_signed, repo, monkeypatch, capsys):
    from noiserater.server.main import main

    (cert, key), _ = certs
    with serve(repo, tls_cert=str(cert), tls_key=str(key)) as server:
        monkeypatch.setenv("RATER_SERVER_PORT", str(server.port))
        monkeypatch.setenv("RATER_SERVER_TLS_CERT", str(cert))
        assert main(["health"]) == 0
        assert capsys.readouterr().out == f"127.0.0.1:{server.port}: SERVING\n"
        monkeypatch.delenv("RATER_SERVER_TLS_CERT")
        assert main(["health", "--timeout-s", "2"]) == 1  # plaintext against a TLS server
        assert "rater-server: error: health: " in capsys.readouterr().err
    with serve(repo, tls_cert=str(ca_signed[0]), tls_key=str(ca_signed[1])) as server:
        assert main(["health", "--target", server.target, "--tls-cert", str(ca_signed[0])]) == 0
    with serve(repo) as server:
        assert main(["health", "--target", server.target]) == 0
    assert main(["health", "--target", f"127.0.0.1:{free_port()}", "--timeout-s", "1"]) == 1  # nothing listening
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("UNAVAILABLE" in err[0] or "DEADLINE_EXCEEDED" in err[0]), err
