"""What the server does with requests that are the client's mistake, before and after its handlers run:
log them in one line at a bounded rate (a client repeating a mistake must not flood the log), and answer
a message that is not valid protobuf with INVALID_ARGUMENT instead of gRPC's UNKNOWN and traceback."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

log = logging.getLogger("rater-server.requests")

LOG_INTERVAL_S = 10.0  # at most one log line per kind of problem in this interval
MAX_KINDS = 256  # kinds remembered; past it the memory starts over


class RateLimitedLog:
    """Log lines keyed by a kind (e.g. method and status): the first of a kind is logged, the next ones
    within `interval_s` are counted and reported with the next line of that kind."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S):
        self._logger = logger
        self._interval_s = interval_s
        self._seen: dict[str, tuple[float, int]] = {}  # kind -> (last logged, suppressed since)

    def allow(self, kind: str) -> int | None:
        """None when a line of this kind is due for suppression, else how many were suppressed before it."""
        now = time.monotonic()
        last, suppressed = self._seen.get(kind, (float("-inf"), 0))
        if now - last < self._interval_s:
            self._seen[kind] = (last, suppressed + 1)
            return None
        if len(self._seen) >= MAX_KINDS and kind not in self._seen:
            self._seen.clear()
        self._seen[kind] = (now, 0)
        return suppressed

    def log(self, level: int, kind: str, message: str, exc_info: Any = None) -> None:
        suppressed = self.allow(kind)
        if suppressed is None:
            return
        more = f" (and {suppressed} more like it in the last {self._interval_s:g} s)" if suppressed else ""
        self._logger.log(level, "%s%s", message, more, exc_info=exc_info)

    def warn(self, kind: str, message: str) -> None:
        self.log(logging.WARNING, kind, message)


class MalformedRequest:
    """Stands in for a request message that did not parse, so the handler wrapper can answer it."""

    __slots__ = ("problem",)

    def __init__(self, problem: str):
        self.problem = problem


MALFORMED_LOG = RateLimitedLog(log)


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything else a parser raises on garbage
            return MalformedRequest(type(exc).__name__)

    return parse


def _answer(method: str, request: MalformedRequest) -> str:
    message = f"request: not a valid protobuf message for {method} ({request.problem})"
    MALFORMED_LOG.log(logging.INFO, method, f"{method}: INVALID_ARGUMENT: {message}")
    return message


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Parses request messages itself: one that is not valid protobuf ends its call (or stream) with
    INVALID_ARGUMENT, logged in one rate-limited line. Handlers keep their kind (coroutine or async
    generator); a synchronous one is left as it is."""

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        name = ("stream_" if handler.request_streaming else "unary_") + \
            ("stream" if handler.response_streaming else "unary")
        behaviour = getattr(handler, name)

        async def checked_one(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _answer(method, request))
            return request

        async def checked_all(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext):
            async for request in request_iterator:
                yield await checked_one(request, context)

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            """The request once checked, or for a request stream the iterator that checks each message."""
            if handler.request_streaming:
                return checked_all(request, context)
            return await checked_one(request, context)

        if inspect.isasyncgenfunction(behaviour):
            async def wrapped(request: Any, context: grpc.aio.ServicerContext):
                async for response in behaviour(await checked(request, context), context):
                    yield response
        elif inspect.iscoroutinefunction(behaviour):
            async def wrapped(request: Any, context: grpc.aio.ServicerContext):
                return await behaviour(await checked(request, context), context)
        else:
            return handler
        return handler._replace(request_deserializer=_safe(handler.request_deserializer), **{name: wrapped})

