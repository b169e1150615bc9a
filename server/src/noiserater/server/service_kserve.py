"""inference.GRPCInferenceService: the KServe v2 / Triton gRPC protocol over the same models and batchers,
so tritonclient and perf_analyzer can score with a rater as they would against Triton."""

from __future__ import annotations

import math

import numpy as np

from noiserater.proto import scoring
from noiserater.proto.inference import grpc_service_pb2 as pb
from noiserater.proto.inference import grpc_service_pb2_grpc as pb_grpc
from noiserater.server.errors import CallLabels, RequestCounters, rpc
from noiserater.server.metrics import ServerMetrics
from noiserater.server.models import ModelNotFoundError, ModelRegistry, ModelVersion
from noiserater.server.service_v1 import score_triples
from noiserater.server.stats import StatsRecorder

# KServe datatype -> (numpy dtype, InferTensorContents field for typed contents)
DATATYPES: dict[str, tuple[np.dtype, str]] = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP16": (np.dtype("<f2"), ""),  # FP16 has no typed field in the protocol: raw contents only
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
}
PLATFORM = "onnxruntime_onnx"


def parse_version(text: str, field: str = "model_version") -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise scoring.ScoringError(f"{field}: {text!r} is not an integer version")
    return int(text)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Inputs by name, from raw_input_contents (one entry per input, in order) or typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise scoring.ScoringError(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs (one per input expected)")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{tensor.name or i}]"
        if tensor.datatype not in DATATYPES:
            raise scoring.ScoringError(f"{field}.datatype: {tensor.datatype!r} is not one of {', '.join(DATATYPES)}")
        dtype, typed_field = DATATYPES[tensor.datatype]
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise scoring.ScoringError(f"{field}.shape: negative dimension in {list(shape)}")
        count = math.prod(shape)
        if raw:
            data = raw[i]
            if len(data) != count * dtype.itemsize:
                raise scoring.ScoringError(
                    f"{field}: byte count {len(data)} does not match shape {list(shape)} x {tensor.datatype} "
                    f"({count * dtype.itemsize} bytes expected)")
            array = np.frombuffer(data, dtype=dtype)
        else:
            values = getattr(tensor.contents, typed_field) if typed_field else []
            if len(values) != count:
                raise scoring.ScoringError(
                    f"{field}.contents: {len(values)} values for shape {list(shape)} ({count} expected)")
            array = np.asarray(values, dtype=dtype)
        if tensor.name in out:
            raise scoring.ScoringError(f"{field}: input given twice")
        out[tensor.name] = array.reshape(shape)
    missing = [n for n in scoring.INPUT_NAMES if n not in out]
    if missing:
        raise scoring.ScoringError(f"inputs: missing {', '.join(missing)} (a rater takes x0, t, eps)")
    unknown = sorted(set(out) - set(scoring.INPUT_NAMES))
    if unknown:
        raise scoring.ScoringError(f"inputs: unknown input {', '.join(unknown)} (a rater takes x0, t, eps)")
    return out


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, recorder: StatsRecorder, metrics: ServerMetrics,
                 counters: RequestCounters, is_ready):
        self.registry = registry
        self.recorder = recorder
        self.metrics = metrics
        self.counters = counters
        self._is_ready = is_ready

    def _lookup(self, name: str, version: str, labels: CallLabels) -> ModelVersion:
        labels.model = name
        found = self.registry.get(name, parse_version(version))
        labels.version = str(found.version)
        return found

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context):
        try:
            self.registry.get(request.name, parse_version(request.version))
        except (ModelNotFoundError, scoring.ScoringError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._is_ready())

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context, labels: CallLabels):
        version = self._lookup(request.name, request.version, labels)
        data = [-1, *version.session.info.data_shape]
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=version.name,
            versions=[str(v) for v in sorted(self.registry.models[version.name].versions)],
            platform=PLATFORM,
            inputs=[tm(name=scoring.INPUT_X0, datatype="FP32", shape=data),
                    tm(name=scoring.INPUT_T, datatype="INT64", shape=[-1]),
                    tm(name=scoring.INPUT_EPS, datatype="FP32", shape=data)],
            outputs=[tm(name=scoring.OUTPUT_SCORE, datatype="FP32", shape=[-1])],
        )

    @rpc("ModelInfer", inference=True)
    async def ModelInfer(self, request: pb.ModelInferRequest, context, labels: CallLabels):
        version = self._lookup(request.model_name, request.model_version, labels)
        for wanted in request.outputs:
            if wanted.name != scoring.OUTPUT_SCORE:
                raise scoring.ScoringError(f"outputs: unknown output {wanted.name!r} (a rater has 'score')")
        inputs = decode_inputs(request)
        dataset = request.parameters["dataset"].string_param if "dataset" in request.parameters else ""
        scores = await score_triples(self.recorder, version, dataset, inputs[scoring.INPUT_X0],
                                     inputs[scoring.INPUT_T], inputs[scoring.INPUT_EPS])
        scores = np.ascontiguousarray(scores, dtype="<f4")
        output = pb.ModelInferResponse.InferOutputTensor(name=scoring.OUTPUT_SCORE, datatype="FP32",
                                                         shape=[scores.shape[0]])
        return pb.ModelInferResponse(model_name=version.name, model_version=str(version.version), id=request.id,
                                     outputs=[output], raw_output_contents=[scores.tobytes()])
