"""Hardening, resource limits: a request, a model, a stream or a flood of names must not make a rater server
grow without bound or die. Every server here is a `rater-server` child process under an address-space limit,
so a reproduction can at worst kill that process, never the test run.

Flags assumed for the limits (passed as their RATER_SERVER_* variables, see support.hostile.new_flags):
--max-request-triples, --max-queued-triples, --max-datasets, --max-stream-in-flight, --max-concurrent-rpcs.
"""

from __future__ import annotations

import functools
import re
import threading

import grpc
import pytest
from support import free_port
from support.hostile import (
    GIB,
    IdleStream,
    ServerProcess,
    assign_request,
    call_code,
    constant_of_shape_bomb_bytes,
    loop_bomb_bytes,
    new_flags,
    plain_rater_bytes,
    rater_stub,
    scrape,
    select_request,
    serves_a_selection,
    sigterm_and_wait,
    stream_codes,
    wait_for,
    write_repository,
)

from noiserater.core.v1 import rater_service_pb2 as pb

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
REFUSALS = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
DATASET_CAP = 50


@pytest.fixture
def repo(tmp_path):
    return write_repository(tmp_path / "repo", {"digits": plain_rater_bytes()})


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    """A server started with no token file, a Prometheus port and a small cap on dataset ids."""
    repo = write_repository(tmp_path_factory.mktemp("open") / "repo", {"digits": plain_rater_bytes()})
    metrics_port = free_port()
    with ServerProcess(repo, "--metrics-port", str(metrics_port), env=new_flags(max_datasets=DATASET_CAP)) as server:
        server.metrics_port = metrics_port
        yield server.wait_serving()


def test_assign_request_beyond_the_work_limit_is_refused(repo):
    """A ~1 MB batch-level-assignment request (B=2048, K=1: 4M triples to score) is refused up front with
    RESOURCE_EXHAUSTED or INVALID_ARGUMENT by the default per-request work limit, and the server, under a
    1.5 GiB address-space limit, stays up and keeps serving."""
    with ServerProcess(repo, memory_limit=3 * GIB // 2) as server:
        server.wait_serving()
        with server.channel() as channel:
            code = call_code(rater_stub(channel).SelectNoise, assign_request(2048), timeout=60)
        assert server.alive(), server.wait_output()[-2000:]
        assert serves_a_selection(server.target)
        assert code in REFUSALS, code


def test_total_queued_work_is_bounded(tmp_path):
    """Eight large requests at once (batch-level assignment of B=256: 65,536 triples each) on one stream, to a
    slow model, with --max-queued-triples 100000: the ones that do not fit get RESOURCE_EXHAUSTED at once
    rather than queueing, nothing fails otherwise, and the server stays up."""
    repo = write_repository(tmp_path / "repo", {"digits": plain_rater_bytes(), "slow": loop_bomb_bytes(10**5)})
    env = new_flags(max_queued_triples=100_000, max_request_triples=100_000)
    with ServerProcess(repo, env=env) as server:
        server.wait_serving()
        with server.channel() as channel:
            codes = stream_codes(rater_stub(channel), [assign_request(256, model="slow", seed=i) for i in range(8)])
        assert server.alive() and serves_a_selection(server.target)
        assert set(codes) <= {0, RESOURCE_EXHAUSTED}, codes
        assert RESOURCE_EXHAUSTED in codes, codes


def test_constant_of_shape_bomb_is_refused_at_deploy(repo):
    """A 600-byte rater that asks for a 16 GiB tensor (ConstantOfShape([2**32])) is answered with an error at
    deploy, and the server (under a 2 GiB address-space limit) stays up and keeps serving."""
    with ServerProcess(repo) as server:
        server.wait_serving()
        with server.channel() as channel:
            code = call_code(rater_stub(channel).DeployModel,
                             pb.DeployModelRequest(name="bomb", onnx=constant_of_shape_bomb_bytes()), timeout=60)
        assert server.alive(), server.wait_output()[-2000:]
        assert code != grpc.StatusCode.OK
        assert serves_a_selection(server.target)


def test_endless_loop_model_fails_deploy_in_bounded_time(repo):
    """A rater whose first run loops 10**12 times (valid otherwise) fails its deploy with an answer from the
    server (any error code) within 6 s, given a validation time limit of 2 s (--validate-timeout-s 2); the server
    keeps answering SelectNoise meanwhile, and SIGTERM still stops it within the grace period."""
    with ServerProcess(repo, env=new_flags(validate_timeout_s=2), grace_s=5) as server:
        server.wait_serving()
        with server.channel() as channel:
            deploy = rater_stub(channel).DeployModel.future(
                pb.DeployModelRequest(name="endless", onnx=loop_bomb_bytes(10**12)), timeout=30)
            assert serves_a_selection(server.target, timeout=5)
            try:
                deploy.result(timeout=6)
                code = grpc.StatusCode.OK
            except grpc.FutureTimeoutError:
                code = None  # no answer from the server
            except grpc.RpcError as exc:
                code = exc.code()
            finally:
                deploy.cancel()
        assert code not in (None, grpc.StatusCode.OK), f"deploy answered {code}"
        assert serves_a_selection(server.target, timeout=5)
        exit_code, _ = sigterm_and_wait(server, timeout=5 + 5)
        assert exit_code == 0, server.output[-2000:]


def test_unknown_model_names_add_no_metric_series(open_server):
    """Requests naming many different unknown models (long invalid names and short valid-looking ones) add no
    Prometheus series per name: the `model` label of every series is a loaded model, empty, or one 'unknown'."""
    with open_server.channel() as channel:
        stub = rater_stub(channel)
        loaded = {m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
        for i in range(40):
            name = f"{i:04d}" + "x" * 10_000 if i % 2 else f"ghost-{i}"
            assert call_code(stub.SelectNoise, select_request(1, 2, model=name), timeout=10) != grpc.StatusCode.OK
        assert call_code(stub.SelectNoise, select_request(1, 2), timeout=10) == grpc.StatusCode.OK
    text = scrape(open_server.metrics_port)
    labels = set(re.findall(r'model="([^"]*)"', text))
    assert "digits" in labels
    shown = [value[:24] for value in sorted(labels)[:4]]
    assert labels <= loaded | {"", "unknown"}, f"{len(labels)} model label values, e.g. {shown}"


def test_dataset_ids_beyond_the_cap_are_refused_or_evicted(open_server):
    """2,000 requests with distinct dataset ids against a server with --max-datasets 50: beyond the cap they are
    refused with RESOURCE_EXHAUSTED or old datasets are evicted (and counted in a metric named *evict*);
    either way GetStats reports at most 50 datasets."""
    requests = [select_request(1, 2, dataset=f"ds-{i:05d}", seed=i) for i in range(2000)]
    with open_server.channel() as channel:
        stub = rater_stub(channel)
        codes = stream_codes(stub, requests)
        datasets = {b.dataset for b in stub.GetStats(pb.GetStatsRequest(), timeout=30).buckets}
    assert set(codes) <= {0, RESOURCE_EXHAUSTED}, set(codes)
    evictions = [line for line in scrape(open_server.metrics_port).splitlines()
                 if "evict" in line and not line.startswith("#") and float(line.rsplit(" ", 1)[1]) > 0]
    assert RESOURCE_EXHAUSTED in codes or evictions, "neither refused nor evicted"
    assert len(datasets) <= DATASET_CAP, f"GetStats reports {len(datasets)} datasets"


def test_get_stats_reply_stays_small_after_many_datasets(open_server):
    """After requests under 2,000 distinct dataset ids, one GetStats reply stays under 64 KB (a server pages or
    caps its statistics rather than answering them all in one message)."""
    requests = [select_request(1, 2, dataset=f"paged-{i:05d}", seed=i) for i in range(2000)]
    with open_server.channel() as channel:
        stub = rater_stub(channel)
        stream_codes(stub, requests)
        reply = stub.GetStats(pb.GetStatsRequest(), timeout=30)
    assert reply.ByteSize() < 64 * 1024, f"GetStats reply of {reply.ByteSize()} bytes"


def test_admin_rpcs_are_denied_without_a_token_file(open_server):
    """A server started without --auth-token-file (and without --insecure-admin) answers DeployModel,
    UnloadModel and SetDefaultVersion with PERMISSION_DENIED."""
    with open_server.channel() as channel:
        stub = rater_stub(channel)
        codes = {
            "deploy": call_code(stub.DeployModel, pb.DeployModelRequest(name="intruder", onnx=plain_rater_bytes()),
                                timeout=30),
            "set_default": call_code(stub.SetDefaultVersion,
                                     pb.SetDefaultVersionRequest(model=pb.ModelRef(name="digits", version=1)),
                                     timeout=10),
            "unload": call_code(stub.UnloadModel, pb.UnloadModelRequest(model=pb.ModelRef(name="ghost")), timeout=10),
        }
    assert codes == dict.fromkeys(codes, grpc.StatusCode.PERMISSION_DENIED), codes


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory):
    """A server with --max-stream-in-flight 64 and --max-concurrent-rpcs 4."""
    repo = write_repository(tmp_path_factory.mktemp("capped") / "repo", {"digits": plain_rater_bytes()})
    with ServerProcess(repo, env=new_flags(max_stream_in_flight=64, max_concurrent_rpcs=4)) as server:
        yield server.wait_serving()


def test_a_stream_is_not_read_past_its_in_flight_cap(capped_server):
    """1,000 requests of 32 KiB (32 MiB, more than gRPC's flow-control windows can hold) sent on one
    SelectNoiseStream to a server with --max-stream-in-flight 64 while the client reads no response: the server
    stops reading the stream (backpressure), so the client cannot send them all; once the client reads, every
    request is answered and the server keeps serving."""
    count = 1000
    sent = threading.Event()

    def messages():
        for i in range(count):
            yield pb.SelectNoiseStreamRequest(request_id=str(i), request=select_request(8, 16, keep=4, seed=i))
        sent.set()

    options = [("grpc.http2.bdp_probe", 0)]  # keep the client's receive window small: unread answers back up
    with grpc.insecure_channel(capped_server.target, options=options) as channel:
        responses = rater_stub(channel).SelectNoiseStream(messages(), timeout=120)
        assert not sent.wait(5), "the server read the whole stream although no answer was read: no backpressure"
        codes = [response.error_code for response in responses]
    assert sent.is_set() and len(codes) == count
    assert set(codes) == {0}, set(codes)
    assert serves_a_selection(capped_server.target)


def test_calls_beyond_the_concurrent_rpc_cap_are_refused(capped_server):
    """With --max-concurrent-rpcs 4 and four idle SelectNoiseStream calls open, a fifth call gets
    RESOURCE_EXHAUSTED; once the streams end, calls are served again. An idle stream reaches the server's
    count of RPCs at some point after it is opened (it sends nothing that could confirm it), so the fifth call
    is repeated until the streams have arrived; a stream refused because a call that had just ended still held
    its slot is opened again."""
    codes: list[grpc.StatusCode] = []

    def fifth_call_refused_or_a_stream_ended(idle: list[IdleStream]) -> bool:
        codes.append(call_code(stub.ListModels, pb.ListModelsRequest(), timeout=10))
        return codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED or any(s.call.done() for s in idle)

    with grpc.insecure_channel(capped_server.target) as channel:
        stub = rater_stub(channel)
        for _ in range(3):
            idle = [IdleStream(stub.SelectNoiseStream, timeout=30) for _ in range(4)]
            try:
                refused = wait_for(functools.partial(fifth_call_refused_or_a_stream_ended, idle), timeout=5)
            finally:
                for stream in idle:
                    stream.close()
            if refused and codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
            wait_for(lambda: serves_a_selection(capped_server.target), timeout=10)
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes[-5:]
    # The streams' cancellations reach the server asynchronously: their slots free up shortly.
    assert wait_for(lambda: serves_a_selection(capped_server.target), timeout=10)
