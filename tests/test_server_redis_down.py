"""With Redis down the server keeps serving, counts the failed flushes, keeps the
statistics, and delivers them once Redis is back."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import numpy as np
import pytest
import redis
from support import free_port
from support.server import ServerThread, make_repository

from noiserater.core import codec
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig


def start_redis(port: int, workdir) -> subprocess.Popen:
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(2000):
        assert proc.poll() is None, "redis-server exited"
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            client.connection_pool.disconnect()
            proc.poll()
    raise AssertionError("redis-server did not answer")


def test_serving_survives_redis_down_and_statistics_arrive_later(tmp_path, rater_onnx):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")
    port = free_port()  # nothing listens here yet
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu",
                          redis_url=f"redis://127.0.0.1:{port}/0", stats_flush_s=3600)  # flushes driven below
    rng = np.random.default_rng(0)
    with ServerThread(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        for _ in range(5):
            response = stub.SelectNoise(pb.SelectNoiseRequest(
                model=pb.ModelRef(name="digits"), dataset="redis-down", keep=1,
                x0=codec.encode(rng.standard_normal((4, 64)).astype(np.float32)),
                t=codec.encode(rng.integers(0, 100, 4)),
                candidates=codec.encode(rng.standard_normal((4, 8, 64)).astype(np.float32))))
            assert codec.decode(response.indices).shape == (4, 1)
        assert server.call(server.server.recorder.flush()) is False
        assert server.server.metrics.redis_flush_errors._value.get() >= 1
        with pytest.raises(grpc.RpcError) as err:  # reading needs Redis; the error is not a hang
            stub.GetStats(pb.GetStatsRequest(dataset="redis-down"), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "stats:" in err.value.details()
        redis_proc = start_redis(port, tmp_path)
        try:
            assert server.call(server.server.recorder.flush()) is True
            stats = stub.GetStats(pb.GetStatsRequest(dataset="redis-down"))
            assert sum(b.count for b in stats.buckets) == 5 * 4 * 8
        finally:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
