"""Server side of selection: concurrent SelectNoise equals the in-process selection, Redis counts every scored
candidate, bad requests get INVALID_ARGUMENT / NOT_FOUND naming the problem, and the CLI lists commands."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from support import select_in_process
from support.server import ServerThread, make_repository

from noiserater.core import codec
from noiserater.core.scoring import RaterSession
from noiserater.core.selection import SelectionPlan
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig

DATASET = "digits-select-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx, redis_url):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, redis_url=redis_url, max_delay_ms=2.0,
                          stats_flush_s=0.05)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.RaterServiceStub(channel)


def request(x0, t, candidates, keep, model="digits", dataset=DATASET, **kw) -> pb.SelectNoiseRequest:
    return pb.SelectNoiseRequest(model=pb.ModelRef(name=model), dataset=dataset, x0=codec.encode(x0),
                                 t=codec.encode(t), candidates=codec.encode(candidates), keep=keep, **kw)


def random_batch(seed: int, batch: int = 6, k: int = 8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 64)).astype(np.float32), rng.integers(0, 100, batch).astype(np.int64),
            rng.standard_normal((batch, k, 64)).astype(np.float32))


def test_concurrent_selections_match_in_process_and_redis_counts_every_candidate(server, stub, rater_onnx,
                                                                                  redis_url):
    local = RaterSession(rater_onnx, device="cpu")
    batches = [random_batch(seed) for seed in range(48)]

    def remote(i):
        x0, t, candidates = batches[i]
        return stub.SelectNoise(request(x0, t, candidates, keep=3))

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(remote, range(len(batches))))
    for (x0, t, candidates), response in zip(batches, responses, strict=True):
        want_idx, want_scores = select_in_process(local, x0, t, candidates, keep=3)
        np.testing.assert_array_equal(codec.decode(response.indices), want_idx)
        np.testing.assert_allclose(codec.decode(response.scores), want_scores, rtol=1e-5, atol=1e-6)
        assert response.model.name == "digits" and response.model.version == 1

    scored = sum(c.shape[0] * c.shape[1] for _, _, c in batches)
    stats = stub.GetStats(pb.GetStatsRequest(dataset=DATASET))  # flushes pending statistics first
    assert sum(b.count for b in stats.buckets) == scored
    assert {b.timestep_bucket for b in stats.buckets} <= set(range(stats.timestep_buckets))
    # ... and the numbers really live in Redis, under namespaced keys.
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"nr:stats:{DATASET}:digits:1:*"))
    assert keys and sum(int(client.hget(k, "count")) for k in keys) == scored
    assert all(client.ttl(k) > 0 for k in keys)
    # Chan's merge of many partial summaries equals the statistics of all scores at once.
    all_scores = np.concatenate([local.score(*_expand(*b)) for b in batches]).astype(np.float64)
    total = sum(b.count for b in stats.buckets)
    mean = sum(b.mean * b.count for b in stats.buckets) / total
    assert mean == pytest.approx(all_scores.mean(), rel=1e-5, abs=1e-6)
    assert min(b.min for b in stats.buckets) == pytest.approx(all_scores.min(), abs=1e-6)
    assert sum(sum(b.histogram) for b in stats.buckets) == scored


def _expand(x0, t, candidates):

    return SelectionPlan.for_candidates(candidates, 1, "top_k", 1.0).triples(x0, t, candidates)


def _bad_requests():
    x0, t, candidates = random_batch(99, batch=2, k=4)
    short = codec.encode(x0)
    short.data = short.data[:-4]
    nan_x0 = x0.copy()
    nan_x0[1, 3] = np.nan
    empty_k = np.zeros((2, 0, 64), np.float32)
    return [
        ("byte count", pb.SelectNoiseRequest(model=pb.ModelRef(name="digits"), x0=short, t=codec.encode(t),
                                             candidates=codec.encode(candidates), keep=1),
         grpc.StatusCode.INVALID_ARGUMENT, "x0: byte count"),
        ("k > K", request(x0, t, candidates, keep=5), grpc.StatusCode.INVALID_ARGUMENT, "keep: keep=5"),
        ("K = 0", request(x0, t, empty_k, keep=1), grpc.StatusCode.INVALID_ARGUMENT, "K must be at least 1"),
        ("unknown model", request(x0, t, candidates, keep=1, model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        ("NaN", request(nan_x0, t, candidates, keep=1), grpc.StatusCode.INVALID_ARGUMENT, "x0: contains NaN"),
        ("t out of range", request(x0, np.array([0, 100]), candidates, keep=1), grpc.StatusCode.INVALID_ARGUMENT,
         "t: timesteps must lie in [0, 100)"),
        ("shape", request(x0[:, :10], t, candidates, keep=1), grpc.StatusCode.INVALID_ARGUMENT, "x0: shape"),
        ("name escapes", request(x0, t, candidates, keep=1, model="../etc"), grpc.StatusCode.INVALID_ARGUMENT,
         "model.name"),
        ("dataset", request(x0, t, candidates, keep=1, dataset="a:b*"), grpc.StatusCode.INVALID_ARGUMENT,
         "dataset"),
        ("sample needs temperature", request(x0, t, candidates, keep=1, rule=pb.SELECTION_RULE_SAMPLE),
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_requests_are_named_and_the_server_keeps_serving(stub, case):
    _, bad, code, fragment = case
    with pytest.raises(grpc.RpcError) as err:
        stub.SelectNoise(bad)
    assert err.value.code() == code
    assert fragment in err.value.details()
    x0, t, candidates = random_batch(1, batch=2, k=4)
    assert codec.decode(stub.SelectNoise(request(x0, t, candidates, keep=2)).indices).shape == (2, 2)


def test_select_stream_answers_every_request_and_survives_bad_ones(stub):
    """One stream carries good and bad requests: each good one equals the unary answer, each bad one gets
    the unary call's status code and message, and the stream goes on to the next request."""
    goods = [request(*random_batch(seed, batch=3, k=4), keep=2) for seed in range(6)]
    bads = [case[1] for case in _bad_requests()]
    sent = [(f"good-{i}", r) for i, r in enumerate(goods)] + [(f"bad-{i}", r) for i, r in enumerate(bads)]
    sent.sort(key=lambda item: item[0][-1])  # interleave good and bad ones
    responses = list(stub.SelectNoiseStream(
        iter([pb.SelectNoiseStreamRequest(request_id=rid, request=r) for rid, r in sent]), timeout=60))
    by_id = {r.request_id: r for r in responses}
    assert len(responses) == len(sent) and set(by_id) == {rid for rid, _ in sent}
    for i, good in enumerate(goods):
        streamed = by_id[f"good-{i}"]
        unary = stub.SelectNoise(good)
        assert streamed.error_code == 0 and streamed.response.model.version == 1
        np.testing.assert_array_equal(codec.decode(streamed.response.indices), codec.decode(unary.indices))
    for i, (_, _, code, fragment) in enumerate(_bad_requests()):
        streamed = by_id[f"bad-{i}"]
        assert streamed.error_code == code.value[0] and fragment in streamed.error_message
        assert not streamed.HasField("response")


def test_score_and_metadata(stub, rater_onnx):
    local = RaterSession(rater_onnx, device="cpu")
    rng = np.random.default_rng(5)
    x0, eps = rng.standard_normal((2, 5, 64)).astype(np.float32)
    t = np.arange(5, dtype=np.int64)
    response = stub.Score(pb.ScoreRequest(model=pb.ModelRef(name="digits"), x0=codec.encode(x0),
                                          t=codec.encode(t), eps=codec.encode(eps)))
    np.testing.assert_allclose(codec.decode(response.scores), local.score(x0, t, eps), rtol=1e-5, atol=1e-6)
    meta = stub.GetModelMetadata(pb.GetModelMetadataRequest(model=pb.ModelRef(name="digits")))
    assert [i.name for i in meta.inputs] == ["x0", "t", "eps"] and list(meta.inputs[0].shape) == [-1, 64]
    assert meta.metadata["noiserater.num_timesteps"] == "100"


def rater_server_command() -> list[str]:
    script = Path(sys.executable).parent / "rater-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "noiserater.server.main"]


def test_help_lists_commands():
    out = subprocess.run([*rater_server_command(), "--help"], capture_output=True, text=True, check=True).stdout
    assert "serve" in out and "check" in out and "repository" in out


def test_config_errors_are_one_line(tmp_path):
    result = subprocess.run([*rater_server_command(), "serve", "--repository",
                             str(tmp_path), "--tls-cert", "missing.pem"], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "tls" in result.stderr
    assert "Traceback" not in result.stderr


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"noiserater.v1.RaterService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_cpu_fallback_gauge_says_whether_a_version_runs_on_cpu_when_cuda_was_asked_for(server):
    loaded = server.server.registry.get("digits")
    fallback = server.server.metrics.cpu_fallback.labels("digits", "1")._value.get()
    assert fallback == (1 if loaded.session.provider == "CPUExecutionProvider" else 0)  # device=auto here


def test_check_command(rater_onnx, tmp_path):
    ok = subprocess.run([*rater_server_command(), "check", str(rater_onnx)], capture_output=True, text=True)
    assert ok.returncode == 0 and "data_shape=[64]" in ok.stdout
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    result = subprocess.run([*rater_server_command(), "check", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1 and "onnx:" in result.stderr and "Traceback" not in result.stderr
