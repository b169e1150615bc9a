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
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
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
    """Inference requests received, answered and dropped; printed at shutdown to show that none was lost. An
    accepted request is answered once its response is handed to gRPC (on a stream: written to it), and
    dropped when it is cancelled first (its client went away, or the drain's grace period ran out) or its
    response cannot be written. Requests refused while draining are neither: they were never accepted."""

    received: int = 0
    answered: int = 0
    dropped: int = 0

    @property
    def in_flight(self) -> int:
        return self.received - self.answered - self.dropped


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
Deliver = Callable[[Outcome], Awaitable[None]]  # writes an outcome back (a stream's message)

# gRPC's stop cancels the calls it has received but not yet handed to the server (the event loop picks them
# up one at a time), so a client would see CANCELLED where it should see UNAVAILABLE. Before the stop, new
# calls are therefore held unanswered: their clients wait instead of sending more, and the calls gRPC still
# holds reach the server. Once no call has arrived for HOLD_QUIET_S (at most HOLD_MAX_S), the stop begins
# (from then on gRPC refuses new calls with UNAVAILABLE itself) and the held calls are answered.
HOLD_QUIET_S = 0.05
HOLD_MAX_S = 1.0


class RpcRuntime:
    """What every call of one server shares: its metrics, its request counters and whether it is draining
    (then new inference calls are refused with UNAVAILABLE, idle streams are ended with UNAVAILABLE, and the
    server waits for the accepted requests)."""

    def __init__(self, metrics: ServerMetrics, max_stream_in_flight: int = 256):
        self.metrics = metrics
        self.counters = RequestCounters()
        self.draining = False
        # Says whether a call's metadata carries the bearer token; set when a token is configured.
        self.authenticate: Callable[[Any], bool] | None = None
        self.admin_refusal = ""  # why the admin RPCs are refused (FAILED_PRECONDITION); empty: they are not
        self.max_stream_in_flight = max_stream_in_flight
        self._streams: set[asyncio.Event] = set()  # each open stream's wake-up, set when the drain starts
        self._last_arrival = 0.0
        self._admit = asyncio.Event()  # cleared while gRPC's stop is prepared: new calls wait
        self._admit.set()

    def start_draining(self) -> None:
        """Refuse new inference requests from now on and end every stream as soon as it is idle."""
        self.draining = True
        for wake in self._streams:
            wake.set()

    async def drained(self, deadline: float) -> None:
        """Wait until no accepted inference request is in flight and every stream has ended, or the loop's clock
        passes `deadline`."""
        loop = asyncio.get_running_loop()
        while (self.counters.in_flight > 0 or self._streams) and loop.time() < deadline:
            await asyncio.sleep(0.005)

    async def stop_grpc(self, stop: Coroutine[Any, Any, None]) -> None:
        """Run `stop` (gRPC's server stop) so that no call is cancelled by it: hold new calls, wait until calls
        stop arriving, begin the stop, then answer the held calls (see HOLD_QUIET_S)."""
        loop = asyncio.get_running_loop()
        self._admit.clear()
        start = loop.time()
        while loop.time() - start < HOLD_MAX_S and loop.time() - max(self._last_arrival, start) < HOLD_QUIET_S:
            await asyncio.sleep(0.005)
        stopping = loop.create_task(stop)
        await asyncio.sleep(0.01)  # the stop's first step shuts gRPC's listeners and connections to new calls
        self._admit.set()
        await stopping

    async def answer(self, method: str, inference: bool, handler: Handler, request: Any,
                     context: grpc.aio.ServicerContext | None = None, deliver: Deliver | None = None) -> Outcome:
        """Run one request's handler with the server's accounting: refuse inference while draining, map
        exceptions to status codes, count the answer. With `deliver`, the outcome is delivered through it
        (a stream's write) before the request counts as answered, so a draining server waits for it."""
        self._last_arrival = asyncio.get_running_loop().time()
        if not self._admit.is_set():
            await self._admit.wait()
        started = time.perf_counter()
        call = CallContext(self, method, inference, grpc_context=context)
        counters = self.counters
        if inference and self.draining:
            code = grpc.StatusCode.UNAVAILABLE
            self.metrics.requests.labels(method, "", "", code.name).inc()
            self.metrics.request_seconds.labels(method, code.name).observe(time.perf_counter() - started)
            outcome = Outcome(None, code, DRAINING_MESSAGE)
            if deliver is not None:
                await deliver(outcome)
            return outcome
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
        outcome = Outcome(response, code, message)
        if deliver is not None:
            try:
                await deliver(outcome)
            except BaseException:
                if inference:
                    counters.dropped += 1
                raise
        if inference:
            counters.answered += 1
        return outcome

    async def serve_stream(self, method: str, request_iterator: AsyncIterator[Any],
                           context: grpc.aio.ServicerContext, handler: Handler,
                           respond: Callable[[Any, Outcome], Any]) -> None:
        """A bidirectional stream of independent inference requests. Each goes through `answer` (the same
        accounting as a unary call), concurrently with the others so that one stream's requests batch like
        separate calls; `respond(request, outcome)` makes its stream message, written as soon as it is
        ready. A failed request gets its own message; the stream goes on.

        At most `max_stream_in_flight` requests of a stream are unanswered or unwritten at once: past that
        the stream is not read until some are written, so gRPC's flow control holds the client back. While
        draining, a stream with nothing in flight is ended with UNAVAILABLE (clients reopen it elsewhere)."""
        loop = asyncio.get_running_loop()
        write_lock = asyncio.Lock()
        tasks: set[asyncio.Task] = set()
        failures: list[BaseException] = []
        changed = asyncio.Event()  # a request finished, the reader ended, or the drain started
        room = asyncio.Event()  # a request finished: the reader may go on

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())
            room.set()
            changed.set()

        async def one(request: Any) -> None:
            async def deliver(outcome: Outcome) -> None:
                async with write_lock:
                    await context.write(respond(request, outcome))

            await self.answer(method, True, handler, request, deliver=deliver)

        async def read() -> None:
            async for request in request_iterator:
                task = loop.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(finished)
                while len(tasks) >= self.max_stream_in_flight:
                    room.clear()
                    await room.wait()

        reader = loop.create_task(read())
        reader.add_done_callback(lambda _: changed.set())
        self._streams.add(changed)
        try:
            while not failures and not (reader.done() and not tasks):
                if self.draining and not tasks:
                    self._streams.discard(changed)
                    reader.cancel()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
                changed.clear()
                await changed.wait()
            if failures:
                raise failures[0]
            reader.result()  # the stream broke while reading: end with its error
        finally:
            self._streams.discard(changed)
            reader.cancel()
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
