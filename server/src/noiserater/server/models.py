"""The loaded models: every version of every model, each with its onnxruntime session and batcher
(configured by the model's config.pbtxt over the server's flags, see model_config.py).

Versions are integers from 1 to repository.MAX_VERSION; a request that names none gets the model's
default: the pinned version if one was set, else the newest loaded one. A deploy validates the upload in a
separate, resource-limited process (validate.py), loads the very bytes that passed, writes them into the
repository and makes them the default in one step that either completes or leaves no trace, so no
request ever sees a half-loaded version; requests already queued on the previous version finish there.
Unloading removes a version from lookup first and then drains it. Models found on disk at start-up go
through the same validation. Loading and warm-up run on their own threads, never on the inference pool.

Which versions on disk are served is the model's version policy (config.pbtxt's version_policy, see
model_config.py; every version when it has none): at start-up, on a repository load (`load_model`), and
after a deploy, which unloads (drains) the loaded versions the policy no longer selects. Files stay on disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from noiserater.core import repository, scoring
from noiserater.core.scoring import RaterSession, ScoringError
from noiserater.core.stats_layout import LEGACY_HIST_RANGE
from noiserater.core.text import clip
from noiserater.server.batcher import DynamicBatcher
from noiserater.server.config import ServerConfig
from noiserater.server.metrics import ServerMetrics
from noiserater.server.model_config import Batching, ModelConfigError, ModelSettings, VersionPolicy, read_settings
from noiserater.server.rpc import RpcError
from noiserater.server.stats import probe_range
from noiserater.server.validate import Limits, Validator, open_session, read_repository_model

log = logging.getLogger("rater-server.models")

# Metadata every caller sees; the rest (and the full provenance) only an authenticated one.
PUBLIC_METADATA = (scoring.META_DATA_SHAPE, scoring.META_NUM_TIMESTEPS, scoring.META_SCHEDULE, scoring.META_DATASET,
                   scoring.META_FORMAT, scoring.META_EXPORTED_AT, scoring.META_OBJECTIVE,
                   scoring.META_TIME_CONVENTION, scoring.META_META_OBJECTIVE)


class ModelNotFoundError(RpcError, LookupError):
    grpc_status = grpc.StatusCode.NOT_FOUND


class ModelExistsError(RpcError, ValueError):
    grpc_status = grpc.StatusCode.ALREADY_EXISTS


def public_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """What a rater's metadata tells a caller that is not authenticated: the keys a client needs and a
    provenance summary, its top-level plain values that are no filesystem paths (no nested training
    config, no checkpoint path)."""
    public = {key: metadata[key] for key in PUBLIC_METADATA if key in metadata}
    try:
        provenance = json.loads(metadata.get(scoring.META_PROVENANCE, "{}"))
    except ValueError:
        provenance = None
    if isinstance(provenance, dict):
        summary = {key: value for key, value in provenance.items()
                   if isinstance(value, bool | int | float) or (isinstance(value, str) and not _path_like(value))}
        public[scoring.META_PROVENANCE] = json.dumps(summary, sort_keys=True)
    return public


def _path_like(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith("~")


def upload_digest(data: bytes) -> str:
    """The first 16 hex digits of the upload's sha256, as the audit log names it."""
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    session: RaterSession
    batcher: DynamicBatcher
    batching: Batching
    sha256: str = ""  # the first 16 hex digits of the model file's digest, as audit lines name it

    @property
    def cpu_fallback(self) -> bool:
        return self.session.provider == "CPUExecutionProvider"

    @property
    def hist_range(self) -> tuple[float, float]:
        """The range of this version's score histograms, probed when it was loaded (see stats.probe_range)."""
        return getattr(self.session, "hist_range", LEGACY_HIST_RANGE)


@dataclass(frozen=True)
class ModelSnapshot:
    """A model as it is at one moment: its loaded versions (ascending) and its default version."""

    name: str
    versions: tuple[ModelVersion, ...]
    default_version: int
    policy: VersionPolicy = VersionPolicy()


@dataclass
class _Model:
    name: str
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    pinned: int = 0
    policy: VersionPolicy = VersionPolicy()

    @property
    def default_version(self) -> int:
        if self.pinned in self.versions:
            return self.pinned
        return max(self.versions) if self.versions else 0

    def snapshot(self) -> ModelSnapshot:
        return ModelSnapshot(self.name, tuple(self.versions[v] for v in sorted(self.versions)), self.default_version,
                             self.policy)


class ModelRegistry:
    def __init__(self, config: ServerConfig, executor: Executor, metrics: ServerMetrics):
        self.config = config
        self.executor = executor  # inference runs
        self.metrics = metrics
        self.defaults = Batching.from_flags(config)
        self.validator = Validator(Limits(config.validate_memory_mb, config.validate_timeout_s,
                                          config.graph_optimization))
        # Reading, loading, warming up and writing models: never on the inference pool.
        self.loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-load")
        self._models: dict[str, _Model] = {}
        self._failed: dict[tuple[str, int], str] = {}  # why a version on disk failed to load, until it loads
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
    def _open(self, data: bytes) -> RaterSession:
        config = self.config
        session = open_session(data, config.device, config.intra_op_threads, config.graph_optimization)
        session.hist_range = probe_range(session.score, session.info.data_shape, session.info.num_timesteps)
        return session

    def _activate(self, name: str, version: int, session: RaterSession, settings: ModelSettings,
                  sha256: str) -> ModelVersion:
        """Make a loaded version servable, in one step on the event loop (nothing here awaits)."""
        batching = settings.batching
        labels = (name, str(version))
        batcher = DynamicBatcher(session.score, self.executor, self.metrics, labels, batching.max_batch,
                                 batching.max_delay_ms / 1000.0, self.config.max_queue, batching.instances,
                                 self.config.inline_max_triples, batching.preferred, self.config.max_queued_triples)
        loaded = ModelVersion(name, version, session, batcher, batching, sha256)
        fallback = loaded.cpu_fallback and self.config.device in ("auto", "cuda")
        self.metrics.cpu_fallback.labels(*labels).set(1 if fallback else 0)
        if fallback:  # said once per process by the device probe; per version only at debug level
            log.debug("%s version %d runs on CPU (device=%s, CUDA unavailable)", name, version, self.config.device)
        model = self._models.setdefault(name, _Model(name))
        model.policy = settings.policy
        model.versions[version] = loaded  # the atomic swap
        self._failed.pop((name, version), None)
        self.metrics.models_loaded.set(self.loaded_count())
        return loaded

    async def load_repository(self) -> list[str]:
        """Load the versions on disk that each model's version policy selects, each validated like an
        upload; a version that fails, or a model whose config.pbtxt does, is reported and skipped, as is a
        version folder that is no version. Leftovers of interrupted deploys are removed first. Returns the
        problems."""
        root = self.config.repository
        root.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for path in await loop.run_in_executor(self.loader, repository.remove_stale_uploads, root):
            log.warning("removed %s, left by an interrupted deploy", path)
        problems: list[str] = []
        found = repository.scan(root, problems)
        async with self.validator.session() as validation:
            for name, versions in found.items():
                problems.extend(await self._load_from_disk(name, versions, validation))
        return problems

    async def load_model(self, name: str) -> list[int]:
        """Load a model's versions from disk as its version policy selects them (those loaded already keep
        serving; loaded ones it no longer selects are unloaded). Returns the versions loaded now; fails
        (FAILED_PRECONDITION) naming each version that would not load, after loading the others."""
        try:
            repository.check_model_name(name)
        except repository.RepositoryError as exc:
            raise ScoringError(f"model_name: {exc}") from None
        loop = asyncio.get_running_loop()
        async with self._deploy_lock:
            versions = await loop.run_in_executor(self.loader, repository.versions_on_disk, self.config.repository,
                                                  name)
            if not versions:
                raise ModelNotFoundError(f"model_name: no model named {clip(name)} in the repository")
            before = set(self._models[name].versions) if name in self._models else set()
            async with self.validator.session() as validation:
                problems = await self._load_from_disk(name, versions, validation)
        if problems:
            raise RpcError("; ".join(problems), grpc.StatusCode.FAILED_PRECONDITION)
        return sorted(set(self._models[name].versions) - before) if name in self._models else []

    async def sync_from_disk(self, name: str, versions: list[int], only: set[int] | None) -> tuple[list[int],
                                                                                                    list[str]]:
        """Bring a model in line with the repository, as the repository watch does after seeing it change:
        `versions` are its versions on disk now. Loads (validated, like a deploy) the versions of `only`
        (None: every version on disk) that its version policy selects and that are not loaded; unloads the
        loaded versions that are no longer on disk or that the policy no longer selects. Returns the versions
        it loaded and the problems."""
        async with self._deploy_lock:
            before = self.loaded_versions(name)
            async with self.validator.session() as validation:
                problems = await self._load_from_disk(name, versions, validation, only)
            return sorted(self.loaded_versions(name) - before), problems

    def loaded_versions(self, name: str) -> set[int]:
        model = self._models.get(name)
        return set(model.versions) if model is not None else set()

    def failure(self, name: str, version: int) -> str:
        """Why a version on disk failed to load (until it loads); empty when it did not fail."""
        return self._failed.get((name, version), "")

    async def _load_from_disk(self, name: str, versions: list[int], validation,
                              only: set[int] | None = None) -> list[str]:
        """Load the versions of `versions` (on disk; of them only those in `only`, unless it is None) that the
        model's policy selects and that are not loaded, and unload the loaded ones it does not select among
        the versions on disk that did not fail to load (a version that fails does not unload the one it was
        to replace). Returns the problems."""
        root = self.config.repository
        loop = asyncio.get_running_loop()
        try:
            settings = await loop.run_in_executor(self.loader, read_settings, root / name, self.defaults)
        except ModelConfigError as exc:
            self._failed.update({(name, version): str(exc) for version in versions})
            await self._retire(name, versions, versions)  # what left the repository goes all the same
            return [f"{name}: {exc}"]
        selected = settings.policy.select(versions)
        problems = []
        for version in selected:
            if name in self._models and version in self._models[name].versions:
                continue
            if only is not None and version not in only:
                continue
            path = repository.version_dir(root, name, version) / repository.MODEL_FILE
            try:
                data = await loop.run_in_executor(self.loader, read_repository_model, path)
                await validation.check(data)
                session = await loop.run_in_executor(self.loader, self._open, data)
                digest = await loop.run_in_executor(self.loader, upload_digest, data)
            except Exception as exc:
                self._failed[(name, version)] = str(exc).strip().splitlines()[0] if str(exc).strip() else \
                    type(exc).__name__
                problems.append(f"{name} version {version}: {exc}")
                continue
            self._activate(name, version, session, settings, digest)
        if name in self._models:
            self._models[name].policy = settings.policy
        loaded = self.loaded_versions(name)
        await self._retire(name, settings.policy.select(
            [v for v in versions if v in loaded or (name, v) not in self._failed]), versions)
        return problems

    async def _retire(self, name: str, keep: list[int], on_disk: list[int] | None = None) -> list[ModelVersion]:
        """Unload (drain) the loaded versions of `name` that are not in `keep` (`on_disk`: the versions in the
        repository, when known, so that the log says why)."""
        model = self._models.get(name)
        if model is None:
            return []
        stale = [v for v in sorted(model.versions) if v not in keep]
        gone = [v for v in stale if on_disk is not None and v not in on_disk]
        deselected = [v for v in stale if v not in gone]
        if gone:
            log.info("%s: unloading version(s) %s, no longer in the repository", name, ", ".join(map(str, gone)))
        if deselected:
            log.info("%s: unloading version(s) %s, which its version policy (%s) does not select", name,
                     ", ".join(map(str, deselected)), model.policy)
        return await self._remove(model, stale)

    async def index(self) -> list[tuple[str, int, str, str]]:
        """(name, version, state, reason) of every model version on disk or loaded: READY when it is served,
        else UNAVAILABLE with why not."""
        root = self.config.repository
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self.loader, repository.scan, root)
        rows = []
        for name in sorted(set(found) | set(self._models)):
            model = self._models.get(name)
            loaded = set(model.versions) if model else set()
            policy = model.policy if model else None
            if policy is None:
                try:
                    policy = (await loop.run_in_executor(self.loader, read_settings, root / name, self.defaults)).policy
                except ModelConfigError:
                    policy = VersionPolicy()
            selected = set(policy.select(found.get(name, [])))
            for version in sorted(set(found.get(name, [])) | loaded):
                if version in loaded:
                    rows.append((name, version, "READY", ""))
                elif (name, version) in self._failed:
                    rows.append((name, version, "UNAVAILABLE", self._failed[(name, version)]))
                elif version not in selected:
                    rows.append((name, version, "UNAVAILABLE", f"not selected by its version policy ({policy})"))
                else:
                    rows.append((name, version, "UNAVAILABLE", "unloaded"))
        return rows

    async def deploy(self, name: str, data: bytes, version: int = 0, sha256: str = "") -> ModelVersion:
        """Validate (in a separate process), load the very bytes validated, write them into the repository
        and serve them as the newest version. The write and the activation succeed together or not at
        all: a version that cannot be activated is removed again. `sha256`: upload_digest(data), when the
        caller has it already."""
        try:
            repository.check_model_name(name)
        except repository.RepositoryError as exc:
            raise ScoringError(str(exc)) from None
        if version < 0:
            raise ScoringError(f"version: must be >= 0 (0 = next), got {version}")
        if version:
            repository.check_version(version)
        settings = read_settings(self.config.repository / name, self.defaults)
        loop = asyncio.get_running_loop()
        sha256 = sha256 or await loop.run_in_executor(self.loader, upload_digest, data)
        await self.validator.check(data)
        session = await loop.run_in_executor(self.loader, self._open, data)
        async with self._deploy_lock:
            if version == 0:
                on_disk = repository.versions_on_disk(self.config.repository, name)
                loaded = list(self._models[name].versions) if name in self._models else []
                try:
                    version = repository.next_version([*on_disk, *loaded])
                except repository.RepositoryError as exc:
                    raise RpcError(str(exc), grpc.StatusCode.FAILED_PRECONDITION) from None
            elif name in self._models and version in self._models[name].versions:
                raise ModelExistsError(f"version: {name} version {version} is already loaded")
            loaded_now = list(self._models[name].versions) if name in self._models else []
            keep = settings.policy.select({*repository.versions_on_disk(self.config.repository, name), *loaded_now,
                                           version})
            if version not in keep:
                raise RpcError(f"version: {name} version {version} would not be served: the model's version policy "
                               f"is {settings.policy} (config.pbtxt)", grpc.StatusCode.FAILED_PRECONDITION)
            # Shielded: a deploy whose caller goes away still ends written and serving, or neither.
            loaded = await asyncio.shield(loop.create_task(self._commit(name, version, data, session, settings,
                                                                        sha256)))
        await self._retire(name, keep)
        return loaded

    async def _commit(self, name: str, version: int, data: bytes, session: RaterSession, settings: ModelSettings,
                      sha256: str) -> ModelVersion:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.loader, repository.write_version, self.config.repository, name, data,
                                       version)
        except repository.RepositoryError as exc:
            raise ModelExistsError(str(exc)) from None
        try:
            return self._activate(name, version, session, settings, sha256)
        except BaseException:
            await loop.run_in_executor(self.loader, repository.remove_version, self.config.repository, name, version)
            raise

    async def unload(self, name: str, version: int = 0) -> list[ModelVersion]:
        """Stop serving one version (or all: version 0); in-flight requests finish first. Returns the
        versions removed."""
        model = self._loaded(name, version)
        return await self._remove(model, [version] if version else sorted(model.versions))

    async def _remove(self, model: _Model, targets: list[int]) -> list[ModelVersion]:
        """Take versions out of lookup, then drain them."""
        removed = [model.versions.pop(v) for v in targets]
        for v in targets:
            self.metrics.cpu_fallback.remove(model.name, str(v))
            self.metrics.pending_triples.remove(model.name, str(v))
        if not model.versions and self._models.get(model.name) is model:
            del self._models[model.name]
        self.metrics.models_loaded.set(self.loaded_count())
        await asyncio.gather(*(m.batcher.close(self.config.grace_s) for m in removed))
        return removed

    def set_default(self, name: str, version: int) -> None:
        model = self._loaded(name, version)
        model.pinned = version

    async def close(self, timeout: float) -> None:
        await asyncio.gather(*(v.batcher.close(timeout) for m in self.list() for v in m.versions))
        self.loader.shutdown(wait=False, cancel_futures=True)
