"""Client-chosen input cannot grow the server's memory or its answers: metric labels name only loaded models,
the datasets kept are capped, GetStats is paged; client mistakes (garbage protobuf, impossible shapes, odd
versions, wrong dtypes, names ending in a newline) are INVALID_ARGUMENT with a short message naming the
field, logged in one rate-limited line without a traceback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import grpc
import numpy as np
import pytest
from support.server import ServerThread, make_repository

from noiserater.core import codec, repository
from noiserater.core.inference import grpc_service_pb2 as kserve_pb
from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.core.v1 import tensor_pb2
from noiserater.server import service_v1, stats
from noiserater.server.config import ServerConfig

MAX_DATASETS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    # --insecure-admin: an admin call's bad request reaches the server's checks (else PERMISSION_DENIED first).
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu", max_datasets=MAX_DATASETS,
                          insecure_admin=True)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.RaterServiceStub(channel)


@pytest.fixture(scope="module")
def kserve(channel):
    return kserve_grpc.GRPCInferenceServiceStub(channel)


def score_request(n: int = 3, dataset: str = "inputs", model: str = "digits", eps_dtype=np.float32,
                  t=None) -> pb.ScoreRequest:
    t = np.arange(n) % 100 if t is None else t
    return pb.ScoreRequest(model=pb.ModelRef(name=model), dataset=dataset,
                           x0=codec.encode(np.zeros((n, 64), np.float32)), t=codec.encode(t),
                           eps=codec.encode(np.ones((n, 64), eps_dtype)))


def infer_request(model_name: str = "digits", model_version: str = "", x0_datatype: str = "FP32",
                  eps_datatype: str = "FP32") -> kserve_pb.ModelInferRequest:
    tensor = kserve_pb.ModelInferRequest.InferInputTensor
    sizes = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
    return kserve_pb.ModelInferRequest(
        model_name=model_name, model_version=model_version,
        parameters={"dataset": kserve_pb.InferParameter(string_param="inputs")},
        inputs=[tensor(name="x0", datatype=x0_datatype, shape=[2, 64]), tensor(name="t", datatype="INT64", shape=[2]),
                tensor(name="eps", datatype=eps_datatype, shape=[2, 64])],
        raw_input_contents=[np.zeros((2, 64), sizes[x0_datatype]).tobytes(), np.zeros(2, np.int64).tobytes(),
                            np.zeros((2, 64), sizes[eps_datatype]).tobytes()])


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def request_labels(server) -> set[tuple[str, str]]:
    """(model, version) label values of nr_requests_total."""
    labels = set()
    for metric in server.server.metrics.registry.collect():
        if metric.name == "nr_requests":
            labels |= {(s.labels["model"], s.labels["version"]) for s in metric.samples}
    return labels


def test_metric_labels_name_only_loaded_models(server, stub, kserve):
    for i in range(30):
        error_of(lambda i=i: stub.Score(score_request(model=f"no-such-model-{i}"), timeout=30))
        error_of(lambda i=i: stub.Score(score_request(model="x" * 1000 + str(i)), timeout=30))
        error_of(lambda i=i: kserve.ModelInfer(infer_request(model_name=f"nope{i}"), timeout=30))
        error_of(lambda i=i: kserve.ModelInfer(infer_request(model_version=str(100 + i)), timeout=30))
    stub.Score(score_request(), timeout=30)
    assert request_labels(server) <= {("unknown", ""), ("digits", "1"), ("", "")}
    assert ("digits", "1") in request_labels(server)


def test_datasets_are_capped_and_rejections_counted(server, stub):
    kept = []
    for i in range(3 * MAX_DATASETS):
        try:
            stub.Score(score_request(dataset=f"cap-{i}"), timeout=30)
            kept.append(f"cap-{i}")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-datasets" in err.details()
    assert 0 < len(kept) <= MAX_DATASETS
    stub.Score(score_request(dataset=kept[0]), timeout=30)  # a kept dataset goes on being served
    rejected = server.server.metrics.registry.get_sample_value("nr_datasets_rejected_total")
    assert rejected == 3 * MAX_DATASETS - len(kept)
    found = stub.GetStats(pb.GetStatsRequest(), timeout=30).buckets
    assert {b.dataset for b in found} <= set(kept) | {"inputs"}


def test_get_stats_is_paged(server, stub, monkeypatch):
    stub.Score(score_request(n=100, dataset="inputs"), timeout=30)  # every timestep bucket of one dataset
    everything = []
    token = ""
    while True:
        page = stub.GetStats(pb.GetStatsRequest(page_size=3, page_token=token), timeout=30)
        assert len(page.buckets) <= 3
        everything.extend((b.dataset, b.model, b.version, b.timestep_bucket) for b in page.buckets)
        token = page.next_page_token
        if not token:
            break
    assert everything == sorted(set(everything)) and len(everything) >= 10
    monkeypatch.setattr(service_v1, "STATS_PAGE_SIZE", 4)
    first = stub.GetStats(pb.GetStatsRequest(), timeout=30)  # no page_size: the default, bounded page
    assert len(first.buckets) == 4 and first.next_page_token
    bad = error_of(lambda: stub.GetStats(pb.GetStatsRequest(page_token="garbage!" * 100), timeout=30))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and bad.details().startswith("page_token:")
    assert len(bad.details()) < 200
    bad = error_of(lambda: stub.GetStats(pb.GetStatsRequest(model="*"), timeout=30))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and bad.details().startswith("model.name:")
    # nrctl stats reads every page.
    proc = subprocess.run([sys.executable, "-m", "noiserater.cli.main", "stats", "--server", server.target, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = [(b["dataset"], b["model"], b["version"], b["timestep_bucket"])
              for b in json.loads(proc.stdout)["buckets"]]
    assert set(everything) <= set(listed) and len(listed) == len(set(listed))


def test_garbage_protobuf_is_invalid_argument_in_one_log_line(server, channel, caplog):
    raw_score = channel.unary_unary("/noiserater.v1.RaterService/Score")
    raw_stream = channel.stream_stream("/noiserater.v1.RaterService/SelectNoiseStream")
    with caplog.at_level(logging.INFO):
        for _ in range(20):
            err = error_of(lambda: raw_score(b"\xff\xff\xff\xff not protobuf", timeout=30))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("request:")
        err = error_of(lambda: list(raw_stream(iter([b"\x0a\xff\xff"]), timeout=30)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [r for r in caplog.records if "not a valid protobuf" in r.getMessage()]
    assert 1 <= len(lines) <= 2 and not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("shape", [[2**40, 2**40, 0], [2**62, 4, 0], [0, 2**63 - 1, 2**63 - 1], [1] * 70],
                         ids=["beyond-int64", "beyond-int64-bytes", "max-int64", "70-dims"])
def test_impossible_shapes_are_invalid_argument(stub, kserve, shape, caplog):
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape, data=b"")
    with caplog.at_level(logging.INFO):
        err = error_of(lambda: stub.Score(pb.ScoreRequest(model=pb.ModelRef(name="digits"), x0=tensor, t=tensor,
                                                          eps=tensor), timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("x0: ")
        request = infer_request()
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(shape)
        err = error_of(lambda: kserve.ModelInfer(request, timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("inputs[x0].shape: ")
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("version", ["²", "1²", "٣", "99999999999999999999999", "-1", " 1"])
def test_odd_kserve_versions_are_invalid_argument(kserve, version):
    err = error_of(lambda: kserve.ModelInfer(infer_request(model_version=version), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("model_version:")


def test_echoed_values_are_truncated(stub, kserve):
    long_name = "n" * 10_000
    for call in (lambda: stub.Score(score_request(model=long_name), timeout=30),
                 lambda: stub.Score(score_request(dataset=long_name), timeout=30),
                 lambda: stub.GetStats(pb.GetStatsRequest(dataset=long_name), timeout=30),
                 lambda: kserve.ModelInfer(infer_request(model_name=long_name), timeout=30),
                 lambda: kserve.ModelInfer(infer_request(model_version="9" * 10_000), timeout=30),
                 lambda: stub.UnloadModel(pb.UnloadModelRequest(model=pb.ModelRef(name=long_name)), timeout=30)):
        err = error_of(call)
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert len(err.details()) < 300 and "(10000 chars)" in err.details()
    request = infer_request()
    request.inputs[0].datatype = "F" * 10_000
    assert len(error_of(lambda: kserve.ModelInfer(request, timeout=30)).details()) < 300


def test_wrong_dtypes_are_invalid_argument_naming_the_field(stub, kserve):
    err = error_of(lambda: stub.Score(score_request(eps_dtype=np.int64), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("eps: dtype int64")
    select = pb.SelectNoiseRequest(model=pb.ModelRef(name="digits"), keep=1, dataset="inputs",
                                   x0=codec.encode(np.zeros((2, 64), np.float32)),
                                   t=codec.encode(np.zeros(2, np.int64)),
                                   candidates=codec.encode(np.zeros((2, 4, 64), np.int32)))
    err = error_of(lambda: stub.SelectNoise(select, timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("candidates: dtype int32")
    err = error_of(lambda: kserve.ModelInfer(infer_request(x0_datatype="FP64"), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("inputs[x0].datatype:")
    err = error_of(lambda: kserve.ModelInfer(infer_request(eps_datatype="INT64"), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("inputs[eps].datatype:")
    assert kserve.ModelInfer(infer_request(), timeout=30).outputs[0].shape == [2]


@pytest.mark.parametrize("name", ["digits\n", "evil\n", "a\nb", ""])
def test_names_and_datasets_must_match_whole(stub, name):
    with pytest.raises(repository.RepositoryError):
        repository.check_model_name(name)
    with pytest.raises(stats.StatsError):
        stats.check_dataset(name)
    err = error_of(lambda: stub.Score(score_request(model=name), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    if name:
        err = error_of(lambda: stub.Score(score_request(dataset=name), timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("dataset:")
