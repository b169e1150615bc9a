"""Triton's own perf_analyzer (the binary in the tritonclient wheel) measures rater-server as it
would measure Triton: unary and --streaming, with server-side statistics from ModelStatistics."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from support.server import ServerThread, make_repository

from noiserater.cli import perf_analyzer
from noiserater.core.inference import grpc_service_pb2 as kserve_pb
from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
from noiserater.core.inference import model_config_pb2 as config_pb
from noiserater.server.config import ServerConfig

N_TRIPLES = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu", instances=1)) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield kserve_grpc.GRPCInferenceServiceStub(channel)


def triples(n: int = N_TRIPLES, seed: int = 0):
    rng = np.random.default_rng(seed)
    x0, eps = rng.standard_normal((2, n, 64)).astype(np.float32)
    return x0, rng.integers(0, 100, n).astype(np.int64), eps


def statistics(stub) -> kserve_pb.ModelStatistics:
    (stats,) = stub.ModelStatistics(kserve_pb.ModelStatisticsRequest(name="digits")).model_stats
    return stats


def test_model_config_describes_the_rater_and_the_batcher(stub):
    config = stub.ModelConfig(kserve_pb.ModelConfigRequest(name="digits")).config
    assert config.name == "digits" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
    fp32, int64 = config_pb.TYPE_FP32, config_pb.TYPE_INT64
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("x0", fp32, [-1, 64]), ("t", int64, [-1]), ("eps", fp32, [-1, 64])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("score", config_pb.TYPE_FP32, [-1])]
    assert config.parameters["dynamic_batching"].string_value == "on"
    assert config.parameters["metadata.noiserater.num_timesteps"].string_value == "100"
    assert config.instance_group[0].count == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelConfig(kserve_pb.ModelConfigRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_perf_analyzer_measures_the_server(server, stub, tmp_path, streaming):
    before = statistics(stub)
    data = perf_analyzer.write_input_data(tmp_path / "input.json", *triples())
    rows = perf_analyzer.run(server.target, "digits", data, [4], window_ms=300, csv_path=tmp_path / "out.csv",
                             streaming=streaming, stability_percent=100, max_trials=5, timeout_s=120)
    assert len(rows) == 1 and rows[0]["Concurrency"] == 4 and rows[0]["Inferences/Second"] > 0
    assert rows[0]["p50 latency"] > 0
    after = statistics(stub)
    answered = after.inference_stats.success.count - before.inference_stats.success.count
    # perf_analyzer's warm-up and measurement windows together sent at least a window's worth of requests,
    # every one of which scored N triples; none failed.
    assert answered >= rows[0]["Inferences/Second"] * 0.3
    assert after.inference_count - before.inference_count == answered * N_TRIPLES
    assert after.inference_stats.fail.count == before.inference_stats.fail.count
    assert 0 < after.execution_count - before.execution_count <= answered


def test_stream_infer_answers_each_request_and_keeps_going(stub):
    x0, t, eps = triples(n=3, seed=1)
    tensor = kserve_pb.ModelInferRequest.InferInputTensor

    def infer_request(request_id: str, t_values: np.ndarray) -> kserve_pb.ModelInferRequest:
        return kserve_pb.ModelInferRequest(
            model_name="digits", id=request_id,
            inputs=[tensor(name="x0", datatype="FP32", shape=[3, 64]), tensor(name="t", datatype="INT64", shape=[3]),
                    tensor(name="eps", datatype="FP32", shape=[3, 64])],
            raw_input_contents=[x0.tobytes(), t_values.tobytes(), eps.tobytes()])

    sent = [infer_request("a", t), infer_request("bad", np.array([0, 1, 1000], np.int64)), infer_request("b", t)]
    responses = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter(sent), timeout=60)}
    assert set(responses) == {"a", "bad", "b"}
    unary = np.frombuffer(stub.ModelInfer(sent[0]).raw_output_contents[0], "<f4")
    for good in ("a", "b"):
        assert responses[good].error_message == ""
        np.testing.assert_array_equal(np.frombuffer(responses[good].infer_response.raw_output_contents[0], "<f4"),
                                      unary)
    assert responses["bad"].error_message.startswith("INVALID_ARGUMENT: t: timesteps must lie in [0, 100)")


def test_server_metadata(stub):
    meta = stub.ServerMetadata(kserve_pb.ServerMetadataRequest())
    assert meta.name == "rater-server" and "statistics" in meta.extensions
