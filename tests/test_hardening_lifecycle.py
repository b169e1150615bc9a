"""Hardening, process life cycle: start-up on a repository a previous process left behind (huge versions, a
killed upload), the port, and SIGTERM with idle streams and with a burst of calls in flight. Every server is a
`rater-server` child process."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from support.hostile import (
    ADMIN,
    TOKEN,
    IdleStream,
    ServerProcess,
    call_code,
    padded_rater_bytes,
    plain_rater_bytes,
    rater_stub,
    select_request,
    serves_a_selection,
    sigterm_and_wait,
    wait_for,
    write_repository,
)

from noiserater.core.v1 import rater_service_pb2 as pb

INT64_MAX = 2**63 - 1


@pytest.fixture
def repo(tmp_path):
    return write_repository(tmp_path / "repo", {"digits": plain_rater_bytes()})


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def models_listed(server: ServerProcess) -> grpc.StatusCode:
    with server.channel() as channel:
        return call_code(rater_stub(channel).ListModels, pb.ListModelsRequest(), timeout=10)


def test_huge_versions_never_break_listing_or_serving(repo, token_file):
    """DeployModel(version=2**63-1) is served or refused with INVALID_ARGUMENT; the next DeployModel (version 0:
    one above the newest) is served or refused but never INTERNAL; ListModels and SelectNoise on the model work
    afterwards, and again after a restart on the same repository, where a version folder beyond int64
    (99999999999999999999, as a hand or an older server may have written) has been added."""
    args = ("--auth-token-file", str(token_file))
    with ServerProcess(repo, *args) as server:
        server.wait_serving()
        with server.channel() as channel:
            stub = rater_stub(channel)
            first = call_code(stub.DeployModel, pb.DeployModelRequest(name="big", version=INT64_MAX,
                                                                      onnx=plain_rater_bytes()),
                              timeout=60, metadata=ADMIN)
            second = call_code(stub.DeployModel, pb.DeployModelRequest(name="big", onnx=plain_rater_bytes()),
                               timeout=60, metadata=ADMIN)
        assert first in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), first
        assert second not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), second
        assert models_listed(server) == grpc.StatusCode.OK
        assert serves_a_selection(server.target, model="big")
        assert server.stop() == 0
    beyond = repo / "big" / "99999999999999999999"
    beyond.mkdir(parents=True, exist_ok=True)
    (beyond / "model.onnx").write_bytes(plain_rater_bytes())
    with ServerProcess(repo, *args) as server:
        server.wait_serving()
        assert models_listed(server) == grpc.StatusCode.OK
        assert serves_a_selection(server.target, model="big")


def test_start_up_removes_uploads_a_killed_deploy_left(repo, token_file):
    """SIGKILL while a 40 MB deploy is in progress (as soon as its temporary .upload-* file shows up in the
    repository, or when the deploy ends if that moment is missed, in which case the temporary file the kill
    would have left is put in place), then a restart on the same repository: after start-up no .upload-* file
    remains anywhere in the repository."""
    data = padded_rater_bytes(40 * 1024 * 1024)
    args = ("--auth-token-file", str(token_file))
    with ServerProcess(repo, *args) as server:
        server.wait_serving()
        with server.channel() as channel:
            deploy = rater_stub(channel).DeployModel.future(pb.DeployModelRequest(name="big", onnx=data),
                                                            timeout=60, metadata=ADMIN)
            wait_for(lambda: deploy.done() or any(repo.rglob(".upload-*")), timeout=60, interval=0.001)
            server.kill()
    if not any(repo.rglob(".upload-*")):
        version_dir = repo / "big" / "2"
        version_dir.mkdir(parents=True, exist_ok=True)
        (version_dir / ".upload-k1ll3d").write_bytes(data[: 1024 * 1024])
    with ServerProcess(repo, *args) as server:
        server.wait_serving()
        assert sorted(str(p.relative_to(repo)) for p in repo.rglob(".upload-*")) == []


def test_idle_stream_does_not_hold_up_sigterm(repo):
    """With --grace-s 10 and one SelectNoiseStream open without a message, SIGTERM stops the process (exit 0)
    well within the grace period: in under 5 s."""
    with ServerProcess(repo, grace_s=10) as server:
        server.wait_serving()
        with server.channel() as channel:
            stub = rater_stub(channel)
            with IdleStream(stub.SelectNoiseStream, timeout=60):
                # Calls on one connection reach the server in order: once this one is answered, the stream is open.
                assert call_code(stub.ListModels, pb.ListModelsRequest(), timeout=10) == grpc.StatusCode.OK
                code, seconds = sigterm_and_wait(server, timeout=5)
        assert code == 0 and seconds < 5, f"exit status {code} after {seconds:.1f}s"


def test_calls_around_sigterm_are_answered_or_refused_unavailable_never_cancelled(repo):
    """Eight threads send SelectNoise calls back to back (each goes on after a refusal) while SIGTERM arrives:
    every call ends OK or UNAVAILABLE, none CANCELLED (or with any other code)."""
    codes: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    with ServerProcess(repo, grace_s=10) as server:
        server.wait_serving()

        def client(seed: int) -> None:
            request = select_request(8, 4, seed=seed)
            with server.channel() as channel:
                stub = rater_stub(channel)
                while not stop.is_set():
                    code = call_code(stub.SelectNoise, request, timeout=10).name
                    with lock:
                        codes[code] = codes.get(code, 0) + 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        try:
            assert wait_for(lambda: codes.get("OK", 0) >= 200, timeout=30)
            server.signal(signal.SIGTERM)
            exit_code = server.wait_exit(30)
            # Calls after the exit find no server at all (UNAVAILABLE): a few of those show the end was reached.
            wait_for(lambda: codes.get("UNAVAILABLE", 0) >= 16, timeout=10)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    assert exit_code == 0
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes


def test_second_server_on_a_taken_port_exits_with_one_line(repo, tmp_path):
    """A second rater-server started on the port a running one serves exits with status 1 and a one-line error
    naming the port, instead of sharing the port."""
    with ServerProcess(repo) as first:
        first.wait_serving()
        other_repo = write_repository(tmp_path / "other", {"digits": plain_rater_bytes()})
        with ServerProcess(other_repo, port=first.port) as second:
            deadline = time.monotonic() + 30
            while second.alive() and "listening on" not in second.output and time.monotonic() < deadline:
                second.wait_exit(0.05)
            code = second.wait_exit(0.5)
            output = second.wait_output() if code is not None else second.output
        assert first.alive()
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert code == 1, f"the second server is {'running' if code is None else f'exited {code}'}:\n{output[-1000:]}"
    assert len(errors) == 1 and str(first.port) in errors[0], output
