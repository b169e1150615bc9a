"""The dynamic batcher of one model version, after Triton's: concurrent requests' triples are merged into
one onnxruntime run and the scores split back.

A request is queued with `submit`; the batching task takes the oldest request, then keeps taking queued ones
until the run would exceed `max_batch` triples or `max_delay_s` has passed since it started waiting, and runs
the merged batch in a worker thread (off the event loop). While a run is in progress the next requests queue
up, so under load batches form without waiting for the delay. A request larger than `max_batch` runs alone.
With `preferred` run sizes (Triton's preferred_batch_size, in triples), a run that the queued requests make up
exactly at one of them goes at once, cut back to the largest such size. Up to `instances` batches run at once
(Triton's instance count; with several worker processes, over all of them: shared_slots.py): while all are
busy, requests queue, so batches grow with load; a lone client's request is never held back for the delay.
With batching off (`max_batch == 0`) every request runs on its own, concurrently in the thread pool, still
bounded by `max_queue` requests in flight. Besides requests, the work accepted and not yet answered is bounded
in triples (`max_queued_triples`), which is what memory grows with; a request arriving at an idle batcher is
always taken.

Scores are checked after every run: a request whose rows came out NaN or Inf fails with
FAILED_PRECONDITION (the model, not the request, is at fault; retrying cannot help) and its scores go
nowhere else; the other requests of the same run get theirs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc
import numpy as np

from noiserater.server.client_errors import RateLimitedLog
from noiserater.server.metrics import ServerMetrics
from noiserater.server.rpc import RpcError
from noiserater.server.shared_slots import shared_slots

log = logging.getLogger("rater-server.batcher")
NON_FINITE_LOG = RateLimitedLog(log)

ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class QueueFullError(RpcError):
    """The batcher's queue is full."""

    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class NonFiniteScoresError(RpcError):
    """The model produced NaN or Inf scores for a request's rows: its fault, not the client's, and not a
    passing condition that a retry would get past."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class BatcherClosedError(RpcError):
    """The model version was unloaded before the request could be queued."""

    grpc_status = grpc.StatusCode.UNAVAILABLE


@dataclass
class _Job:
    x0: np.ndarray
    t: np.ndarray
    eps: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return self.x0.shape[0]


@dataclass
class RunStatistics:
    """Cumulative counts behind the KServe ModelStatistics RPC, with Triton's meanings: queue and compute
    time are counted once per request (a request's share of a merged run is the whole run)."""

    inference_count: int = 0  # triples scored
    execution_count: int = 0  # onnxruntime runs
    success_count: int = 0
    success_ns: int = 0  # queueing to scores, summed over requests
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0  # merging the requests' inputs into one run
    compute_ns: int = 0  # onnxruntime
    compute_output_ns: int = 0  # splitting the scores back
    last_inference_ms: int = 0  # wall clock of the last run

    def count_run(self, enqueued: list[float], started: float, elapsed: float, triples: int, merge_s: float,
                  split_s: float) -> None:
        """One successful run, counted once its scores are handed back."""
        finished = time.perf_counter()
        self.inference_count += triples
        self.execution_count += 1
        self.success_count += len(enqueued)
        self.success_ns += int(sum(finished - e for e in enqueued) * 1e9)
        self.queue_ns += int(sum(max(0.0, started - e) for e in enqueued) * 1e9)
        self.compute_input_ns += int(merge_s * 1e9) * len(enqueued)
        self.compute_ns += int(elapsed * 1e9) * len(enqueued)
        self.compute_output_ns += int(split_s * 1e9) * len(enqueued)
        self.last_inference_ms = int(time.time() * 1000)

    def count_failure(self, enqueued: list[float]) -> None:
        now = time.perf_counter()
        self.fail_count += len(enqueued)
        self.fail_ns += int(sum(now - e for e in enqueued) * 1e9)


class DynamicBatcher:
    def __init__(self, score: ScoreFn, executor: Executor, metrics: ServerMetrics, labels: tuple[str, str],
                 max_batch: int, max_delay_s: float, max_queue: int, instances: int = 1,
                 inline_max_triples: int = 0, preferred: tuple[int, ...] = (), max_queued_triples: int = 1 << 20):
        self._score = score
        self._executor = executor
        self._m_queue = metrics.queue_seconds.labels(*labels)
        self._m_compute = metrics.compute_seconds.labels(*labels)
        self._m_batch_requests = metrics.batch_requests.labels(*labels)
        self._m_batch_triples = metrics.batch_triples.labels(*labels)
        self._m_triples = metrics.triples.labels(*labels)
        self._m_depth = metrics.queue_depth.labels(*labels)
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.max_queued_triples = max_queued_triples
        self.labels = labels
        self.inline_max_triples = inline_max_triples
        self.preferred = frozenset(preferred)
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_triples = 0
        self._last_batch_requests = 1
        self._slots = asyncio.Semaphore(max(1, instances))
        self._shared = shared_slots(labels, instances)  # the other workers' runs count too
        self._runs: set[asyncio.Task] = set()
        self._waiter: asyncio.Future | None = None
        self._pending = 0  # queued or running, i.e. accepted and not yet answered
        self._pending_triples = 0  # their triples
        metrics.pending_triples.labels(*labels).set_function(lambda: self._pending_triples)
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.statistics = RunStatistics()
        self._task: asyncio.Task | None = None
        if max_batch > 0:
            self._task = asyncio.get_running_loop().create_task(self._run_forever())

    def submit(self, x0: np.ndarray, t: np.ndarray, eps: np.ndarray) -> asyncio.Future:
        """Queue N triples; the future resolves to their float32 scores [N]. Never awaits, so a request
        that found this version ready is queued on it before anything else can run."""
        if self._closed:
            raise BatcherClosedError("model version is being unloaded")
        if self._pending >= self.max_queue:
            raise QueueFullError(f"queue of {self.max_queue} requests is full")
        size = x0.shape[0]
        if self._pending and self._pending_triples + size > self.max_queued_triples:
            raise QueueFullError(f"queue of {self.max_queued_triples} triples is full ({self._pending_triples} "
                                 f"queued, {size} more asked; --max-queued-triples)")
        loop = asyncio.get_running_loop()
        job = _Job(x0, t, eps, loop.create_future())
        self._pending += 1
        self._pending_triples += size
        self._idle.clear()
        job.future.add_done_callback(functools.partial(self._done, size))
        if self._task is None:
            loop.create_task(self._run([job]))
        else:
            self._queue.append(job)
            self._queued_triples += job.size
            queued = self._queued_triples
            if len(self._queue) == 1 or queued >= self.max_batch or queued in self.preferred:
                self._wake()
        return job.future

    def _done(self, size: int, _future: asyncio.Future) -> None:
        self._pending -= 1
        self._pending_triples -= size
        if self._pending == 0:
            self._idle.set()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        """Sleep until `_wake` (a first request, or a full batch) or the timeout: one future and at most
        one timer per batch, not one wake-up per request."""
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        handle = loop.call_later(timeout, self._wake) if timeout is not None else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    async def _run_forever(self) -> None:
        while True:
            if not self._queue:
                await self._wait(None)
                continue
            # With every instance busy, requests keep queueing: that is where batches grow under load.
            await self._slots.acquire()
            shared = await self._shared.acquire() if self._shared is not None else None
            remaining = self._queue[0].enqueued + self.max_delay_s - time.perf_counter()
            # Only wait for company while traffic is concurrent: a lone client is never delayed.
            if remaining > 0 and self._last_batch_requests > 1 and not self._next_run()[1]:
                await self._wait(remaining)
            batch = [self._queue.popleft() for _ in range(self._next_run()[0])]
            self._queued_triples -= sum(job.size for job in batch)
            self._last_batch_requests = len(batch) if len(batch) > 1 or not self._queue else 2
            self._m_depth.set(len(self._queue))
            task = asyncio.get_running_loop().create_task(self._run_in_slot(batch, shared))
            self._runs.add(task)
            task.add_done_callback(self._runs.discard)

    def _next_run(self) -> tuple[int, bool]:
        """(requests, complete) of the next run from the head of the queue: as many requests as fit in
        `max_batch` triples, or the most that make up a preferred size exactly. Complete: waiting for more
        requests cannot make it better (it is full, or has a preferred size)."""
        count = size = best = 0
        for job in self._queue:
            if count and size + job.size > self.max_batch:
                break
            count += 1
            size += job.size
            if size in self.preferred:
                best = count
        if best:
            return best, True
        return count, count < len(self._queue) or size >= self.max_batch

    async def _run_in_slot(self, batch: list[_Job], shared: int | None = None) -> None:
        try:
            await self._run(batch)
        except Exception:  # _run answers its jobs itself; never let a failure stop the batcher
            log.exception("batch run failed")
        finally:
            if shared is not None:
                self._shared.release(shared)
            self._slots.release()

    def _timed_score(self, x0: np.ndarray, t: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, float, float]:
        started = time.perf_counter()
        scores = self._score(x0, t, eps)
        return scores, started, time.perf_counter() - started

    async def _run(self, batch: list[_Job]) -> None:
        live = [job for job in batch if not job.future.done()]  # a cancelled RPC needs no scores
        if not live:
            return
        merge_started = time.perf_counter()
        try:
            if len(live) == 1:
                x0, t, eps = live[0].x0, live[0].t, live[0].eps
            else:
                x0 = np.concatenate([job.x0 for job in live])
                t = np.concatenate([job.t for job in live])
                eps = np.concatenate([job.eps for job in live])
            merge_s = time.perf_counter() - merge_started
            if x0.shape[0] <= self.inline_max_triples:
                # Small runs take less time than handing them to a worker thread and back costs the
                # busy event loop (two GIL handoffs): run them right here.
                scores, started, elapsed = self._timed_score(x0, t, eps)
            else:
                loop = asyncio.get_running_loop()
                scores, started, elapsed = await loop.run_in_executor(self._executor, self._timed_score, x0, t,
                                                                      eps)
            if scores.shape != (x0.shape[0],):
                raise RuntimeError(f"model returned scores of shape {list(scores.shape)} for {x0.shape[0]} triples")
        except Exception as exc:  # onnxruntime errors go back to every request of the batch
            self.statistics.count_failure([job.enqueued for job in live])
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        split_started = time.perf_counter()
        finite = bool(np.isfinite(scores).all())
        failed: list[_Job] = []
        offset = 0
        for job in live:
            part = scores[offset:offset + job.size]
            offset += job.size
            if not finite and not np.isfinite(part).all():
                failed.append(job)
                if not job.future.done():
                    job.future.set_exception(self._non_finite(part))
            elif not job.future.done():
                job.future.set_result(part)
        if failed:
            self.statistics.count_failure([job.enqueued for job in failed])
            live = [job for job in live if all(job is not bad for bad in failed)]
            if not live:
                return
        self.statistics.count_run([job.enqueued for job in live], started, elapsed, x0.shape[0], merge_s,
                                  time.perf_counter() - split_started)
        for job in live:
            self._m_queue.observe(max(0.0, started - job.enqueued))
        self._m_compute.observe(elapsed)
        self._m_batch_requests.observe(len(live))
        self._m_batch_triples.observe(x0.shape[0])
        self._m_triples.inc(x0.shape[0])

    def _non_finite(self, part: np.ndarray) -> NonFiniteScoresError:
        bad = int((~np.isfinite(part)).sum())
        name, version = self.labels
        message = (f"score: model {name} version {version} produced NaN or Inf scores for {bad} of {part.size} "
                   "triples of this request; the model is at fault, not the request")
        NON_FINITE_LOG.warn(f"{name}:{version}", message)
        return NonFiniteScoresError(message)

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let every accepted one finish (up to `timeout`), then stop."""
        self._closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(BatcherClosedError("model version was unloaded"))
        self._queue.clear()
        if self._shared is not None and not self._runs:
            self._shared.close()
