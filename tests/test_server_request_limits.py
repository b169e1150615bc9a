"""The work one request may ask for is bounded before anything is expanded (SelectNoise's B*K or, for rule
assign, B*B triples; Score and KServe ModelInfer's N), the work queued per model version is bounded in
triples, and a model that scores NaN or Inf fails only the requests whose rows it spoiled, with
FAILED_PRECONDITION, and never reaches the statistics."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import free_port
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

RLIMIT_AS = 2 << 30  # the server process's address space in the memory test


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


def test_a_large_assign_is_refused_before_it_is_expanded(tmp_path, rater_onnx):
    """B=2048 under rule assign is 4M triples (gigabytes once expanded): a server with the default limits
    and a 2 GiB address space answers RESOURCE_EXHAUSTED at once and keeps serving."""
    from test_server_shutdown import wait_until_serving

    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    port = free_port()
    script = Path(sys.executable).parent / "rater-server"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "noiserater.server.main"]

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (RLIMIT_AS, RLIMIT_AS))

    proc = subprocess.Popen([*command, "serve", "--repository", str(repo), "--host", "127.0.0.1", "--port",
                             str(port), "--device", "cpu"], preexec_fn=limit_memory,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{port}"
    try:
        wait_until_serving(target, proc)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RaterServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.SelectNoise(select_request(2048), timeout=60)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "--max-assign-batch" in err.value.details()
            assert proc.poll() is None
            assert codec.decode(stub.SelectNoise(select_request(256), timeout=60).indices).shape == (256, 1)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert "Traceback" not in output


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


def overflowing_rater(path: Path, dim: int = 64, timesteps: int = 100) -> Path:
    """A rater whose score is sum(x0) * 1e30 * 1e30: 0 on the all-zero warm-up input, Inf on most real input."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceSum", ["x0", "axes"], ["sx"], keepdims=0),
        helper.make_node("Mul", ["sx", "big"], ["a"]),
        helper.make_node("Mul", ["a", "big"], ["b"]),
        helper.make_node("ReduceSum", ["eps", "axes"], ["se"], keepdims=0),
        helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["se", "tf"], ["c"]),
        helper.make_node("Mul", ["c", "zero"], ["d"]),  # eps and t take part, as a rater's inputs must
        helper.make_node("Add", ["b", "d"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes, "overflowing",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", dim]),
         helper.make_tensor_value_info("t", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        initializer=[helper.make_tensor("big", TensorProto.FLOAT, [], [1e30]),
                     helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                     helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    helper.set_model_props(model, {"noiserater.data_shape": f"[{dim}]", "noiserater.num_timesteps": str(timesteps)})
    onnx.save(model, str(path))
    return path


def test_a_model_that_scores_inf_fails_the_request_and_spares_the_statistics(tmp_path):
    repo = make_repository(tmp_path / "repo", {"digits": [overflowing_rater(tmp_path / "inf.onnx")]})
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
