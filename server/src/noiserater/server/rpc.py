"""The RPC runtime: every call's accounting (metrics, request counters, the drain) and one mapping from
exceptions to gRPC status codes.

An exception says its own status: the server's exception types derive from `RpcError` and set
`grpc_status`; the shared code's validation errors (noiserater.core) are mapped in `CORE_STATUS`. So this
module needs nothing from the rest of the server, and a handler only raises.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import grpc

from noiserater.core.codec import CodecError
from noiserater.core.repository import RepositoryError
from noiserater.core.scoring import ScoringError
from noiserater.core.selection import SelectionError
from noiserater.server.client_errors import RateLimitedLog

if TYPE_CHECKING:
    from noiserater.server.metrics import ServerMetrics

log = logging.getLogger("rater-server.rpc")
ERROR_LOG = RateLimitedLog(log)  # one line per method and status (or exception type) per interval
MAX_MESSAGE_CHARS = 1024  # an error message longer than this is cut: it must fit gRPC's metadata

UNKNOWN_MODEL = "unknown"  # metric label of calls that name no loaded model
DRAINING_MESSAGE = "server is shutting down; retry on another replica"


class RpcError(Exception):
    """An error that ends a call with `grpc_status` and its message. Subclasses set the status as a class
    attribute; a handler that needs a one-off status passes it."""

    grpc_status: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, status: grpc.StatusCode | None = None):
        super().__init__(message)
        if status is not None:
            self.grpc_status = status


# The shared code's errors all describe a bad request.
CORE_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (ScoringError, grpc.StatusCode.INVALID_ARGUMENT),
    (SelectionError, grpc.StatusCode.INVALID_ARGUMENT),
    (RepositoryError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status an exception ends its call with; None for an unexpected one (INTERNAL, logged)."""
    if isinstance(exc, RpcError):
        return exc.grpc_status
    for kind, code in CORE_STATUS:
        if isinstance(exc, kind):
            return code
    return None


def bounded(message: str) -> str:
    """An error message on one line and at most MAX_MESSAGE_CHARS long."""
    line = message.replace("\r", " ").replace("\n", " ")
    if len(line) <= MAX_MESSAGE_CHARS:
        return line
    return f"{line[:MAX_MESSAGE_CHARS]}... ({len(line)} chars)"


@dataclass
class RequestCounters:
    """Inference requests received and answered; printed at shutdown to show that none was lost."""

    received: int = 0
    answered: int = 0
    dropped: int = 0
    unwritten: int = 0  # stream responses answered but not yet written back to their stream

    @property
    def in_flight(self) -> int:
        return self.received - self.answered - self.dropped + self.unwritten


@dataclass
class CallContext:
    """One call as the server accounts for it, handed to its handler. The handler fills in `model` and
    `version` as it learns them: they label the call's metric. Only a loaded model's name and version may
    label it (`served`); a call that names anything else is labelled UNKNOWN_MODEL, so that clients
    cannot add label values."""

    runtime: RpcRuntime  # the server's metrics, request counters and drain state
    method: str
    inference: bool
    model: str = ""
    version: str = ""
    grpc_context: Any = None  # the grpc.aio.ServicerContext of a unary call

    def peer(self) -> str:
        return self.grpc_context.peer() if self.grpc_context is not None else ""

    def authenticated(self) -> bool:
        """Whether the call carries the server's bearer token (never, when no token is configured)."""
        check = self.runtime.authenticate
        return bool(check and self.grpc_context is not None and check(self.grpc_context.invocation_metadata()))

    def served(self, name: str, version: int) -> None:
        """The call reached a loaded model version: it labels the call's metric."""
        self.model, self.version = name, str(version)


class Outcome(NamedTuple):
    response: Any  # None unless code is OK
    code: grpc.StatusCode
    message: str


Handler = Callable[[Any, CallContext], Awaitable[Any]]  # (request, call) -> response


class RpcRuntime:
    """What every call of one server shares: its metrics, its request counters and whether it is draining
    (then new inference calls are refused with UNAVAILABLE and the server waits for the accepted ones)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.counters = RequestCounters()
        self.draining = False
        # Says whether a call's metadata carries the bearer token; set when a token is configured.
        self.authenticate: Callable[[Any], bool] | None = None

    async def drained(self, deadline: float) -> None:
        """Wait until no accepted inference request is in flight, or the loop's clock passes `deadline`."""
        loop = asyncio.get_running_loop()
        while self.counters.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.005)

    async def answer(self, method: str, inference: bool, handler: Handler, request: Any,
                     context: grpc.aio.ServicerContext | None = None) -> Outcome:
        """Run one request's handler with the server's accounting: refuse inference while draining, map
        exceptions to status codes, count the answer."""
        started = time.perf_counter()
        call = CallContext(self, method, inference, grpc_context=context)
        counters = self.counters
        if inference and self.draining:
            code = grpc.StatusCode.UNAVAILABLE
            self.metrics.requests.labels(method, "", "", code.name).inc()
            self.metrics.request_seconds.labels(method, code.name).observe(time.perf_counter() - started)
            return Outcome(None, code, DRAINING_MESSAGE)
        if inference:
            counters.received += 1
        code, message, response = grpc.StatusCode.OK, "", None
        try:
            response = await handler(request, call)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            if inference:
                counters.dropped += 1
            raise
        except Exception as exc:
            known = status_of(exc)
            if known is None:
                ERROR_LOG.log(logging.ERROR, f"{method}:{type(exc).__name__}", f"{method} failed", exc_info=exc)
                code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
            else:
                code, message = known, str(exc)
            message = bounded(message)
            if known is not None:
                ERROR_LOG.log(logging.INFO, f"{method}:{code.name}", f"{method}: {code.name}: {message}")
        finally:
            self.metrics.requests.labels(method, call.model, call.version, code.name).inc()
            self.metrics.request_seconds.labels(method, code.name).observe(time.perf_counter() - started)
            if inference and code != grpc.StatusCode.CANCELLED:
                counters.answered += 1
        return Outcome(response, code, message)

    async def serve_stream(self, method: str, request_iterator: AsyncIterator[Any],
                           context: grpc.aio.ServicerContext, handler: Handler,
                           respond: Callable[[Any, Outcome], Any]) -> None:
        """A bidirectional stream of independent inference requests. Each goes through `answer` (the same
        accounting as a unary call), concurrently with the others so that one stream's requests batch like
        separate calls; `respond(request, outcome)` makes its stream message, written as soon as it is
        ready. A failed request gets its own message; the stream goes on. A response counts as in flight
        until it is written, so a draining server waits for it."""
        counters = self.counters
        write_lock = asyncio.Lock()
        tasks: set[asyncio.Task] = set()

        async def one(request: Any) -> None:
            reply = respond(request, await self.answer(method, True, handler, request))
            counters.unwritten += 1  # no await since `answer` counted it answered: the drain never sees a gap
            try:
                async with write_lock:
                    await context.write(reply)
            finally:
                counters.unwritten -= 1

        try:
            async for request in request_iterator:
                task = asyncio.get_running_loop().create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:  # the client is done sending; finish what it sent
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()


class Servicer(Protocol):
    runtime: RpcRuntime


def unary(method: str, inference: bool = False):
    """Serve `async def handler(self, request, call: CallContext)` as a unary gRPC method through
    `RpcRuntime.answer`; a failure ends the call with its status code."""

    def decorate(handler: Callable[[Any, Any, CallContext], Awaitable[Any]]):
        @functools.wraps(handler)
        async def method_handler(self: Servicer, request: Any, context: grpc.aio.ServicerContext):
            outcome = await self.runtime.answer(method, inference, handler.__get__(self), request, context)
            if outcome.code == grpc.StatusCode.OK:
                return outcome.response
            await context.abort(outcome.code, outcome.message)

        return method_handler

    return decorate
