"""The repository watch (`--repository-poll-s N`, like Triton's `--model-control-mode=poll`): every N seconds
the server rescans its model repository and follows what changed since the last scan, so that replicas
sharing one repository folder serve what is written into it (`nrctl deploy --repository`, another replica's
`DeployModel`).

What a scan sees of a model: its versions, each `<name>/<version>/model.onnx` with the file's size,
modification time and inode, and its `config.pbtxt` (the same). Temporary upload folders (`<name>/.upload-*`)
and version folders without a model file are not versions (`repository.scan`). Only changes act:
- a version that appears, or whose model file changes, and is not loaded is loaded with the same validation
  (the resource-limited validating process) and atomic swap as a deploy, if the model's version policy
  selects it. One that fails is refused: one warning line, `nr_repository_versions_refused_total`, and the
  versions loaded keep serving. It is not tried again until its file changes (or it is loaded by
  `RepositoryModelLoad`);
- a version that is loaded already (this server deployed it, or its file changed under a loaded version,
  which versions never should: it keeps serving what it loaded) is left alone;
- a version that disappears, or a whole model, is unloaded (drained);
- a changed `config.pbtxt` loads the model as `RepositoryModelLoad` does (its policy applied again; loaded
  versions keep their batching).
A version unloaded through the admin RPCs stays unloaded while its files do not change: the watch acts on
changes of the repository, never on the difference between the repository and what is loaded. A scan that
cannot read the repository folder (a volume not mounted) changes nothing: one warning until it can again.

A model file is read only when it looks the same twice, SETTLE_S apart, so that a file copied in place
(rather than renamed into place, as every writer here does) is not read half-written; one that still
changes waits for the next scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from noiserater.core import repository
from noiserater.server.model_config import CONFIG_FILE
from noiserater.server.models import ModelRegistry

log = logging.getLogger("rater-server.repository")

SETTLE_S = 0.25
FileSignature = tuple[int, int, int]  # size, modification time (ns), inode


@dataclass(frozen=True)
class ModelState:
    """One model as a scan saw it."""

    versions: dict[int, FileSignature] = field(default_factory=dict)
    config: FileSignature | None = None


def signature(path: Path) -> FileSignature | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns, info.st_ino


def scan(root: Path) -> dict[str, ModelState]:
    """Every model of the repository with its versions' and config's file signatures (blocking). A repository
    folder that is not there (a volume not mounted) is an error, not a repository without models."""
    if not Path(root).is_dir():
        raise OSError(f"the repository {root} is not a folder (not mounted?); nothing is unloaded")
    found: dict[str, ModelState] = {}
    for name, versions in repository.scan(root).items():
        signed = {}
        for version in versions:
            sig = signature(repository.version_dir(root, name, version) / repository.MODEL_FILE)
            if sig is not None:
                signed[version] = sig
        if signed:
            found[name] = ModelState(signed, signature(Path(root) / name / CONFIG_FILE))
    return found


class RepositoryWatcher:
    """Polls the repository of `registry` every `interval_s` seconds (see the module doc). `baseline` is
    taken before the server loads the repository at start, so that nothing written in between is missed."""

    def __init__(self, registry: ModelRegistry, interval_s: float):
        self.registry = registry
        self.interval_s = interval_s
        self.root = registry.config.repository
        self._seen: dict[str, ModelState] = {}
        self._task: asyncio.Task | None = None
        self._scan_error = ""

    async def _scan(self) -> dict[str, ModelState]:
        return await asyncio.get_running_loop().run_in_executor(self.registry.loader, scan, self.root)

    async def baseline(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)  # as the load at start does
        self._seen = await self._scan()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except Exception as exc:  # an unreadable repository must not end the watch
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if message != self._scan_error:
                    log.warning("repository watch: %s (retried every %g s)", message, self.interval_s)
                self._scan_error = message
            else:
                self._scan_error = ""

    async def poll(self) -> None:
        """One scan, and whatever changed since the last one loaded or unloaded."""
        now = await self._scan()
        fresh = [(name, v) for name, state in now.items() for v, sig in state.versions.items()
                 if self._seen.get(name, ModelState()).versions.get(v) != sig]
        if fresh:
            await asyncio.sleep(min(SETTLE_S, self.interval_s))
            again = await self._scan()
            for name, version in fresh:
                if again.get(name, ModelState()).versions.get(version) != now[name].versions[version]:
                    # Still being written: seen as it was last time, so that the next scan takes it up again.
                    before = self._seen.get(name, ModelState()).versions
                    versions = {v: s for v, s in now[name].versions.items() if v != version}
                    if version in before:
                        versions[version] = before[version]
                    now[name] = ModelState(versions, now[name].config)
        for name in sorted(set(self._seen) | set(now)):
            before, after = self._seen.get(name, ModelState()), now.get(name, ModelState())
            if before == after:
                continue
            await self._follow(name, before, after)
            self._seen[name] = after
        for name in [n for n in self._seen if n not in now]:
            del self._seen[name]

    async def _follow(self, name: str, before: ModelState, after: ModelState) -> None:
        registry = self.registry
        loaded = registry.loaded_versions(name)
        changed = {v for v, sig in after.versions.items() if before.versions.get(v) != sig}
        for version in sorted(changed & set(before.versions) & loaded):
            log.warning("repository: %s version %d changed on disk while loaded; it keeps serving what it loaded "
                        "(versions are immutable: write a new version instead)", name, version)
        config_changed = before.config != after.config and bool(after.versions)
        gone = set(before.versions) - set(after.versions)
        wanted = set(after.versions) - loaded if config_changed else changed - loaded
        if not wanted and not (gone & loaded) and not (config_changed and loaded):
            return
        on_disk = sorted(after.versions)
        loaded_now, problems = await registry.sync_from_disk(name, on_disk, None if config_changed else wanted)
        now_loaded = registry.loaded_versions(name)
        for version in loaded_now:
            log.info("repository: loaded %s version %d", name, version)
        refused = sorted(v for v in wanted - now_loaded if registry.failure(name, v))
        for version in refused:
            log.warning("repository: refused %s version %d: %s", name, version, registry.failure(name, version))
        registry.metrics.repository_refused.inc(len(refused))
        unselected = sorted(wanted - now_loaded - set(refused))
        if unselected:
            log.info("repository: %s version(s) %s not loaded: not selected by its version policy", name,
                     ", ".join(map(str, unselected)))
        for problem in problems:
            if not any(problem.startswith(f"{name} version {v}:") for v in refused):
                log.warning("repository: %s", problem)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
