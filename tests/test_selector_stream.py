"""The remote selector's stream transport: concurrent callers share one stream and get their own answers;
deadlines, UNAVAILABLE retries and the unary fallback for servers without SelectNoiseStream."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from support import select_in_process
from support.server import ServerThread, make_repository

from noiserater.client.transports import RemoteError, StreamTransport
from noiserater.core import codec
from noiserater.core.scoring import RaterSession
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, max_delay_ms=1.0)) as running:
        yield running


def selection_request(seed: int) -> tuple[pb.SelectNoiseRequest, tuple]:
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((4, 64)).astype(np.float32)
    t = rng.integers(0, 100, 4).astype(np.int64)
    candidates = rng.standard_normal((4, 8, 64)).astype(np.float32)
    return pb.SelectNoiseRequest(model=pb.ModelRef(name="digits"), x0=codec.encode(x0), t=codec.encode(t),
                                 candidates=codec.encode(candidates), keep=1), (x0, t, candidates)


def unary_not_expected(request, timeout_s):
    raise AssertionError("the stream transport fell back to unary calls")


def test_concurrent_callers_share_one_stream_and_get_their_own_answers(server, rater_onnx):
    local = RaterSession(rater_onnx, device="cpu")
    with grpc.insecure_channel(server.target) as channel:
        transport = StreamTransport(pb_grpc.RaterServiceStub(channel), pb, None, 2, unary_not_expected)
        results: dict[int, np.ndarray] = {}

        def caller(seed: int) -> None:
            request, _ = selection_request(seed)
            results[seed] = codec.decode(transport.select(request, 10.0).indices)

        threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(24)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        opened = transport._stream
        transport.select(selection_request(99)[0], 10.0)
        assert transport._stream is opened  # one stream served every request
        transport.close()
    for seed in range(24):
        want, _ = select_in_process(local, *selection_request(seed)[1])
        np.testing.assert_array_equal(results[seed], want)


class FakeCall:
    """What a gRPC stream-stream call looks like to the transport: an iterator of responses."""

    def __init__(self, requests, behaviour):
        self.requests, self.behaviour, self.cancelled = requests, behaviour, False

    def __iter__(self):
        for message in self.requests:
            reply = self.behaviour(message)
            if isinstance(reply, grpc.RpcError):
                raise reply
            if reply is not None:
                yield reply

    def cancel(self):
        self.cancelled = True


class StatusError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"fake {self._code.name}"


class FakeStub:
    def __init__(self, behaviours):
        self.behaviours = list(behaviours)  # one per stream opened
        self.opened = 0

    def SelectNoiseStream(self, requests, metadata=None):
        behaviour = self.behaviours[min(self.opened, len(self.behaviours) - 1)]
        self.opened += 1
        return FakeCall(requests, behaviour)


def answer(message):
    return pb.SelectNoiseStreamResponse(request_id=message.request_id,
                                        response=pb.SelectNoiseResponse(model=pb.ModelRef(name="digits", version=7)))


def test_unavailable_is_retried_on_a_new_stream():
    stub = FakeStub([lambda m: StatusError(grpc.StatusCode.UNAVAILABLE),
                     lambda m: pb.SelectNoiseStreamResponse(request_id=m.request_id, error_code=14,
                                                            error_message="server is shutting down"),
                     answer])
    transport = StreamTransport(stub, pb, None, 4, unary_not_expected)
    assert transport.select(pb.SelectNoiseRequest(), 5.0).model.version == 7
    assert stub.opened == 3


def test_retries_stop_at_max_attempts_and_other_errors_are_not_retried():
    stub = FakeStub([lambda m: StatusError(grpc.StatusCode.UNAVAILABLE)])
    with pytest.raises(RemoteError) as err:
        StreamTransport(stub, pb, None, 3, unary_not_expected).select(pb.SelectNoiseRequest(), 5.0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and stub.opened == 3

    invalid = FakeStub([lambda m: pb.SelectNoiseStreamResponse(request_id=m.request_id, error_code=3,
                                                               error_message="t: out of range")])
    transport = StreamTransport(invalid, pb, None, 3, unary_not_expected)
    with pytest.raises(RemoteError) as err:
        transport.select(pb.SelectNoiseRequest(), 5.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == "t: out of range"
    assert invalid.opened == 1


def test_deadline_leaves_the_stream_open():
    silent_first = {"count": 0}

    def behaviour(message):
        silent_first["count"] += 1
        return None if silent_first["count"] == 1 else answer(message)  # the first request is never answered

    stub = FakeStub([behaviour])
    transport = StreamTransport(stub, pb, None, 3, unary_not_expected)
    started = time.monotonic()
    with pytest.raises(RemoteError) as err:
        transport.select(pb.SelectNoiseRequest(), 0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 2.0
    assert transport.select(pb.SelectNoiseRequest(), 5.0).model.version == 7
    assert stub.opened == 1


def test_a_server_without_the_stream_is_asked_with_unary_calls():
    stub = FakeStub([lambda m: StatusError(grpc.StatusCode.UNIMPLEMENTED)])
    unary_calls = []

    def unary(request, timeout_s):
        unary_calls.append(timeout_s)
        return pb.SelectNoiseResponse(model=pb.ModelRef(name="digits", version=3))

    transport = StreamTransport(stub, pb, None, 3, unary)
    assert transport.select(pb.SelectNoiseRequest(), 5.0).model.version == 3
    assert transport.select(pb.SelectNoiseRequest(), 5.0).model.version == 3
    assert stub.opened == 1 and len(unary_calls) == 2 and transport.unsupported
