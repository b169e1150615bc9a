"""The dynamic batcher merges concurrent requests (seen in /metrics), batching can be switched
off, and a full queue answers RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from support import free_port
from support.server import ServerThread, make_repository

from noiserater.core import codec
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.batcher import DynamicBatcher, QueueFullError
from noiserater.server.config import ServerConfig
from noiserater.server.metrics import ServerMetrics
from noiserater.server.rpc import status_of

CLIENTS, ROUNDS, B, K = 16, 4, 4, 8


def scrape(port: int) -> dict[str, float]:
    """Prometheus text -> {sample name with labels: value} (summed over label sets by metric name too)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
            base = name.split("{", 1)[0]
            out[base] = out.get(base, 0.0) + float(value) if base != name else float(value)
    return out


def run_clients(target: str) -> int:
    """CLIENTS threads, ROUNDS SelectNoise calls each; returns the triples scored."""
    start = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RaterServiceStub(channel)
            start.wait(timeout=60)
            for _ in range(ROUNDS):
                req = pb.SelectNoiseRequest(
                    model=pb.ModelRef(name="digits"), keep=1,
                    x0=codec.encode(rng.standard_normal((B, 64)).astype(np.float32)),
                    t=codec.encode(rng.integers(0, 100, B)),
                    candidates=codec.encode(rng.standard_normal((B, K, 64)).astype(np.float32)))
                assert codec.decode(stub.SelectNoise(req, timeout=60).indices).shape == (B, 1)

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        for future in [pool.submit(client, i) for i in range(CLIENTS)]:
            future.result()
    return CLIENTS * ROUNDS * B * K


@pytest.mark.parametrize("batching", [True, False], ids=["batching-on", "batching-off"])
def test_metrics_show_merged_batches_under_concurrency(tmp_path, rater_onnx, batching):
    metrics_port = free_port()
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    # Room for every client's request in one run, and a long delay, so that batches fill up rather than
    # depending on timing; with batching off every request is its own run.
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, metrics_port=metrics_port,
                          max_batch=CLIENTS * B * K if batching else 0, max_delay_ms=500.0, device="cpu")
    with ServerThread(config) as server:
        scored = run_clients(server.target)
        metrics = scrape(metrics_port)
    runs = metrics["nr_batch_requests_count"]
    requests = metrics["nr_batch_requests_sum"]
    assert requests == CLIENTS * ROUNDS
    assert metrics["nr_triples_scored_total"] == scored
    assert metrics['nr_requests_total{code="OK",method="SelectNoise",model="digits",version="1"}'] == requests
    assert metrics["nr_compute_seconds_count"] == runs and metrics["nr_queue_seconds_count"] == requests
    if batching:
        assert requests / runs > 1.0
    else:
        assert runs == requests


def test_full_queue_is_resource_exhausted():
    release = threading.Event()

    def blocked_score(x0, t, eps):
        release.wait(timeout=60)
        return np.zeros(x0.shape[0], np.float32)

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            batcher = DynamicBatcher(blocked_score, pool, ServerMetrics(), ("m", "1"), max_batch=4,
                                     max_delay_s=0.0, max_queue=2)
            one = np.zeros((4, 2), np.float32), np.zeros(4, np.int64), np.zeros((4, 2), np.float32)
            first, second = batcher.submit(*one), batcher.submit(*one)
            with pytest.raises(QueueFullError) as err:
                batcher.submit(*one)
            assert status_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert (await first).shape == (4,) and (await second).shape == (4,)
            assert (await batcher.submit(*one)).shape == (4,)  # room again once answered
            await batcher.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("max_batch", [4, 0], ids=["batching-on", "batching-off"])
def test_pending_triples_gauge_counts_queued_and_running_work(max_batch):
    """nr_pending_triples (what the Kubernetes autoscaler follows) counts every accepted triple until its
    answer, running or queued, with batching on or off."""
    release = threading.Event()

    def blocked_score(x0, t, eps):
        release.wait(timeout=60)
        return np.zeros(x0.shape[0], np.float32)

    metrics = ServerMetrics()

    def pending() -> float | None:
        return metrics.registry.get_sample_value("nr_pending_triples", {"model": "m", "version": "1"})

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            batcher = DynamicBatcher(blocked_score, pool, metrics, ("m", "1"), max_batch=max_batch,
                                     max_delay_s=0.0, max_queue=8)
            assert pending() == 0
            jobs = [batcher.submit(np.zeros((n, 2), np.float32), np.zeros(n, np.int64), np.zeros((n, 2), np.float32))
                    for n in (4, 3)]
            await asyncio.sleep(0.05)  # the first run has started and blocks; with batching on the second queues
            assert pending() == 7
            release.set()
            await asyncio.gather(*jobs)
            assert pending() == 0
            await batcher.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("inline", [0, 1000], ids=["worker-thread", "inline"])
def test_batcher_splits_merged_results_back_in_order(inline):
    calls: list[int] = []

    def score(x0, t, eps):
        calls.append(x0.shape[0])
        return x0[:, 0] + t.astype(np.float32)

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = DynamicBatcher(score, pool, ServerMetrics(), ("m", "1"), max_batch=100, max_delay_s=5.0,
                                     max_queue=100, inline_max_triples=inline)
            jobs = []
            for i, n in enumerate((3, 5, 92)):  # fills max_batch exactly: one run, no waiting on the delay
                x0 = np.full((n, 2), float(i), np.float32)
                jobs.append(batcher.submit(x0, np.arange(n), x0))
            results = await asyncio.gather(*jobs)
            for i, (n, result) in enumerate(zip((3, 5, 92), results, strict=True)):
                np.testing.assert_array_equal(result, i + np.arange(n, dtype=np.float32))
            await batcher.close()

    asyncio.run(scenario())
    assert calls == [100]
