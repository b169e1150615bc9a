"""The remote selector fails closed on mistakes and falls back on outages: a typo in the model name, a
wrong token, a TLS mismatch or a shape mismatch raises SelectorError (at construction where it can);
an outage falls back without raising, opens the circuit breaker after `breaker_failures` failures (then
selections make no RPC), and the breaker closes once the server serves again. Real servers throughout:
in-process ones restarted on the same port, and a small fake RaterService for the status codes a rater
server does not produce on demand."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from support import export_random_rater, free_port
from support.hostile import inf_on_real_input_rater_bytes, write_repository
from support.server import ServerThread, make_repository

from noiserater.client.breaker import CircuitBreaker
from noiserater.client.selector import NoiseSelector, SelectorError
from noiserater.core.scoring import RaterSession
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig

TOKEN = "failures-token"


def batch(b=4, seed=0, shape=(64,)):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, *shape, generator=gen) * 2 - 1, torch.randint(0, 100, (b,), generator=gen)


def wait_for(predicate, timeout_s=30.0):
    """Poll `predicate` until it holds (the test fails after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, rater_onnx):
    return make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})


@pytest.fixture(scope="module")
def server(repo):
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, max_delay_ms=1.0)) as running:
        yield running


def serve(repo, port: int, **options) -> ServerThread:
    return ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=port, max_delay_ms=1.0,
                                     grace_s=0.5, **options)).start()


def test_mistakes_raise_at_construction(server, tmp_path):
    with pytest.raises(SelectorError, match=r"model: the rater server at .* has no model 'digts' \(NOT_FOUND"):
        NoiseSelector.remote(server.target, model="digts")
    with pytest.raises(SelectorError, match="has no model 'digits' version 9"):
        NoiseSelector.remote(server.target, model="digits", version=9)
    with pytest.raises(SelectorError, match=r"data_shape: model 'digits' version 1 on .* takes data of shape \[64\], "
                                            r"not \[1, 28, 28\] as the job expects"):
        NoiseSelector.remote(server.target, model="digits", data_shape=(1, 28, 28))
    with pytest.raises(SelectorError, match="num_timesteps: model 'digits' version 1 .* has 100 timesteps, not 1000"):
        NoiseSelector.remote(server.target, model="digits", num_timesteps=1000)
    other = export_random_rater(tmp_path / "other.onnx", data_shape=(8,))
    with pytest.raises(SelectorError, match=r"data_shape: .* takes data of shape \[64\], not \[8\] as the "
                                            "fallback_onnx rater expects"):
        NoiseSelector.remote(server.target, model="digits", fallback_onnx=other)
    with pytest.raises(SelectorError, match=r"data_shape: the fallback_onnx rater .* takes data of shape \[8\], not "
                                            r"\[64\] as the job expects"):
        NoiseSelector.remote(f"127.0.0.1:{free_port()}", model="digits", data_shape=64, fallback_onnx=other)

    with NoiseSelector.remote(server.target, model="digits", data_shape=(64,), num_timesteps=100) as selector:
        assert selector.select(*batch()).shape == (4, 64)
        with pytest.raises(SelectorError, match=r"x0: shape \[4, 1, 8, 8\] does not match \[B, \*\[64\]\] of model "
                                                r"'digits' on "):
            selector.select(*batch(shape=(1, 8, 8)))
        assert selector.counters["requests"] == 1  # the wrong shape never reached the server


def test_a_wrong_or_missing_token_raises(repo, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    running = serve(repo, port, auth_token_file=str(tmp_path / "token"), auth_all=True)
    try:
        for token in (None, "wrong"):
            with pytest.raises(SelectorError, match=r"token: the rater server at .* refused the token "
                                                    r"\(UNAUTHENTICATED: authorization:"):
                NoiseSelector.remote(running.target, model="digits", token=token)
        with NoiseSelector.remote(running.target, model="digits", token=TOKEN) as selector:
            assert selector.select(*batch()).shape == (4, 64) and selector.counters["served"] == 1
    finally:
        running.stop()


def test_a_tls_mismatch_raises(repo, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    for name in ("server", "stranger"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout",
                        str(tmp_path / f"{name}.key"), "-out", str(tmp_path / f"{name}.pem")],
                       check=True, capture_output=True)
    running = serve(repo, 0, tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.key"))
    plain = serve(repo, 0)
    target = f"localhost:{running.port}"
    try:
        with pytest.raises(SelectorError, match="tls: the rater server at .* serves TLS; pass tls_root_cert="):
            NoiseSelector.remote(target, model="digits")
        untrusted = "presents a certificate that tls_root_cert does not trust|failed the TLS handshake"
        with pytest.raises(SelectorError, match=f"tls: the rater server at .* ({untrusted})"):
            NoiseSelector.remote(target, model="digits", tls_root_cert=(tmp_path / "stranger.pem").read_bytes())
        plaintext = "does not serve TLS|failed the TLS handshake"
        with pytest.raises(SelectorError, match=f"tls: the rater server at .* ({plaintext})"):
            NoiseSelector.remote(f"localhost:{plain.port}", model="digits",
                                 tls_root_cert=(tmp_path / "server.pem").read_bytes())
        with NoiseSelector.remote(target, model="digits", tls_root_cert=(tmp_path / "server.pem").read_bytes()) as ok:
            assert ok.select(*batch()).shape == (4, 64)
    finally:
        running.stop()
        plain.stop()


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_a_model_unloaded_mid_run_raises(repo, transport):
    running = serve(repo, 0)
    try:
        selector = NoiseSelector.remote(running.target, model="digits", transport=transport)
        selector.select(*batch())
        running.call(running.server.registry.unload("digits", 0))
        with pytest.raises(SelectorError, match=r"model: the rater server at .* has no model 'digits' \(NOT_FOUND"):
            selector.select(*batch())
        assert selector.counters["fallback_gaussian"] == 0
        selector.close()
    finally:
        running.stop()


def test_a_model_that_scores_inf_raises_instead_of_falling_back(tmp_path):
    """A broken model is no outage: the server answers FAILED_PRECONDITION and the selection raises."""
    repo = write_repository(tmp_path / "repo", {"infinite": inf_on_real_input_rater_bytes()})
    running = serve(repo, 0)
    try:
        for transport in ("stream", "unary"):
            with NoiseSelector.remote(running.target, model="infinite", transport=transport) as selector:
                with pytest.raises(SelectorError, match=r"model: the rater server at .* cannot use model 'infinite' "
                                                        r"\(FAILED_PRECONDITION"):
                    selector.select(*batch())
                assert selector.counters["fallback_gaussian"] == 0 and selector.counters["outages"] == 0
    finally:
        running.stop()


class Refusing(pb_grpc.RaterServiceServicer):
    """A RaterService whose model exists and whose every selection fails with `code` and `message`."""

    def __init__(self, metadata):
        self.metadata, self.code, self.message = metadata, grpc.StatusCode.OK, ""

    def GetModelMetadata(self, request, context):
        return pb.GetModelMetadataResponse(model=pb.ModelRef(name="digits", version=1), metadata=self.metadata)

    def SelectNoise(self, request, context):
        context.abort(self.code, self.message)

    def SelectNoiseStream(self, requests, context):
        for message in requests:
            yield pb.SelectNoiseStreamResponse(request_id=message.request_id, error_code=self.code.value[0],
                                               error_message=self.message)


@pytest.fixture(scope="module")
def refusing(rater_onnx):
    servicer = Refusing(RaterSession(rater_onnx, device="cpu").info.metadata)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_RaterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("transport", ["stream", "unary"])
@pytest.mark.parametrize("code, message, falls_back", [
    (grpc.StatusCode.FAILED_PRECONDITION, "score: the model produced NaN", False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue of 4 requests is full", True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "candidates: 10000000 triples exceed the limit", False),
    (grpc.StatusCode.PERMISSION_DENIED, "authorization: not allowed", False),
    (grpc.StatusCode.UNKNOWN, "Unexpected <class 'KeyError'>", False),
    (grpc.StatusCode.UNAVAILABLE, "server is shutting down", True),
])
def test_status_codes_raise_or_fall_back(refusing, transport, code, message, falls_back):
    servicer, target = refusing
    servicer.code, servicer.message = code, message
    with NoiseSelector.remote(target, model="digits", transport=transport, max_attempts=1) as selector:
        if falls_back:
            assert selector.select(*batch()).shape == (4, 64)
            assert selector.counters["fallback_gaussian"] == 1 and selector.counters["outages"] == 1
        else:
            with pytest.raises(SelectorError, match=code.name) as err:
                selector.select(*batch())
            assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_outage_opens_the_breaker_and_recovery_closes_it(repo, rater_onnx, transport):
    port = free_port()
    running = serve(repo, port)
    selector = NoiseSelector.remote(running.target, model="digits", transport=transport, timeout_s=5,
                                    breaker_failures=2)
    try:
        selector.select(*batch())
        running.stop()
        for step in range(2):  # each pays the retry budget, falls back and counts towards the breaker
            assert selector.select(*batch(seed=step)).shape == (4, 64)
        counts = selector.counters
        assert counts["breaker_open"] == 1 and counts["fallback_gaussian"] == 2 and counts["outages"] == 2
        for step in range(5):  # open: no RPC at all, prefetched or not
            x0, t = batch(seed=10 + step)
            if step % 2:
                selector.prefetch(x0, t)
            assert selector.select(x0, t).shape == (4, 64)
        assert selector.counters["requests"] == counts["requests"] and selector.counters["fallback_gaussian"] == 7
        assert selector.health()["breaker_open"] and not selector.health()["serving"]

        running = serve(repo, port)
        wait_for(lambda: selector.counters["breaker_open"] == 0)
        assert selector.counters["probes"] >= 1 and selector.health()["serving"]
        served = selector.counters["served"]
        want = NoiseSelector.local(rater_onnx, num_candidates=8, seed=0)
        assert selector.select(*batch()).shape == (4, 64) and selector.counters["served"] == served + 1
        assert selector.counters["fallback_gaussian"] == 7 and want is not None
    finally:
        selector.close()
        running.stop()


def test_unreachable_at_construction_starts_open_and_checks_the_model_when_the_server_comes(repo):
    port = free_port()
    target = f"127.0.0.1:{port}"
    good = NoiseSelector.remote(target, model="digits")  # no raise: the server is down, not wrong
    typo = NoiseSelector.remote(target, model="digts")
    try:
        assert good.counters["breaker_open"] == typo.counters["breaker_open"] == 1
        assert good.select(*batch()).shape == (4, 64) and good.counters["fallback_gaussian"] == 1
        assert not good.health()["checked"]
        running = serve(repo, port)
        try:
            wait_for(lambda: good.counters["breaker_open"] == typo.counters["breaker_open"] == 0)
            assert good.health()["checked"] and good.select(*batch()).shape == (4, 64)
            assert good.counters["served"] == 1
            with pytest.raises(SelectorError, match="has no model 'digts'"):
                typo.select(*batch())
        finally:
            running.stop()
    finally:
        good.close()
        typo.close()


def test_breaker_trial_failure_reopens_at_once_and_backs_off():
    healthy = {"now": False}
    breaker = CircuitBreaker(lambda: healthy["now"], "fake", failures=3, interval_s=0.01)
    try:
        breaker.failed("down")
        breaker.failed("down")
        assert not breaker.is_open
        breaker.failed("down")
        assert breaker.is_open and breaker.trips == 1
        wait_for(lambda: breaker.probes >= 2)
        assert breaker.is_open  # the probe keeps failing
        healthy["now"] = True
        wait_for(lambda: not breaker.is_open)
        breaker.failed("still down")  # the trial selection after the probe fails: open again at once
        assert breaker.is_open and breaker.trips == 2 and breaker._hold_s == 0.02
        wait_for(lambda: not breaker.is_open)
        breaker.succeeded()  # a served selection: back to counting from zero, and the short hold
        assert breaker._hold_s == 0.01
        breaker.failed("down")
        assert not breaker.is_open
    finally:
        breaker.close()
        breaker.join()
