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


def test_a_flush_applied_but_unanswered_is_retried_and_counted_once(redis_url):
    """Redis applies a flush but its answer comes after the flush's timeout (or never): the recorder cannot tell
    that from a flush that was lost, so it retries the same flush, under the same id, before anything newer; the
    replica's ledger in Redis makes the retry a no-op. Each score counts once."""
    import asyncio

    from noiserater.server.metrics import ServerMetrics
    from noiserater.server.stats import FlushId, MemoryStatsStore, RedisStatsStore, StatsRecorder, ledger_key

    dataset, replica = "flush-once", "test-replica-flush-once"
    attempts: list[FlushId] = []

    async def scenario() -> None:
        store = RedisStatsStore(redis_url, 60)
        merge = store.merge

        async def answer_lost(batch, flush):
            attempts.append(flush)
            applied = await merge(batch, flush)
            if len(attempts) == 1:  # Redis applied it; its answer did not come back in time
                raise TimeoutError("no answer")
            return applied

        store.merge = answer_lost
        metrics = ServerMetrics()
        recorder = StatsRecorder(store, metrics, flush_s=3600, replica_id=replica)
        t = np.array([0, 10, 20, 30, 90])
        recorder.record(dataset, "digits", 1, 100, t, np.linspace(-1, 1, 5).astype(np.float32))
        assert await recorder.flush() is False
        recorder.record(dataset, "digits", 1, 100, t[:3], np.zeros(3, np.float32))
        assert await recorder.flush() is True
        assert metrics.redis_flush_errors._value.get() == 1 and metrics.stats_flush_duplicates._value.get() == 1
        await recorder.close()

    asyncio.run(scenario())
    assert attempts == [FlushId(replica, 1), FlushId(replica, 1), FlushId(replica, 2)]
    client = redis.Redis.from_url(redis_url)
    counts = [int(client.hget(key, "count")) for key in client.scan_iter(match=f"nr:stats:{dataset}:*")]
    assert sum(counts) == 8, counts
    assert {k.decode(): int(v) for k, v in client.hgetall(ledger_key(replica)).items()} == {"seq": 2, "scores": 8}
    assert 0 < client.ttl(ledger_key(replica)) <= 60

    async def in_memory() -> None:  # the embedded store applies a flush once too
        from noiserater.server.stats import Moments, StatsQuery

        store = MemoryStatsStore()
        batch = {(dataset, "digits", 1, 0): Moments.of(np.ones(4))}
        assert await store.merge(batch, FlushId(replica, 1)) is True
        assert await store.merge(batch, FlushId(replica, 1)) is False
        assert [m.count for m in (await store.read(StatsQuery(dataset))).buckets.values()] == [4]

    asyncio.run(in_memory())
