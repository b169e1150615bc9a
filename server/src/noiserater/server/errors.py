"""One mapping from the server's exceptions to gRPC status codes, and the RPC wrapper that applies it
and counts every answer in the metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from noiserater.core.codec import CodecError
from noiserater.core.repository import RepositoryError
from noiserater.core.scoring import ScoringError
from noiserater.core.selection import SelectionError
from noiserater.server.batcher import BatcherClosedError, QueueFullError
from noiserater.server.metrics import ServerMetrics
from noiserater.server.models import ModelExistsError, ModelNotFoundError
from noiserater.server.stats import StatsError

log = logging.getLogger("rater-server.rpc")

STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (ScoringError, grpc.StatusCode.INVALID_ARGUMENT),
    (SelectionError, grpc.StatusCode.INVALID_ARGUMENT),
    (RepositoryError, grpc.StatusCode.INVALID_ARGUMENT),
    (StatsError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BatcherClosedError, grpc.StatusCode.UNAVAILABLE),
)


class RpcError(Exception):
    """Raised by handlers that want a specific status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class RequestCounters:
    """Inference requests received and answered; printed at shutdown to show that none was lost."""

    received: int = 0
    answered: int = 0
    dropped: int = 0
    unwritten: int = 0  # stream responses answered but not yet written back to their stream
    draining: bool = False  # set on SIGTERM: new inference requests are refused with UNAVAILABLE

    @property
    def in_flight(self) -> int:
        return self.received - self.answered - self.dropped + self.unwritten


@dataclass
class CallLabels:
    """What a handler learned about the call (filled in as it goes) for the metric labels."""

    model: str = ""
    version: str = ""


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, RpcError):
        return exc.code
    for kind, code in STATUS_OF:
        if isinstance(exc, kind):
            return code
    return None


async def answer(owner: Any, method: str, inference: bool,
                 run: Callable[[CallLabels], Awaitable[Any]]) -> tuple[Any, grpc.StatusCode, str]:
    """Run one request's handler with the server's accounting: refuse inference while draining, map
    exceptions to status codes, count the answer. Returns (response or None, code, message)."""
    metrics: ServerMetrics = owner.metrics
    counters: RequestCounters = owner.counters
    labels = CallLabels()
    if inference and counters.draining:
        code = grpc.StatusCode.UNAVAILABLE
        metrics.requests.labels(method, "", "", code.name).inc()
        return None, code, "server is shutting down; retry on another replica"
    if inference:
        counters.received += 1
    code, message, response = grpc.StatusCode.OK, "", None
    try:
        response = await run(labels)
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        if inference:
            counters.dropped += 1
        raise
    except Exception as exc:
        known = status_of(exc)
        if known is None:
            log.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        else:
            code, message = known, str(exc)
    finally:
        metrics.requests.labels(method, labels.model, labels.version, code.name).inc()
        if inference and code != grpc.StatusCode.CANCELLED:
            counters.answered += 1
    return response, code, message


def rpc(method: str, inference: bool = False):
    """Wrap a unary `async def handler(self, request, context, labels)` with `answer`; a failure ends the
    call with its status code."""

    def decorate(handler: Callable[..., Awaitable[Any]]):
        @functools.wraps(handler)
        async def wrapper(self, request, context: grpc.aio.ServicerContext):
            response, code, message = await answer(
                self, method, inference, lambda labels: handler(self, request, context, labels))
            if code == grpc.StatusCode.OK:
                return response
            await context.abort(code, message)

        return wrapper

    return decorate


async def serve_stream(owner: Any, method: str, request_iterator: AsyncIterator[Any],
                       context: grpc.aio.ServicerContext, run: Callable[[Any, CallLabels], Awaitable[Any]],
                       respond: Callable[[Any, Any, grpc.StatusCode, str], Any]) -> None:
    """A bidirectional stream of independent inference requests. Each is handled by `run(request, labels)`
    through `answer` (same accounting as a unary call), concurrently with the others so that one stream's
    requests batch like separate calls; `respond(request, response, code, message)` makes its stream
    message, written as soon as it is ready. A failed request gets its own message; the stream goes on.
    A response counts as in flight until it is written, so a draining server waits for it."""
    counters: RequestCounters = owner.counters
    write_lock = asyncio.Lock()
    tasks: set[asyncio.Task] = set()

    async def one(request: Any) -> None:
        response, code, message = await answer(owner, method, True, lambda labels: run(request, labels))
        reply = respond(request, response, code, message)
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
