"""How the remote selector sends a SelectNoise request: one interface, two transports.

A transport has `select(request, timeout_s) -> SelectNoiseResponse` and `close()`; `open_transport(name,
channel, max_attempts)` builds one on a `RaterChannel`:
- "unary" (`UnaryTransport`): one SelectNoise call per request; the channel's service config retries
  UNAVAILABLE with backoff and the call carries the deadline;
- "stream" (`StreamTransport`, the default): every request over one long-lived SelectNoiseStream.

A stream request costs the server and the client a fraction of a unary call (measured with
`nrctl bench serve --transport stream|unary`; see docs/serving.md), which is most of the server's CPU for
the small requests a training step sends. What the unary call gets from gRPC, the stream transport does
itself:
- a deadline per request: responses are routed by request_id to waiting callers, each of which waits
  with its own timeout (a late response is dropped; the stream stays open);
- retries: UNAVAILABLE (stream broken, server draining) drops the stream and retries the request on a
  new one with exponential backoff, up to `max_attempts` within the deadline;
- a server without SelectNoiseStream (UNIMPLEMENTED) is asked with unary calls from then on.
Failures surface as `RemoteError`, which has `code()` and `details()` like grpc.RpcError.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Protocol

import grpc

if TYPE_CHECKING:
    from noiserater.client.channel import RaterChannel

TRANSPORTS = ("stream", "unary")  # NoiseSelector.remote(transport=...) and nrctl bench serve --transport
_CLOSE = object()


class RemoteError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


class Transport(Protocol):
    def select(self, request: Any, timeout_s: float) -> Any: ...

    def close(self) -> None: ...


def open_transport(name: str, channel: RaterChannel, max_attempts: int) -> Transport:
    """The transport called `name` (one of TRANSPORTS) on `channel`; closing it leaves the channel open."""
    if name not in TRANSPORTS:
        raise ValueError(f"transport: {name!r} is not one of {', '.join(TRANSPORTS)}")
    unary = UnaryTransport(channel)
    if name == "unary":
        return unary
    from noiserater.core.v1 import rater_service_pb2 as pb

    return StreamTransport(channel.stub, pb, channel.metadata, max_attempts, unary.select)


class UnaryTransport:
    """One SelectNoise call per request; retries are the channel's (its service config)."""

    def __init__(self, channel: RaterChannel):
        self._channel = channel

    def select(self, request: Any, timeout_s: float) -> Any:
        return self._channel.call("SelectNoise", request, timeout_s)

    def close(self) -> None:
        pass


class _Stream:
    """One open SelectNoiseStream; a reader thread resolves each request's future by request_id."""

    def __init__(self, stub: Any, metadata: Any):
        self._outbox: queue.Queue = queue.Queue()
        self._waiting: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.broken: RemoteError | None = None
        self._call = stub.SelectNoiseStream(iter(self._outbox.get, _CLOSE), metadata=metadata)
        threading.Thread(target=self._read, name="select-stream-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self._call:
                with self._lock:
                    future = self._waiting.pop(response.request_id, None)
                if future is not None:
                    future.set_result(response)
            error = RemoteError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
        except grpc.RpcError as exc:
            error = RemoteError(exc.code(), exc.details() or exc.code().name)
        with self._lock:
            self.broken = error
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            future.set_exception(error)

    def send(self, message: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self.broken is not None:
                raise self.broken
            self._waiting[message.request_id] = future
        self._outbox.put(message)
        return future

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._waiting.pop(request_id, None)

    def close(self) -> None:
        self._outbox.put(_CLOSE)
        self._call.cancel()


class StreamTransport:
    """SelectNoise requests over a shared stream, with deadlines, retries and a unary fallback."""

    def __init__(self, stub: Any, pb: Any, metadata: Any, max_attempts: int,
                 unary: Callable[[Any, float], Any]):
        self._stub, self._pb, self._metadata = stub, pb, metadata
        self._max_attempts = max(1, max_attempts)
        self._unary = unary
        self._stream: _Stream | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.unsupported = False

    def _open(self) -> _Stream:
        with self._lock:
            if self._stream is None or self._stream.broken is not None:
                self._stream = _Stream(self._stub, self._metadata)
            return self._stream

    def _drop(self, stream: _Stream) -> None:
        with self._lock:
            if self._stream is stream:
                self._stream = None
        stream.close()

    def select(self, request: Any, timeout_s: float) -> Any:
        if self.unsupported:
            return self._unary(request, timeout_s)
        deadline = time.monotonic() + timeout_s
        backoff, attempt = 0.05, 1
        while True:
            try:
                return self._attempt(request, deadline, timeout_s)
            except RemoteError as error:
                pause = min(backoff, deadline - time.monotonic())
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self._max_attempts or pause <= 0:
                    raise
            time.sleep(pause)
            backoff, attempt = min(1.0, backoff * 2), attempt + 1

    def _attempt(self, request: Any, deadline: float, timeout_s: float) -> Any:
        """One try on the shared stream: the SelectNoiseResponse, or RemoteError. A broken stream and a
        draining server's UNAVAILABLE drop the stream, so a retry opens a new one (which a load balancer
        may route to another replica)."""
        message = self._pb.SelectNoiseStreamRequest(request_id=str(next(self._ids)), request=request)
        stream = self._open()
        try:
            response = stream.send(message).result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            stream.forget(message.request_id)
            raise RemoteError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s:g}s") from None
        except RemoteError as exc:
            self._drop(stream)
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server from before SelectNoiseStream
                self.unsupported = True
                return self._unary(request, max(0.0, deadline - time.monotonic()))
            raise
        if response.error_code == 0:
            return response.response
        code = _STATUS_BY_NUMBER.get(response.error_code, grpc.StatusCode.UNKNOWN)
        if code == grpc.StatusCode.UNAVAILABLE:
            self._drop(stream)
        raise RemoteError(code, response.error_message)

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
