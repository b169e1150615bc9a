"""`rater-server serve --workers N`: N processes behind one port, SERVING once all are up, every connection
answered by one of them, the admin RPCs refused, a SIGTERM drains them all, and a worker that cannot start
stops the server."""

from __future__ import annotations

import signal
import socket
import subprocess

import grpc
import pytest
from support import free_port
from support.server import make_repository
from test_server_operations import rater_server, select_request

from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.trainer.bench.cpu import descendants
from noiserater.trainer.bench.local_server import wait_serving


@pytest.fixture(scope="module")
def repo(tmp_path_factory, rater_onnx):
    return make_repository(tmp_path_factory.mktemp("workers-repo"), {"digits": [rater_onnx]})


def serve(repo, port: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(rater_server("serve", "--repository", str(repo), "--host", "127.0.0.1", "--port", str(port),
                                         "--device", "cpu", "--instances", "1", "--insecure-admin", *flags),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_workers_share_the_port_and_drain_together(repo):
    port = free_port()
    proc = serve(repo, port, "--workers", "2")
    try:
        wait_serving(f"127.0.0.1:{port}", proc, timeout_s=120)
        assert len(descendants(proc.pid)) == 2
        for i in range(6):  # separate connections, spread over the workers by the kernel
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.channel_id", i)]) as channel:
                stub = pb_grpc.RaterServiceStub(channel)
                assert stub.SelectNoise(select_request(seed=i), timeout=30).indices.shape == [4, 1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.RaterServiceStub(channel).UnloadModel(
                    pb.UnloadModelRequest(model=pb.ModelRef(name="digits")), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--workers" in err.value.details()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, errors = proc.communicate(timeout=90)
    assert proc.returncode == 0, errors[-2000:]
    assert f"listening on 127.0.0.1:{port} with 2 workers" in out
    assert "2 workers exited with codes [0, 0]" in out
    assert out.count("rater-server stopped: ") == 3  # each worker's count of requests, then the supervisor's


def test_workers_need_a_fixed_port(repo):
    result = subprocess.run(rater_server("serve", "--repository", str(repo), "--port", "0", "--workers", "2"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "rater-server: error: --workers: the workers share one port; give --port (not 0)"]


def test_a_worker_that_cannot_start_stops_the_server(repo):
    port, metrics = free_port(), free_port()
    with socket.socket() as taken:  # worker 1's /metrics port (--metrics-port + 1) is in use
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", metrics + 1))
        except OSError:
            pytest.skip("the port after a free one is in use")
        taken.listen()
        proc = serve(repo, port, "--workers", "2", "--metrics-port", str(metrics))
        out, errors = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "worker 1 exited with code 1 before it served" in errors
    assert not descendants(proc.pid)


def test_run_slots_are_shared_between_workers(tmp_path):
    """Two workers' batchers of one model version hold at most `instances` runs between them."""
    import asyncio

    from noiserater.server.shared_slots import SharedSlots

    async def scenario() -> None:
        first, second = (SharedSlots(tmp_path, ("digits", "1"), 2) for _ in range(2))  # as two workers would
        held = [await first.acquire(), await second.acquire()]
        waiting = [asyncio.ensure_future(first.acquire()), asyncio.ensure_future(second.acquire())]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiting)
        first.release(held[0])
        await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.05)
        assert sum(w.done() for w in waiting) == 1  # one slot came free: one waiter got it
        second.release(held[1])
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
        first.close()
        second.close()

    asyncio.run(scenario())
