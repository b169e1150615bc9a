"""The work one request may ask for is bounded before anything is expanded (SelectNoise's B*K or, for rule
assign, B*B triples; Score and KServe ModelInfer's N), the work queued per model version is bounded in
triples, and a model that scores NaN or Inf fails only the requests whose rows it spoiled, with
FAILED_PRECONDITION, and never reaches the statistics."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from support.hostile import inf_on_real_input_rater_bytes, write_repository
from support.server import ServerThread, make_repository

from noiserater.core import codec
from noiserater.core.inference import grpc_service_pb2 as kserve_pb
from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.batcher import DynamicBatcher, NonFiniteScoresError, QueueFullError
from noiserater.server.config import ServerConfig
from noiserater.server.metrics import ServerMetrics
from noiserater.server.rpc import status_of


def select_request(batch: int, k: int = 1, rule: int = pb.SELECTION_RULE_ASSIGN, seed: int = 0,
                   dataset: str = "limits") -> pb.SelectNoiseRequest:
    rng = np.random.default_rng(seed)
    return pb.SelectNoiseRequest(
        model=pb.ModelRef(name="digits"), keep=1, rule=rule, dataset=dataset,
        x0=codec.encode(rng.standard_normal((batch, 64)).astype(np.float32)),
        t=codec.encode(rng.integers(0, 100, batch)),
        candidates=codec.encode(rng.standard_normal((batch, k, 64)).astype(np.float32)))


def score_request(n: int, x0_value: float = 0.5, dataset: str = "limits", model: str = "digits") -> pb.ScoreRequest:
    x0 = np.full((n, 64), x0_value, np.float32)
    return pb.ScoreRequest(model=pb.ModelRef(name=model), dataset=dataset, x0=codec.encode(x0),
                           t=codec.encode(np.arange(n) % 100), eps=codec.encode(np.ones((n, 64), np.float32)))


def infer_request(n: int) -> kserve_pb.ModelInferRequest:
    tensor = kserve_pb.ModelInferRequest.InferInputTensor
    x0 = np.zeros((n, 64), np.float32)
    return kserve_pb.ModelInferRequest(
        model_name="digits",
        inputs=[tensor(name="x0", datatype="FP32", shape=[n, 64]), tensor(name="t", datatype="INT64", shape=[n]),
                tensor(name="eps", datatype="FP32", shape=[n, 64])],
        raw_input_contents=[x0.tobytes(), np.zeros(n, np.int64).tobytes(), x0.tobytes()])


@pytest.fixture(scope="module")
def small_limits(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu", max_request_triples=100,
                          max_assign_batch=8, max_queued_triples=100)
    with ServerThread(config) as running, grpc.insecure_channel(running.target) as channel:
        yield pb_grpc.RaterServiceStub(channel), kserve_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("call, flag", [
    (lambda v1, ks: v1.SelectNoise(select_request(9), timeout=30), "--max-assign-batch"),
    (lambda v1, ks: v1.SelectNoise(select_request(13, k=8, rule=pb.SELECTION_RULE_TOP_K), timeout=30),
     "--max-request-triples"),
    (lambda v1, ks: v1.Score(score_request(101), timeout=30), "--max-request-triples"),
    (lambda v1, ks: ks.ModelInfer(infer_request(101), timeout=30), "--max-request-triples"),
], ids=["assign-batch", "select-triples", "score-triples", "kserve-triples"])
def test_one_requests_work_is_bounded_and_the_message_names_the_flag(small_limits, call, flag):
    v1, ks = small_limits
    with pytest.raises(grpc.RpcError) as err:
        call(v1, ks)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert flag in err.value.details()
    # At the limit everything still works.
    assert codec.decode(v1.SelectNoise(select_request(8), timeout=30).indices).shape == (8, 1)
    assert codec.decode(v1.Score(score_request(100), timeout=30).scores).shape == (100,)
    assert ks.ModelInfer(infer_request(100), timeout=30).outputs[0].shape == [100]


def test_queued_work_is_bounded_in_triples():
    """The queue refuses a request whose triples would pass max_queued_triples, however few requests are
    queued; a request arriving at an idle batcher is always taken."""
    release = asyncio.Event()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        def blocked_score(x0, t, eps):
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=60)
            return np.zeros(x0.shape[0], np.float32)

        def triples(n: int):
            return np.zeros((n, 2), np.float32), np.zeros(n, np.int64), np.zeros((n, 2), np.float32)

        with ThreadPoolExecutor(max_workers=2) as pool:
            batcher = DynamicBatcher(blocked_score, pool, ServerMetrics(), ("m", "1"), max_batch=1000,
                                     max_delay_s=0.0, max_queue=100, max_queued_triples=50)
            first = batcher.submit(*triples(60))  # larger than the bound, but the batcher was idle
            with pytest.raises(QueueFullError) as err:
                batcher.submit(*triples(1))
            assert status_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-queued-triples" in str(err.value)
            release.set()
            assert (await first).shape == (60,)
            second, third = batcher.submit(*triples(30)), batcher.submit(*triples(20))
            with pytest.raises(QueueFullError):
                batcher.submit(*triples(1))
            assert (await second).shape == (30,) and (await third).shape == (20,)
            await batcher.close()

    asyncio.run(scenario())


def test_non_finite_rows_fail_only_their_own_request():
    """Three requests merged into one run; the middle one's rows come out Inf: it alone fails, with
    FAILED_PRECONDITION, and the others get their scores."""
    calls: list[int] = []

    def score(x0, t, eps):
        calls.append(x0.shape[0])
        return np.where(x0[:, 0] > 0, np.float32(np.inf), np.float32(0))

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = DynamicBatcher(score, pool, ServerMetrics(), ("m", "1"), max_batch=9, max_delay_s=5.0,
                                     max_queue=10)
            jobs = [batcher.submit(np.full((3, 2), value, np.float32), np.zeros(3, np.int64),
                                   np.zeros((3, 2), np.float32)) for value in (0.0, 1.0, 0.0)]
            results = await asyncio.gather(*jobs, return_exceptions=True)
            await batcher.close()
            assert isinstance(results[1], NonFiniteScoresError)
            assert status_of(results[1]) == grpc.StatusCode.FAILED_PRECONDITION
            assert "NaN or Inf" in str(results[1]) and "m version 1" in str(results[1])
            np.testing.assert_array_equal(results[0], np.zeros(3, np.float32))
            np.testing.assert_array_equal(results[2], np.zeros(3, np.float32))
            assert batcher.statistics.fail_count == 1 and batcher.statistics.success_count == 2

    asyncio.run(scenario())
    assert calls == [9]


def test_a_model_that_scores_inf_fails_the_request_and_spares_the_statistics(tmp_path):
    repo = write_repository(tmp_path / "repo", {"digits": inf_on_real_input_rater_bytes()})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")
    with ServerThread(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        assert codec.decode(stub.Score(score_request(4, x0_value=0.0, dataset="inf"), timeout=30).scores).tolist() \
            == [0.0] * 4
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(score_request(4, x0_value=1.0, dataset="inf"), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details().startswith("score: model digits version 1 produced NaN or Inf")
        with pytest.raises(grpc.RpcError) as err:
            stub.SelectNoise(select_request(4, k=2, rule=pb.SELECTION_RULE_TOP_K, dataset="inf"), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stats = stub.GetStats(pb.GetStatsRequest(dataset="inf"), timeout=30)
        assert sum(b.count for b in stats.buckets) == 4
        assert all(np.isfinite([b.mean, b.m2, b.min, b.max]).all() for b in stats.buckets)
