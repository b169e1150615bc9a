"""noiserater.v1.RaterService: selection, scoring, models and statistics over the shared scoring code."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from noiserater.core import codec, repository, scoring
from noiserater.core.scoring import ScoringError
from noiserater.core.selection import Rule, SelectionPlan
from noiserater.core.stats_layout import bucket_range
from noiserater.core.text import clip
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.core.v1 import tensor_pb2
from noiserater.server import stats as stats_mod
from noiserater.server.inference import Inference, RequestLimits
from noiserater.server.models import ModelRegistry, ModelVersion, public_metadata, upload_digest
from noiserater.server.rpc import UNKNOWN_MODEL, CallContext, Outcome, RpcError, RpcRuntime, status_of, unary
from noiserater.server.stats import StatsRecorder

audit = logging.getLogger("rater-server.audit")


def plan_of(request: pb.SelectNoiseRequest, candidates: np.ndarray) -> SelectionPlan:
    """The request's selection plan; the deprecated float32 temperature is read when the double one is 0."""
    temperature = request.temperature or request.temperature_float32
    return SelectionPlan.for_candidates(candidates, request.keep, Rule.from_proto(request.rule), temperature)


def signature(info: scoring.RaterInfo) -> tuple[list[tensor_pb2.TensorSpec], list[tensor_pb2.TensorSpec]]:
    data = [-1, *info.data_shape]
    inputs = [
        tensor_pb2.TensorSpec(name=scoring.INPUT_X0, dtype=tensor_pb2.DTYPE_FLOAT32, shape=data),
        tensor_pb2.TensorSpec(name=scoring.INPUT_T, dtype=tensor_pb2.DTYPE_INT64, shape=[-1]),
        tensor_pb2.TensorSpec(name=scoring.INPUT_EPS, dtype=tensor_pb2.DTYPE_FLOAT32, shape=data),
    ]
    outputs = [tensor_pb2.TensorSpec(name=scoring.OUTPUT_SCORE, dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1])]
    return inputs, outputs


def stream_reply(message: pb.SelectNoiseStreamRequest, outcome: Outcome) -> pb.SelectNoiseStreamResponse:
    """A stream request's answer: its response, or the status the unary call would have ended with."""
    if outcome.code == grpc.StatusCode.OK:
        return pb.SelectNoiseStreamResponse(request_id=message.request_id, response=outcome.response)
    return pb.SelectNoiseStreamResponse(request_id=message.request_id, error_code=outcome.code.value[0],
                                        error_message=outcome.message)


async def audited(action: str, what: str, call: CallContext, work: Awaitable[Any],
                  outcome: Callable[[Any], str] = lambda result: "") -> Any:
    """Await an admin action and log one line saying who did what and how it ended (`outcome` adds what the
    result says)."""
    who = f"peer={call.peer() or '-'} auth={'token' if call.authenticated() else 'none'}"
    try:
        if call.runtime.admin_refusal:
            if asyncio.iscoroutine(work):
                work.close()  # never started
            raise RpcError(call.runtime.admin_refusal, grpc.StatusCode.FAILED_PRECONDITION)
        result = await work
    except BaseException as exc:
        code = status_of(exc) if isinstance(exc, Exception) else grpc.StatusCode.CANCELLED
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        audit.warning("%s refused: %s %s: %s %s", action, what, who, (code or grpc.StatusCode.INTERNAL).name, detail)
        raise
    audit.info("%s: %s%s %s", action, what, outcome(result), who)
    return result


def removed_versions(removed: list[ModelVersion]) -> str:
    """An unload's audit outcome: the versions it removed."""
    return " -> removed " + ", ".join(f"version {v.version} (sha256={v.sha256})" for v in removed)


class RaterServicer(pb_grpc.RaterServiceServicer):
    def __init__(self, registry: ModelRegistry, recorder: StatsRecorder, runtime: RpcRuntime):
        self.registry = registry
        self.recorder = recorder
        self.inference = Inference(recorder, RequestLimits.of(registry.config))
        self.runtime = runtime

    def _lookup(self, ref: pb.ModelRef, call: CallContext) -> ModelVersion:
        call.model = UNKNOWN_MODEL
        found = self.registry.get(ref.name, ref.version)
        call.served(found.name, found.version)
        return found

    @unary("SelectNoise", inference=True)
    async def SelectNoise(self, request: pb.SelectNoiseRequest, call: CallContext):
        return await self._select(request, call)

    async def SelectNoiseStream(self, request_iterator, context) -> None:
        await self.runtime.serve_stream("SelectNoiseStream", request_iterator, context, self._select_streamed,
                                        stream_reply)

    async def _select_streamed(self, message: pb.SelectNoiseStreamRequest, call: CallContext):
        return await self._select(message.request, call)

    async def _select(self, request: pb.SelectNoiseRequest, call: CallContext) -> pb.SelectNoiseResponse:
        version = self._lookup(request.model, call)
        x0 = codec.decode(request.x0, "x0")
        t = codec.decode(request.t, "t")
        candidates = codec.decode(request.candidates, "candidates")
        plan = plan_of(request, candidates)
        indices, chosen = await self.inference.select(version, plan, request.dataset, x0, t, candidates, request.seed)
        return pb.SelectNoiseResponse(indices=codec.encode(indices), scores=codec.encode(chosen),
                                      model=pb.ModelRef(name=version.name, version=version.version))

    @unary("Score", inference=True)
    async def Score(self, request: pb.ScoreRequest, call: CallContext):
        version = self._lookup(request.model, call)
        scores = await self.inference.score(version, request.dataset, codec.decode(request.x0, "x0"),
                                            codec.decode(request.t, "t"), codec.decode(request.eps, "eps"))
        return pb.ScoreResponse(scores=codec.encode(scores),
                                model=pb.ModelRef(name=version.name, version=version.version))

    @unary("ListModels")
    async def ListModels(self, request, call: CallContext):
        models = [pb.ModelInfo(name=model.name, default_version=model.default_version,
                               versions=[pb.ModelVersionInfo(version=v.version, state="READY") for v in model.versions])
                  for model in self.registry.list()]
        return pb.ListModelsResponse(models=models)

    @unary("GetModelMetadata")
    async def GetModelMetadata(self, request: pb.GetModelMetadataRequest, call: CallContext):
        version = self._lookup(request.model, call)
        inputs, outputs = signature(version.session.info)
        metadata = version.session.info.reported_metadata()
        return pb.GetModelMetadataResponse(
            model=pb.ModelRef(name=version.name, version=version.version),
            metadata=metadata if call.authenticated() else public_metadata(metadata), inputs=inputs,
            outputs=outputs, execution_provider=version.session.provider)

    @unary("DeployModel")
    async def DeployModel(self, request: pb.DeployModelRequest, call: CallContext):
        call.model = UNKNOWN_MODEL
        digest = await asyncio.get_running_loop().run_in_executor(self.registry.loader, upload_digest, request.onnx)
        what = f"model={request.name[:64]!r} version={request.version or 'next'} sha256={digest} " \
               f"size={len(request.onnx)}"
        loaded = await audited("deploy", what, call,
                               self.registry.deploy(request.name, request.onnx, request.version, digest),
                               lambda loaded: f" -> serving version {loaded.version}")
        call.served(loaded.name, loaded.version)
        return pb.DeployModelResponse(model=pb.ModelRef(name=loaded.name, version=loaded.version))

    @unary("UnloadModel")
    async def UnloadModel(self, request: pb.UnloadModelRequest, call: CallContext):
        call.model = UNKNOWN_MODEL
        what = f"model={request.model.name[:64]!r} version={request.model.version or 'all'}"
        await audited("unload", what, call, self.registry.unload(request.model.name, request.model.version),
                      removed_versions)
        call.served(request.model.name, request.model.version)
        return pb.UnloadModelResponse()

    @unary("SetDefaultVersion")
    async def SetDefaultVersion(self, request: pb.SetDefaultVersionRequest, call: CallContext):
        call.model = UNKNOWN_MODEL
        what = f"model={request.model.name[:64]!r} version={request.model.version}"

        async def pin() -> None:
            self.registry.set_default(request.model.name, request.model.version)

        await audited("set-default", what, call, pin())
        call.served(request.model.name, request.model.version)
        return pb.SetDefaultVersionResponse()

    @unary("GetStats")
    async def GetStats(self, request: pb.GetStatsRequest, call: CallContext):
        query = stats_query(request)
        try:
            page = await asyncio.wait_for(self.recorder.read(query), 5.0)
        except Exception as exc:  # Redis down or slow: say so, quickly
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RpcError(f"stats: the statistics store is unreachable ({detail})", grpc.StatusCode.UNAVAILABLE) \
                from None
        buckets = [
            pb.StatsBucket(dataset=k[0], model=k[1], version=k[2], timestep_bucket=k[3], count=m.count,
                           mean=m.mean, m2=m.m2, min=m.min, max=m.max, histogram=m.hist.tolist(),
                           hist_low=m.hist_low, hist_high=m.hist_high, num_timesteps=m.num_timesteps,
                           t_first=first, t_last=last, hist_skipped=m.hist_skipped)
            for k, m in page.buckets.items()
            for first, last in [bucket_range(k[3], m.num_timesteps)]
        ]
        last = page.last
        token = page_token(last) if page.more and last is not None else ""
        return pb.GetStatsResponse(buckets=buckets, timestep_buckets=stats_mod.TIMESTEP_BUCKETS,
                                   next_page_token=token)


STATS_PAGE_SIZE = 400  # buckets of a GetStats page that does not ask for a size (about 60 KB)
STATS_MAX_PAGE_SIZE = 4000
MAX_PAGE_TOKEN = 512  # characters; the tokens this server writes are far shorter


def stats_query(request: pb.GetStatsRequest) -> stats_mod.StatsQuery:
    """The checked filters and page of a GetStats request."""
    if request.dataset:
        stats_mod.check_dataset(request.dataset)
    if request.model:
        try:
            repository.check_model_name(request.model)
        except repository.RepositoryError as exc:
            raise ScoringError(f"model.{exc}") from None
    if request.version < 0:
        raise ScoringError(f"version: must be >= 0 (0 = all), got {request.version}")
    if request.page_size < 0:
        raise ScoringError(f"page_size: must be >= 0 (0 = the default {STATS_PAGE_SIZE}), got {request.page_size}")
    size = min(request.page_size or STATS_PAGE_SIZE, STATS_MAX_PAGE_SIZE)
    after = read_page_token(request.page_token) if request.page_token else None
    return stats_mod.StatsQuery(request.dataset, request.model, request.version, after, size)


def page_token(last: stats_mod.StatsKey) -> str:
    """An opaque token for the page after `last`: the key itself, so that pages stay consistent while
    buckets are added."""
    return base64.urlsafe_b64encode(json.dumps(list(last)).encode()).decode()


def read_page_token(token: str) -> stats_mod.StatsKey:
    invalid = ScoringError(f"page_token: {clip(token)} is not a token this server returned")
    if len(token) > MAX_PAGE_TOKEN:
        raise invalid
    try:
        dataset, model, version, bucket = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError):
        raise invalid from None
    if not (isinstance(dataset, str) and isinstance(model, str) and type(version) is int and type(bucket) is int):
        raise invalid
    return dataset, model, version, bucket
