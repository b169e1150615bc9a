"""The loaded models: every version of every model, each with its onnxruntime session and batcher
(configured by the model's config.pbtxt over the server's flags, see model_config.py).

Versions are integers; a request that names none gets the model's default: the pinned version if one
was set, else the newest loaded one. A deploy validates the upload (onnx.checker, the rater signature,
a warm-up run) before it writes the file into the repository and only then makes it the default, in one
step on the event loop, so no request ever sees a half-loaded version; requests already queued on the
previous version finish there. Unloading removes a version from lookup first and then drains it.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from noiserater.core import repository
from noiserater.core.scoring import RaterSession, ScoringError
from noiserater.core.text import clip
from noiserater.server.batcher import DynamicBatcher
from noiserater.server.config import ServerConfig
from noiserater.server.metrics import ServerMetrics
from noiserater.server.model_config import Batching, ModelConfigError, read_batching
from noiserater.server.rpc import RpcError

log = logging.getLogger("rater-server.models")


class ModelNotFoundError(RpcError, LookupError):
    grpc_status = grpc.StatusCode.NOT_FOUND


class ModelExistsError(RpcError, ValueError):
    grpc_status = grpc.StatusCode.ALREADY_EXISTS


def validate_onnx_bytes(data: bytes) -> None:
    """onnx.checker over an uploaded file; ScoringError('onnx: ...') when it is not a valid model."""
    import onnx

    if not data:
        raise ScoringError("onnx: the upload is empty")
    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, onnx ValidationError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScoringError(f"onnx: not a valid ONNX model ({first})") from None


def open_session(source: bytes | Path, config: ServerConfig) -> RaterSession:
    """Load, check the signature and metadata, and warm up (blocking: run it in a worker thread)."""
    session = RaterSession(source, device=config.device, intra_op_threads=config.intra_op_threads,
                           graph_optimization=config.graph_optimization)
    try:
        session.warm_up()
    except ScoringError:
        raise
    except Exception as exc:  # onnxruntime's own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScoringError(f"onnx: warm-up run failed ({first})") from None
    return session


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    session: RaterSession
    batcher: DynamicBatcher
    batching: Batching

    @property
    def cpu_fallback(self) -> bool:
        return self.session.provider == "CPUExecutionProvider"


@dataclass(frozen=True)
class ModelSnapshot:
    """A model as it is at one moment: its loaded versions (ascending) and its default version."""

    name: str
    versions: tuple[ModelVersion, ...]
    default_version: int


@dataclass
class _Model:
    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    pinned: int = 0

    @property
    def default_version(self) -> int:
        if self.pinned in self.versions:
            return self.pinned
        return max(self.versions) if self.versions else 0

    def snapshot(self) -> ModelSnapshot:
        return ModelSnapshot(self.name, tuple(self.versions[v] for v in sorted(self.versions)), self.default_version)


class ModelRegistry:
    def __init__(self, config: ServerConfig, executor: Executor, metrics: ServerMetrics):
        self.config = config
        self.executor = executor
        self.metrics = metrics
        self.defaults = Batching.from_flags(config)
        self._models: dict[str, _Model] = {}
        self._deploy_lock = asyncio.Lock()

    # -- queries (never await) -----------------------------------------------------------------
    def list(self) -> tuple[ModelSnapshot, ...]:
        """Every loaded model, by name."""
        return tuple(self._models[name].snapshot() for name in sorted(self._models))

    def model(self, name: str) -> ModelSnapshot:
        return self._loaded(name).snapshot()

    def get(self, name: str, version: int = 0) -> ModelVersion:
        """One loaded version; version 0 is the model's default."""
        try:
            repository.check_model_name(name)
        except repository.RepositoryError as exc:
            raise ScoringError(f"model.{exc}") from None
        model = self._loaded(name)
        if version < 0:
            raise ScoringError(f"model.version: must be >= 0 (0 = default), got {version}")
        wanted = version or model.default_version
        found = model.versions.get(wanted)
        if found is None:
            raise ModelNotFoundError(
                f"model.version: {name} has no loaded version {wanted} (loaded: {sorted(model.versions)})")
        return found

    def _loaded(self, name: str, version: int = 0) -> _Model:
        """The model, which must be loaded, as must `version` unless it is 0."""
        model = self._models.get(name)
        if model is None or not model.versions:
            raise ModelNotFoundError(f"model: no model named {clip(name)} is loaded")
        if version and version not in model.versions:
            raise ModelNotFoundError(f"model.version: {name} has no loaded version {version}")
        return model

    def ready(self) -> bool:
        return all(m.versions for m in self._models.values())

    def loaded_count(self) -> int:
        return sum(len(m.versions) for m in self._models.values())

    # -- loading ------------------------------------------------------------------------------
    async def _activate(self, name: str, version: int, session: RaterSession, batching: Batching) -> ModelVersion:
        labels = (name, str(version))
        batcher = DynamicBatcher(session.score, self.executor, self.metrics, labels, batching.max_batch,
                                 batching.max_delay_ms / 1000.0, self.config.max_queue, batching.instances,
                                 self.config.inline_max_triples, batching.preferred, self.config.max_queued_triples)
        loaded = ModelVersion(name, version, session, batcher, batching)
        if loaded.cpu_fallback and self.config.device in ("auto", "cuda"):
            log.warning("%s version %d runs on CPU (device=%s requested, CUDA unavailable)", name, version,
                        self.config.device)
            self.metrics.cpu_fallbacks.labels(*labels).inc()
        self._models.setdefault(name, _Model(name)).versions[version] = loaded  # the atomic swap
        self.metrics.models_loaded.set(self.loaded_count())
        return loaded

    async def load_repository(self) -> list[str]:
        """Load every version on disk; a version that fails, or a model whose config.pbtxt does, is reported
        and skipped. Returns the problems."""
        root = self.config.repository
        root.mkdir(parents=True, exist_ok=True)
        problems = []
        loop = asyncio.get_running_loop()
        for name, versions in repository.scan(root).items():
            try:
                batching = read_batching(root / name, self.defaults)
            except ModelConfigError as exc:
                problems.append(f"{name}: {exc}")
                continue
            for version in versions:
                path = repository.version_dir(root, name, version) / repository.MODEL_FILE
                try:
                    session = await loop.run_in_executor(self.executor, open_session, path, self.config)
                except Exception as exc:
                    problems.append(f"{name} version {version}: {exc}")
                    continue
                await self._activate(name, version, session, batching)
        return problems

    async def deploy(self, name: str, data: bytes, version: int = 0) -> ModelVersion:
        """Validate, warm up, write into the repository, then serve as the newest version."""
        try:
            repository.check_model_name(name)
        except repository.RepositoryError as exc:
            raise ScoringError(str(exc)) from None
        if version < 0:
            raise ScoringError(f"version: must be >= 0 (0 = next), got {version}")
        batching = read_batching(self.config.repository / name, self.defaults)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, validate_onnx_bytes, data)
        session = await loop.run_in_executor(self.executor, open_session, data, self.config)
        async with self._deploy_lock:
            if version == 0:
                on_disk = repository.versions_on_disk(self.config.repository, name)
                loaded = list(self._models[name].versions) if name in self._models else []
                version = max([0, *on_disk, *loaded]) + 1
            try:
                await loop.run_in_executor(self.executor, repository.write_version, self.config.repository, name,
                                           data, version)
            except repository.RepositoryError as exc:
                raise ModelExistsError(str(exc)) from None
            return await self._activate(name, version, session, batching)

    async def unload(self, name: str, version: int = 0) -> None:
        """Stop serving one version (or all: version 0); in-flight requests finish first."""
        model = self._loaded(name, version)
        targets = [version] if version else sorted(model.versions)
        removed = [model.versions.pop(v) for v in targets]
        if not model.versions:
            del self._models[name]
        self.metrics.models_loaded.set(self.loaded_count())
        await asyncio.gather(*(m.batcher.close(self.config.grace_s) for m in removed))

    def set_default(self, name: str, version: int) -> None:
        model = self._loaded(name, version)
        model.pinned = version

    async def close(self, timeout: float) -> None:
        await asyncio.gather(*(v.batcher.close(timeout) for m in self.list() for v in m.versions))
