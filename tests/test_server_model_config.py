"""Per-model batching from `<repository>/<name>/config.pbtxt` (Triton's format) over the server's flags:
parsing, the batcher's run sizes, ModelConfig, and a bad config skipping its model with one line."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from support.server import ServerThread, make_repository

from noiserater.core.inference import grpc_service_pb2 as kserve_pb
from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.batcher import DynamicBatcher
from noiserater.server.config import ServerConfig
from noiserater.server.metrics import ServerMetrics
from noiserater.server.model_config import Batching, ModelConfigError, read_settings

FLAGS = Batching(max_batch=8192, max_delay_ms=5.0, instances=1)


def write_config(model_dir, text: str):
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir


def test_fields_override_the_flags_and_the_rest_keep_them(tmp_path):
    assert read_settings(tmp_path / "none", FLAGS).batching == FLAGS
    full = write_config(tmp_path / "digits", """
        name: "digits"
        platform: "onnxruntime_onnx"
        max_batch_size: 64
        dynamic_batching { max_queue_delay_microseconds: 1500 preferred_batch_size: [ 64, 16, 16 ] }
        instance_group [ { count: 2 }, { name: "more" } ]
    """)
    assert read_settings(full, FLAGS).batching == Batching(max_batch=64, max_delay_ms=1.5, instances=3,
                                                           preferred=(16, 64))
    assert read_settings(write_config(tmp_path / "a", "instance_group [ { count: 4 } ]"), FLAGS).batching == Batching(
        max_batch=8192, max_delay_ms=5.0, instances=4)
    # dynamic_batching without a delay means no delay, as in Triton; max_batch_size 0 switches batching off.
    off = write_config(tmp_path / "b", "max_batch_size: 0 dynamic_batching { }")
    assert read_settings(off, FLAGS).batching == Batching(max_batch=0, max_delay_ms=0.0, instances=1)


@pytest.mark.parametrize("text, fragment", [
    ("max_batch_size: lots", "Couldn't parse integer"),
    ("model_warmup [ ]", 'no field named "model_warmup"'),
    ("version_policy { latest { } }", "version_policy.latest.num_versions: must be >= 1, got 0"),
    ("version_policy { specific { } }", "version_policy.specific.versions: give one or more versions"),
    ('input [ { name: "x0" } ]', "input: not read by rater-server"),
    ('name: "other"', "name: 'other' is not 'digits'"),
    ('platform: "tensorrt_plan"', "platform: 'tensorrt_plan' is not 'onnxruntime_onnx'"),
    ("max_batch_size: -1", "max_batch_size: must be >= 0"),
    ("max_batch_size: 8 dynamic_batching { preferred_batch_size: [ 16 ] }",
     "preferred_batch_size: 16 is not within 1..max_batch_size (8)"),
    ("instance_group [ { kind: KIND_GPU } ]", "instance_group.kind: the device is the server's --device"),
])
def test_a_bad_config_is_one_named_line(tmp_path, text, fragment):
    with pytest.raises(ModelConfigError) as err:
        read_settings(write_config(tmp_path / "digits", text), FLAGS)
    message = str(err.value)
    assert message.startswith("config.pbtxt: ") and fragment in message and "\n" not in message


def run_sizes(max_batch: int, preferred: tuple[int, ...], requests: int) -> list[int]:
    """Triples per onnxruntime run when `requests` one-triple requests are queued before the batcher runs."""
    runs: list[int] = []

    def score(x0, t, eps):
        runs.append(x0.shape[0])
        return np.zeros(x0.shape[0], np.float32)

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = DynamicBatcher(score, pool, ServerMetrics(), ("m", "1"), max_batch=max_batch, max_delay_s=0.0,
                                     max_queue=100, preferred=preferred)
            one = np.zeros((1, 2), np.float32), np.zeros(1, np.int64), np.zeros((1, 2), np.float32)
            await asyncio.gather(*[batcher.submit(*one) for _ in range(requests)])
            await batcher.close()

    asyncio.run(scenario())
    return runs


def test_preferred_sizes_cut_runs_back_to_the_largest_one_they_make_up():
    assert run_sizes(4, (), 5) == [4, 1]
    assert run_sizes(4, (2,), 5) == [2, 2, 1]
    assert run_sizes(4, (2, 3), 7) == [3, 3, 1]


CONFIGS = {
    "small": "max_batch_size: 8",
    "large": """max_batch_size: 32
                instance_group [ { count: 2 } ]
                dynamic_batching { max_queue_delay_microseconds: 1500 preferred_batch_size: [ 16, 32 ] }""",
    "broken": "max_batch_size: eight",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {name: [rater_onnx] for name in (*CONFIGS, "plain")})
    for name, text in CONFIGS.items():
        (repo / name / "config.pbtxt").write_text(text)
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu", max_batch=1000, max_delay_ms=0.25,
                          insecure_admin=True)
    with ServerThread(config) as running:
        yield running


def model_config(server, name: str):
    with grpc.insecure_channel(server.target) as channel:
        return kserve_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            kserve_pb.ModelConfigRequest(name=name)).config


def test_model_config_reports_each_models_own_batching(server):
    small, large, plain = (model_config(server, name) for name in ("small", "large", "plain"))
    for config, triples, instances, delay_us in ((small, "8", 1, 250), (large, "32", 2, 1500), (plain, "1000", 1, 250)):
        assert config.max_batch_size == 0  # every input carries its own N axis
        assert config.parameters["dynamic_batching"].string_value == "on"
        assert config.parameters["max_batch_triples"].string_value == triples
        assert config.parameters["max_queue_delay_microseconds"].string_value == str(delay_us)
        assert config.dynamic_batching.max_queue_delay_microseconds == delay_us
        assert config.instance_group[0].count == instances
    assert list(large.dynamic_batching.preferred_batch_size) == [16, 32]
    assert list(small.dynamic_batching.preferred_batch_size) == []


def test_each_batcher_runs_within_its_models_max_batch_size(server):
    """Eight requests of 4 triples each, queued before either batcher runs: the small model's runs take 8
    triples, the large model's one run takes all 32 (its preferred size)."""

    async def queue_all() -> None:
        rng = np.random.default_rng(0)
        jobs = []
        for name in ("small", "large"):
            batcher = server.server.registry.get(name).batcher
            for _ in range(8):
                x0, eps = rng.standard_normal((2, 4, 64)).astype(np.float32)
                jobs.append(batcher.submit(x0, rng.integers(0, 100, 4), eps))
        await asyncio.gather(*jobs)

    server.call(queue_all())
    with grpc.insecure_channel(server.target) as channel:
        stats = kserve_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(kserve_pb.ModelStatisticsRequest())
    runs = {s.name: (s.inference_count, s.execution_count) for s in stats.model_stats}
    assert runs["small"] == (32, 4) and runs["large"] == (32, 1)
    batch_triples = server.server.metrics.batch_triples
    assert batch_triples.labels("small", "1")._sum.get() == 32
    assert all(sample.value == 4 for sample in batch_triples.collect()[0].samples
               if sample.name.endswith("_bucket") and sample.labels["model"] == "small"
               and float(sample.labels["le"]) >= 8)


def test_a_bad_config_skips_its_model_with_one_line(server, rater_onnx):
    (problem,) = server.server.load_problems
    assert problem.startswith("broken: config.pbtxt: ") and "eight" in problem and "\n" not in problem
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        names = [m.name for m in stub.ListModels(pb.ListModelsRequest()).models]
        assert names == ["large", "plain", "small"]
        with pytest.raises(grpc.RpcError) as err:
            stub.DeployModel(pb.DeployModelRequest(name="broken", onnx=rater_onnx.read_bytes()))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details().startswith("config.pbtxt: ")
    with pytest.raises(grpc.RpcError) as err:
        model_config(server, "broken")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
