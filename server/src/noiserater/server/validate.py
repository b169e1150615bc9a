"""Validation of a model before the serving process loads it: onnx.checker, no external data, the rater
signature and metadata, and a warm-up run, all in a separate process with an address-space limit
(RLIMIT_AS), a CPU-time limit (RLIMIT_CPU) and a wall-clock timeout after which it is killed. A model
that allocates without bound or never finishes its warm-up (a few hundred bytes of ONNX can ask for
16 GiB or loop 10^12 times) costs that process, never the server, which only loads what passed, from the
very bytes that passed.

The validating process runs `python -m noiserater.server.validate` (started with fork+exec, never a
fork of the server's threads) and always on CPU with one intra-op thread, so its CPU time tracks its wall
time. The protocol on its stdin: each model as an 8-byte big-endian length and its bytes; on its stdout,
one line per event: `ready` once imported, `phase <name>` as a check begins, `result <json>` per model.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from noiserater.core.scoring import RaterSession, ScoringError
from noiserater.server.rpc import RpcError

# Validations at once (each one a process with up to --validate-memory-mb); more deploys wait their turn.
CONCURRENT_VALIDATIONS = 2
# The validating process gets this long to import onnx and onnxruntime before the first model's clock starts.
STARTUP_TIMEOUT_S = 60.0
MAX_DETAIL = 300  # characters of an underlying error quoted in a message
# Signs in onnxruntime's messages that an allocation failed under the address-space limit.
OUT_OF_MEMORY_SIGNS = ("Failed to allocate memory", "bad_alloc", "MemoryError", "Cannot allocate memory")


class ValidationError(RpcError):
    """A model that did not pass: INVALID_ARGUMENT, or RESOURCE_EXHAUSTED when it hit a limit."""

    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= MAX_DETAIL else line[:MAX_DETAIL] + "..."


# -- what is checked (in the validating process, and by `rater-server check`) -------------------------
def external_tensors(message: Any, where: str = "model") -> Iterator[tuple[str, Any]]:
    """(where, tensor) of every TensorProto anywhere in an ONNX message (initializers, sparse initializers,
    node attributes, subgraphs, functions, training info) that keeps its data in an external file."""
    from onnx import TensorProto

    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE or field.message_type.GetOptions().map_entry:
            continue
        items = value if field.is_repeated else (value,)
        for i, item in enumerate(items):
            here = f"{where}.{field.name}[{i}]" if field.is_repeated else f"{where}.{field.name}"
            if isinstance(item, TensorProto):
                if item.data_location == TensorProto.EXTERNAL or len(item.external_data):
                    yield here, item
                continue
            yield from external_tensors(item, here)


def _location(tensor: Any) -> str:
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def validate_onnx_bytes(data: bytes) -> Any:
    """onnx.checker over a model file's bytes, which must not refer to external data; the parsed model.
    ScoringError('onnx: ...') when it is not a valid, self-contained model."""
    import onnx

    if not data:
        raise ScoringError("onnx: the upload is empty")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf DecodeError, ...
        raise ScoringError(f"onnx: not a valid ONNX model ({_first_line(exc)})") from None
    for where, tensor in external_tensors(model):
        raise ScoringError(f"onnx: {where[:120]} (tensor {tensor.name[:64]!r}) keeps its data in an external "
                           f"file (location {_location(tensor)[:64]!r}); a model must be one self-contained file")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx ValidationError, ...
        raise ScoringError(f"onnx: not a valid ONNX model ({_first_line(exc)})") from None
    return model


def open_session(source: bytes, device: str = "cpu", intra_op_threads: int = 0, graph_optimization: str = "all",
                 phase: Callable[[str], None] = lambda name: None) -> RaterSession:
    """Load, check the signature and metadata, and warm up (blocking: run it in a worker thread); `phase`
    hears "load" and "warm-up" as they begin."""
    phase("load")
    session = RaterSession(source, device=device, intra_op_threads=intra_op_threads,
                           graph_optimization=graph_optimization)
    phase("warm-up")
    try:
        session.warm_up()
    except ScoringError:
        raise
    except Exception as exc:  # onnxruntime's own exception types
        raise ScoringError(f"onnx: warm-up run failed ({_first_line(exc)})") from None
    return session


def check_model(data: bytes, graph_optimization: str, phase: Callable[[str], None]) -> dict[str, Any]:
    """Every check a model passes before it is served (on CPU, one thread); what it says about itself."""
    phase("check")
    validate_onnx_bytes(data)
    info = open_session(data, "cpu", 1, graph_optimization, phase).info
    return {"data_shape": list(info.data_shape), "num_timesteps": info.num_timesteps, "dataset": info.dataset,
            "objective": info.objective}


# -- models in the repository -------------------------------------------------------------------------
def read_repository_model(path: Path, max_bytes: int = 2**31 - 1) -> bytes:
    """A repository model's bytes with any external data read in, so that what is validated and loaded is
    one self-contained buffer. External data must be a regular file inside the model's own version folder
    (symbolic links resolved); anything else is a ScoringError."""
    data = path.read_bytes()
    import onnx
    from onnx import TensorProto

    try:
        model = onnx.load_model_from_string(data)
    except Exception:  # not ONNX at all: the validation says so
        return data
    found = list(external_tensors(model))
    if not found:
        return data
    folder = path.parent.resolve()
    total = len(data)
    for where, tensor in found:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        target = (folder / location).resolve() if location and not os.path.isabs(location) else None
        if target is None or not target.is_relative_to(folder) or not target.is_file():
            raise ScoringError(f"onnx: {where[:120]} (tensor {tensor.name[:64]!r}): external data "
                               f"{location[:64]!r} is not a file inside the version folder")
        try:
            offset, length = int(entries.get("offset", 0)), entries.get("length")
            with open(target, "rb") as handle:
                handle.seek(offset)
                raw = handle.read(int(length)) if length is not None else handle.read(max_bytes - total + 1)
        except (OSError, ValueError) as exc:
            raise ScoringError(f"onnx: {where[:120]}: external data unreadable ({_first_line(exc)})") from None
        total += len(raw)
        if total > max_bytes:
            raise ScoringError(f"onnx: the model and its external data exceed {max_bytes} bytes")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
        tensor.raw_data = raw
    return model.SerializeToString()


# -- the server's side --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    memory_mb: int = 1024
    timeout_s: float = 30.0
    graph_optimization: str = "all"

    @property
    def cpu_s(self) -> int:
        """The CPU-time limit per model: the wall-clock timeout, rounded up (one thread: CPU time <= wall time)."""
        return max(1, math.ceil(self.timeout_s))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _Process:
    """One validating process, which checks models one after another until it fails or is closed."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr: deque[str] = deque(maxlen=20)
        self._workdir = tempfile.TemporaryDirectory(prefix="rater-validate-")
        self._stderr_task: asyncio.Task | None = None

    async def start(self) -> None:
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
        limits = self.limits
        # cwd: an empty folder, so that nothing a model names relative to it exists.
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "noiserater.server.validate", "--memory-mb", str(limits.memory_mb),
            "--cpu-s", str(limits.cpu_s), "--graph-optimization", limits.graph_optimization,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=self._workdir.name, env=env)
        self._stderr_task = asyncio.get_running_loop().create_task(self._read_stderr())
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), max(STARTUP_TIMEOUT_S, limits.timeout_s))
        except TimeoutError:
            await self.kill()
            raise RpcError(f"validation: the validating process did not start within "
                           f"{max(STARTUP_TIMEOUT_S, limits.timeout_s):g} s") from None
        if line.strip() != b"ready":
            code = await self.proc.wait()
            await self._stderr_done()
            detail = self.stderr[-1] if self.stderr else f"exit status {code}"
            raise RpcError(f"validation: the validating process failed to start ({detail[:MAX_DETAIL]}); "
                           f"is --validate-memory-mb ({limits.memory_mb}) too low?")

    async def _read_stderr(self) -> None:
        async for line in self.proc.stderr:
            text = line.decode(errors="replace").strip()
            if text:
                self.stderr.append(text)

    async def _stderr_done(self) -> None:
        if self._stderr_task is not None:
            try:
                await asyncio.wait_for(self._stderr_task, 5)
            except (TimeoutError, asyncio.CancelledError):
                self._stderr_task.cancel()

    async def check(self, data: bytes) -> dict[str, Any]:
        """Validate one model; ValidationError when it fails (after which this process is gone if it died
        or was killed: `alive` says so)."""
        limits, proc = self.limits, self.proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.timeout_s
        phase = "check"
        try:
            proc.stdin.write(len(data).to_bytes(8, "big") + data)
            await asyncio.wait_for(proc.stdin.drain(), limits.timeout_s)
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), max(0.0, deadline - loop.time()))
                if not line:
                    break
                kind, _, rest = line.decode(errors="replace").strip().partition(" ")
                if kind == "phase":
                    phase = rest
                elif kind == "result":
                    result = json.loads(rest)
                    if "error" in result:
                        raise ValidationError(result["error"], getattr(grpc.StatusCode, result["status"]))
                    return result
        except TimeoutError:
            await self.kill()
            raise ValidationError(f"validation: {phase} exceeded {limits.timeout_s:g} s (--validate-timeout-s); "
                                  f"the model was not loaded", grpc.StatusCode.RESOURCE_EXHAUSTED) from None
        except (BrokenPipeError, ConnectionResetError):
            pass
        raise await self._died(phase)

    async def _died(self, phase: str) -> ValidationError:
        try:
            code = await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:  # its output closed but it lives on: end it
            await self.kill()
            code = self.proc.returncode
        await self._stderr_done()
        limits = self.limits
        if code == -signal.SIGXCPU:
            return ValidationError(f"validation: {phase} exceeded the CPU-time limit of {limits.cpu_s} s",
                                   grpc.StatusCode.RESOURCE_EXHAUSTED)
        if code < 0:
            return ValidationError(f"validation: the validating process died of {_signal_name(-code)} during "
                                   f"{phase} (memory limit {limits.memory_mb} MB); the model was not loaded",
                                   grpc.StatusCode.RESOURCE_EXHAUSTED)
        detail = self.stderr[-1][:MAX_DETAIL] if self.stderr else "no message"
        return ValidationError(f"validation: the validating process exited with status {code} during {phase} "
                               f"({detail})", grpc.StatusCode.INTERNAL)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        if self.proc is not None:
            await self.proc.wait()
        await self._stderr_done()

    async def close(self, kill: bool = False) -> None:
        """Let the process finish after its current model, or `kill` it at once."""
        if self.alive and not kill:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                pass
        await self.kill()
        self._workdir.cleanup()


class ValidationSession:
    """Models validated one after another by one process, replaced when a model kills it."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._process: _Process | None = None

    async def check(self, data: bytes) -> dict[str, Any]:
        if self._process is None or not self._process.alive:
            if self._process is not None:
                await self._process.close()
            self._process = _Process(self.limits)
            try:
                await self._process.start()
            except BaseException:
                await self._process.close()
                self._process = None
                raise
        return await self._process.check(data)

    async def close(self, kill: bool = False) -> None:
        if self._process is not None:
            await self._process.close(kill)
            self._process = None


class Validator:
    """The server's model validations: at most CONCURRENT_VALIDATIONS processes at once."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._slots = asyncio.Semaphore(CONCURRENT_VALIDATIONS)

    @asynccontextmanager
    async def session(self):
        async with self._slots:
            session = ValidationSession(self.limits)
            try:
                yield session
            except BaseException:
                # Shielded: a cancelled deploy still kills and reaps its validating process.
                await asyncio.shield(session.close(kill=True))
                raise
            await session.close()

    async def check(self, data: bytes) -> dict[str, Any]:
        async with self.session() as session:
            return await session.check(data)


# -- the validating process ---------------------------------------------------------------------------
def _limit(kind: int, soft: int, hard_too: bool = False) -> None:
    """Lower a limit to `soft` (never above what this process inherited); `hard_too` lowers the hard one."""
    import resource

    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(kind, (soft, soft if hard_too else hard))


def _die_with_parent() -> None:
    """Linux: be killed when the server goes, however it goes."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(sign in str(exc) for sign in OUT_OF_MEMORY_SIGNS)


def child_main(argv: list[str]) -> int:
    import argparse
    import resource

    parser = argparse.ArgumentParser(prog="python -m noiserater.server.validate")
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--cpu-s", type=int, required=True)
    parser.add_argument("--graph-optimization", default="all")
    args = parser.parse_args(argv)
    _die_with_parent()
    _limit(resource.RLIMIT_AS, args.memory_mb * 1024 * 1024, hard_too=True)
    _limit(resource.RLIMIT_CORE, 0, hard_too=True)
    # The protocol gets its own descriptor; whatever a library prints to stdout goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import numpy  # noqa: F401  imported before the first model, so the clock counts the model only
    import onnx  # noqa: F401
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    out.write("ready\n")
    source = sys.stdin.buffer
    current = ["check"]

    def phase(name: str) -> None:
        current[0] = name
        out.write(f"phase {name}\n")

    while True:
        header = source.read(8)
        if len(header) < 8:
            return 0
        data = source.read(int.from_bytes(header, "big"))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _limit(resource.RLIMIT_CPU, int(usage.ru_utime + usage.ru_stime) + args.cpu_s + 1)
        try:
            result: dict[str, Any] = check_model(data, args.graph_optimization, phase)
        except Exception as exc:  # noqa: BLE001  every failure is reported, none ends the process
            if _out_of_memory(exc):
                result = {"status": "RESOURCE_EXHAUSTED",
                          "error": f"validation: {current[0]} ran out of memory (limit {args.memory_mb} MB, "
                                   f"--validate-memory-mb)"}
            elif isinstance(exc, ScoringError):
                result = {"status": "INVALID_ARGUMENT", "error": _first_line(exc)}
            else:
                result = {"status": "INVALID_ARGUMENT", "error": f"onnx: {current[0]} failed ({_first_line(exc)})"}
        del data
        out.write("result " + json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
