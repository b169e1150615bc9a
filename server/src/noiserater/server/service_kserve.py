"""inference.GRPCInferenceService: the KServe v2 / Triton gRPC protocol over the same models and batchers,
so tritonclient and perf_analyzer can score with a rater as they would against Triton; with the repository
extension (index, load, unload: admin RPCs, audited like the v1 DeployModel)."""

from __future__ import annotations

import math

import grpc
import numpy as np

from noiserater.core import codec, scoring
from noiserater.core.inference import grpc_service_pb2 as pb
from noiserater.core.inference import grpc_service_pb2_grpc as pb_grpc
from noiserater.core.inference import model_config_pb2 as config_pb
from noiserater.core.text import clip, clip_shape
from noiserater.server.inference import Inference, RequestLimits
from noiserater.server.model_config import BACKEND, PLATFORM, VersionPolicy
from noiserater.server.models import ModelNotFoundError, ModelRegistry, ModelVersion, public_metadata
from noiserater.server.rpc import UNKNOWN_MODEL, CallContext, Outcome, RpcRuntime, unary
from noiserater.server.service_v1 import audited, removed_versions
from noiserater.server.stats import StatsRecorder

# KServe datatype -> (numpy dtype, InferTensorContents field for typed contents)
DATATYPES: dict[str, tuple[np.dtype, str]] = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP16": (np.dtype("<f2"), ""),  # FP16 has no typed field in the protocol: raw contents only
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
}
# The datatypes each input takes, as the v1 API does (the model's own types first).
INPUT_DATATYPES: dict[str, tuple[str, ...]] = {
    scoring.INPUT_X0: ("FP32", "FP16"), scoring.INPUT_T: ("INT64", "INT32"), scoring.INPUT_EPS: ("FP32", "FP16"),
}
MAX_VERSION_DIGITS = 18  # every version of up to 18 digits fits an int64
TENSOR_TYPES = {"FP32": config_pb.TYPE_FP32, "INT64": config_pb.TYPE_INT64}


TensorSpec = tuple[str, str, list[int]]  # name, KServe datatype, shape


def tensor_signature(version: ModelVersion) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(name, KServe datatype, shape) of the rater's inputs and output; -1 marks the N-triples axis."""
    data = [-1, *version.session.info.data_shape]
    inputs = [(scoring.INPUT_X0, "FP32", data), (scoring.INPUT_T, "INT64", [-1]), (scoring.INPUT_EPS, "FP32", data)]
    return inputs, [(scoring.OUTPUT_SCORE, "FP32", [-1])]


def model_config(version: ModelVersion, full_metadata: bool = False,
                 policy: VersionPolicy | None = None) -> config_pb.ModelConfig:
    """The version's configuration in Triton's terms (its metadata as `public_metadata` shows it unless
    `full_metadata`). max_batch_size is left at 0 because every input
    carries its own N axis; the batcher that merges requests along it is dynamic_batching, instance_group
    and the `parameters` (max_batch_triples is the config.pbtxt's max_batch_size)."""
    inputs, outputs = tensor_signature(version)
    batching = version.batching
    kind = (config_pb.ModelInstanceGroup.KIND_CPU if version.cpu_fallback
            else config_pb.ModelInstanceGroup.KIND_GPU)
    metadata = version.session.info.reported_metadata()
    parameters = {f"metadata.{k}": v for k, v in (metadata if full_metadata else public_metadata(metadata)).items()}
    parameters.update({
        "dynamic_batching": "on" if batching.max_batch > 0 else "off",
        "max_batch_triples": str(batching.max_batch),
        "max_queue_delay_microseconds": str(int(batching.max_delay_ms * 1000)),
        "max_queue_requests": str(version.batcher.max_queue),
        "execution_provider": version.session.provider,
    })
    dynamic = None
    if batching.max_batch > 0:
        dynamic = config_pb.ModelDynamicBatching(preferred_batch_size=batching.preferred,
                                                 max_queue_delay_microseconds=int(batching.max_delay_ms * 1000))
    return config_pb.ModelConfig(
        name=version.name, platform=PLATFORM, backend=BACKEND, dynamic_batching=dynamic,
        version_policy=(policy or VersionPolicy()).to_proto(),
        input=[config_pb.ModelInput(name=n, data_type=TENSOR_TYPES[d], dims=shape) for n, d, shape in inputs],
        output=[config_pb.ModelOutput(name=n, data_type=TENSOR_TYPES[d], dims=shape) for n, d, shape in outputs],
        # With batching off every request runs on its own, as many at once as the worker threads allow.
        instance_group=[config_pb.ModelInstanceGroup(name=version.name, kind=kind,
                                                     count=batching.instances if batching.max_batch > 0 else 0)],
        default_model_filename="model.onnx",
        parameters={k: config_pb.ModelParameter(string_value=v) for k, v in parameters.items()})


def model_statistics(version: ModelVersion) -> pb.ModelStatistics:
    s = version.batcher.statistics
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=version.name, version=str(version.version), last_inference=s.last_inference_ms,
        inference_count=s.inference_count, execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(count=s.success_count, ns=s.success_ns),
            fail=duration(count=s.fail_count, ns=s.fail_ns),
            queue=duration(count=s.success_count, ns=s.queue_ns),
            compute_input=duration(count=s.success_count, ns=s.compute_input_ns),
            compute_infer=duration(count=s.success_count, ns=s.compute_ns),
            compute_output=duration(count=s.success_count, ns=s.compute_output_ns)))


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("noiserater-server")
    except PackageNotFoundError:
        return "unknown"


def parse_version(text: str, field: str = "model_version") -> int:
    """A version string as an int; only ASCII digits count (str.isdigit also takes '²', which int() refuses)."""
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_VERSION_DIGITS:
        raise scoring.ScoringError(f"{field}: {clip(text)} is not an integer version (1 to {MAX_VERSION_DIGITS} "
                                   "digits)")
    return int(text)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Inputs by name, from raw_input_contents (one entry per input, in order) or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise scoring.ScoringError(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs (one per input expected)")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in INPUT_DATATYPES:
            raise scoring.ScoringError(f"inputs[{i}].name: unknown input {clip(tensor.name)} (a rater takes x0, t, "
                                       "eps)")
        field = f"inputs[{tensor.name}]"
        if tensor.name in out:
            raise scoring.ScoringError(f"{field}: input given twice")
        accepted = INPUT_DATATYPES[tensor.name]
        if tensor.datatype not in accepted:
            raise scoring.ScoringError(f"{field}.datatype: {clip(tensor.datatype)} is not one of {', '.join(accepted)}")
        dtype, typed_field = DATATYPES[tensor.datatype]
        try:
            shape = codec.check_shape(f"{field}.shape", tensor.shape, dtype.itemsize)
        except codec.CodecError as exc:
            raise scoring.ScoringError(str(exc)) from None
        count = math.prod(shape)
        if raw:
            data = raw[i]
            if len(data) != count * dtype.itemsize:
                raise scoring.ScoringError(
                    f"{field}: byte count {len(data)} does not match shape {clip_shape(shape)} x {tensor.datatype} "
                    f"({count * dtype.itemsize} bytes expected)")
            array = np.frombuffer(data, dtype=dtype)
        else:
            values = getattr(tensor.contents, typed_field) if typed_field else []
            if len(values) != count:
                raise scoring.ScoringError(
                    f"{field}.contents: {len(values)} values for shape {clip_shape(shape)} ({count} expected)")
            array = np.asarray(values, dtype=dtype)
        out[tensor.name] = array.reshape(shape)
    missing = [n for n in scoring.INPUT_NAMES if n not in out]
    if missing:
        raise scoring.ScoringError(f"inputs: missing {', '.join(missing)} (a rater takes x0, t, eps)")
    return out


def stream_reply(request: pb.ModelInferRequest, outcome: Outcome) -> pb.ModelStreamInferResponse:
    """A stream request's answer: its response, or an error message that starts with the status name."""
    if outcome.code == grpc.StatusCode.OK:
        return pb.ModelStreamInferResponse(infer_response=outcome.response)
    return pb.ModelStreamInferResponse(
        error_message=f"{outcome.code.name}: {outcome.message}",
        infer_response=pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                             id=request.id))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, recorder: StatsRecorder, runtime: RpcRuntime):
        self.registry = registry
        self.inference = Inference(recorder, RequestLimits.of(registry.config))
        self.runtime = runtime

    def _ready(self) -> bool:
        return not self.runtime.draining and self.registry.ready()

    def _lookup(self, name: str, version: str, call: CallContext) -> ModelVersion:
        call.model = UNKNOWN_MODEL
        found = self.registry.get(name, parse_version(version))
        call.served(found.name, found.version)
        return found

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="rater-server", version=server_version(),
                                         extensions=["model_configuration", "model_repository", "statistics"])

    async def ModelReady(self, request: pb.ModelReadyRequest, context):
        try:
            self.registry.get(request.name, parse_version(request.version))
        except (ModelNotFoundError, scoring.ScoringError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._ready())

    @unary("ModelMetadata")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, call: CallContext):
        version = self._lookup(request.name, request.version, call)
        inputs, outputs = tensor_signature(version)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=version.name,
            versions=[str(v.version) for v in self.registry.model(version.name).versions],
            platform=PLATFORM,
            inputs=[tm(name=n, datatype=d, shape=shape) for n, d, shape in inputs],
            outputs=[tm(name=n, datatype=d, shape=shape) for n, d, shape in outputs],
        )

    @unary("ModelConfig")
    async def ModelConfig(self, request: pb.ModelConfigRequest, call: CallContext):
        version = self._lookup(request.name, request.version, call)
        return pb.ModelConfigResponse(config=model_config(version, call.authenticated(),
                                                          self.registry.model(version.name).policy))

    @unary("ModelStatistics")
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, call: CallContext):
        if request.name and request.version:
            versions = [self._lookup(request.name, request.version, call)]
        elif request.name:
            self._lookup(request.name, "", call)  # INVALID_ARGUMENT or NOT_FOUND as for a versioned lookup
            versions = list(self.registry.model(request.name).versions)
        else:
            versions = [v for model in self.registry.list() for v in model.versions]
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(v) for v in versions])

    @unary("RepositoryIndex")
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, call: CallContext):
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            entry(name=name, version=str(version), state=state, reason=reason)
            for name, version, state, reason in await self.registry.index() if state == "READY" or not request.ready])

    @unary("RepositoryModelLoad")
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, call: CallContext):
        call.model = UNKNOWN_MODEL
        await audited("load", f"model={request.model_name[:64]!r}", call, self.registry.load_model(request.model_name),
                      lambda loaded: " -> loaded " + (", ".join(f"version {v}" for v in loaded) or "nothing new"))
        return pb.RepositoryModelLoadResponse()

    @unary("RepositoryModelUnload")
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, call: CallContext):
        call.model = UNKNOWN_MODEL
        await audited("unload", f"model={request.model_name[:64]!r} version=all", call,
                      self.registry.unload(request.model_name), removed_versions)
        return pb.RepositoryModelUnloadResponse()

    @unary("ModelInfer", inference=True)
    async def ModelInfer(self, request: pb.ModelInferRequest, call: CallContext):
        return await self._infer(request, call)

    async def ModelStreamInfer(self, request_iterator, context) -> None:
        await self.runtime.serve_stream("ModelStreamInfer", request_iterator, context, self._infer, stream_reply)

    async def _infer(self, request: pb.ModelInferRequest, call: CallContext) -> pb.ModelInferResponse:
        version = self._lookup(request.model_name, request.model_version, call)
        for wanted in request.outputs:
            if wanted.name != scoring.OUTPUT_SCORE:
                raise scoring.ScoringError(f"outputs: unknown output {clip(wanted.name)} (a rater has 'score')")
        inputs = decode_inputs(request)
        dataset = request.parameters["dataset"].string_param if "dataset" in request.parameters else ""
        scores = await self.inference.score(version, dataset, inputs[scoring.INPUT_X0], inputs[scoring.INPUT_T],
                                            inputs[scoring.INPUT_EPS])
        scores = np.ascontiguousarray(scores, dtype="<f4")
        output = pb.ModelInferResponse.InferOutputTensor(name=scoring.OUTPUT_SCORE, datatype="FP32",
                                                         shape=[scores.shape[0]])
        return pb.ModelInferResponse(model_name=version.name, model_version=str(version.version), id=request.id,
                                     outputs=[output], raw_output_contents=[scores.tobytes()])
