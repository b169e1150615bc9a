"""Per-(dataset, model, version, timestep bucket) score statistics.

Scores are accumulated locally on the request path (cheap numpy work, no I/O) and merged into a store
by a background flush: in process memory by default, or in Redis, where a Lua script applies Chan's
parallel Welford merge atomically so that any number of replicas can flush into the same keys. With
Redis unreachable the flush fails fast (short socket timeouts), the pending statistics stay local and
are retried on the next flush, and the failure is counted; requests never wait on Redis.

Each flush is applied exactly once. A flush that failed may still have been applied (Redis ran it, the answer
was lost or came after the timeout), so it is retried as it was, under the same sequence number, before
anything newer is flushed. Every replica process has an id of its own (`new_replica_id`) and numbers its
flushes 1, 2, 3...; the transaction that merges a flush skips it when the replica's ledger
(`nr:flush:<replica id>`, a hash of `seq`, the last flush applied, and `scores`, the scores this replica has
merged) says it was applied, and records it there otherwise. The ledger expires with the statistics
(--stats-ttl-s), so only a flush retried after that long could count twice. The id is drawn when the
recorder is made: a process that forks must make its recorders after the fork.

Dataset ids come from clients, so the recorder keeps statistics for at most `max_datasets` of them (the
ones this process has recorded since it started); a request for a further one is refused with
RESOURCE_EXHAUSTED before it is scored, and counted in nr_datasets_rejected. Reads are paged, in key order.

Each bucket keeps a histogram of HIST_BINS bins over a range fixed per model version: `probe_range` derives
it from the model itself (its scores on a fixed, seeded probe batch, computed when the version is loaded),
rounded outward to a coarse grid, so that every replica of a version bins alike and the histograms merge
exactly. The bucket stores the range it was started with; a flush that brings another range (a replica whose
hardware scored the probe differently enough to cross a grid line) still counts in count/mean/m2/min/max
but is left out of the histogram and counted in the bucket's `hist_skipped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np

from noiserater.core.stats_layout import (
    HIST_BINS,
    KEY_PREFIX,
    LEGACY_HIST_RANGE,
    TIMESTEP_BUCKETS,
    StatsKey,
    StoredBucket,
    parse_redis_key,
    redis_key,
)
from noiserater.core.text import clip
from noiserater.server.metrics import ServerMetrics
from noiserater.server.rpc import RpcError

log = logging.getLogger("rater-server.stats")

PROBE_BATCH, PROBE_SEED = 64, 0
LEDGER_PREFIX = "nr:flush"  # nr:flush:<replica id>: the flushes a replica process has applied (see the module doc)
FINAL_FLUSH_TRIES = 3  # at shutdown
RAW_LIMIT = 1 << 20  # scores kept raw before they are summarised (bounds memory while Redis is down)
_DATASET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always fullmatch: `$` would let a final "\n" by


class StatsError(RpcError, ValueError):
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class TooManyDatasetsError(RpcError):
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


def check_dataset(dataset: str) -> str:
    if not _DATASET.fullmatch(dataset):
        raise StatsError(f"dataset: invalid dataset id {clip(dataset)} (1-64 letters, digits, '_', '-', '.')")
    return dataset


def timestep_bucket(t: np.ndarray, num_timesteps: int) -> np.ndarray:
    return np.minimum(np.asarray(t, dtype=np.int64) * TIMESTEP_BUCKETS // max(1, num_timesteps),
                      TIMESTEP_BUCKETS - 1)


def histogram(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """HIST_BINS equal bins over [low, high); values outside land in the end bins."""
    idx = np.floor((values.astype(np.float64) - low) * (HIST_BINS / (high - low)))
    return np.bincount(np.clip(idx, 0, HIST_BINS - 1).astype(np.int64), minlength=HIST_BINS)


def _nice_step(span: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is >= span."""
    exp = np.floor(np.log10(span))
    for factor in (1.0, 2.0, 5.0, 10.0):
        step = float(factor * 10.0 ** exp)
        if step >= span * (1 - 1e-9):
            return step
    return float(10.0 ** (exp + 1))


def score_range(scores: np.ndarray) -> tuple[float, float]:
    """The histogram range for a model whose probe scores are `scores`: three times their spread around
    their middle, rounded outward to a grid of a tenth of a 1-2-5 width, so that small numeric differences
    between replicas give the same range."""
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return LEGACY_HIST_RANGE
    lo, hi = float(s.min()), float(s.max())
    middle = (lo + hi) / 2
    width = _nice_step(max(3 * (hi - lo), 1e-3 * max(1.0, abs(middle))))
    unit = width / 10
    digits = max(0, 1 - int(np.floor(np.log10(unit))))
    low = round(float(np.floor((middle - width / 2) / unit)) * unit, digits)
    high = round(float(np.ceil((middle + width / 2) / unit)) * unit, digits)
    return low, high


def probe_range(score: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], data_shape: tuple[int, ...],
                num_timesteps: int) -> tuple[float, float]:
    """The histogram range of one model version, from its scores on a fixed probe batch: PROBE_BATCH triples
    of seeded standard normal x0 and eps at timesteps spread evenly over [0, T). Blocking: run it where the
    model is loaded."""
    rng = np.random.default_rng(PROBE_SEED)
    shape = (PROBE_BATCH, *data_shape)
    x0 = rng.standard_normal(shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    t = np.linspace(0, max(0, num_timesteps - 1), PROBE_BATCH).astype(np.int64)
    return score_range(score(x0, t, eps))


@dataclass
class Moments:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, np.int64))
    hist_low: float = LEGACY_HIST_RANGE[0]
    hist_high: float = LEGACY_HIST_RANGE[1]
    num_timesteps: int = 0  # of the model version; 0 = unknown
    hist_skipped: int = 0  # scores counted but not in the histogram (another range than the bucket's)

    @classmethod
    def of(cls, values: np.ndarray, hist_range: tuple[float, float] = LEGACY_HIST_RANGE,
           num_timesteps: int = 0) -> Moments:
        v = values.astype(np.float64)
        mean = float(v.mean())
        return cls(int(v.size), mean, float(((v - mean) ** 2).sum()), float(v.min()), float(v.max()),
                   histogram(v, *hist_range), hist_range[0], hist_range[1], num_timesteps)

    def merge(self, other: Moments) -> None:
        """Chan et al.'s parallel combination of two Welford summaries."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            self.min, self.max, self.hist = other.min, other.max, other.hist.copy()
            self.hist_low, self.hist_high = other.hist_low, other.hist_high
            self.num_timesteps, self.hist_skipped = other.num_timesteps, other.hist_skipped
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / n
        self.m2 += other.m2 + delta * delta * self.count * other.count / n
        self.count = n
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.num_timesteps = self.num_timesteps or other.num_timesteps
        self.hist_skipped += other.hist_skipped
        if (self.hist_low, self.hist_high) == (other.hist_low, other.hist_high):
            self.hist = self.hist + other.hist
        else:
            self.hist_skipped += int(other.hist.sum())


@dataclass(frozen=True)
class FlushId:
    """Which flush a batch is: the flushing replica process and its sequence number there (from 1)."""

    replica: str
    seq: int


def scores_in(batch: dict[StatsKey, Moments]) -> int:
    return sum(m.count for m in batch.values())


class MemoryStatsStore:
    """The embedded default: statistics in this process only."""

    def __init__(self) -> None:
        self._data: dict[StatsKey, Moments] = {}
        self._applied: dict[str, int] = {}  # replica -> the last flush applied

    async def merge(self, batch: dict[StatsKey, Moments], flush: FlushId) -> bool:
        """Merge `batch` unless `flush` was merged already; True when it is merged now."""
        if self._applied.get(flush.replica, 0) >= flush.seq:
            return False
        for key, moments in batch.items():
            self._data.setdefault(key, Moments()).merge(moments)
        self._applied[flush.replica] = flush.seq
        return True

    async def read(self, query: StatsQuery) -> StatsPage:
        return query.page(self._data.keys(), self._data.get)

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class StatsQuery:
    """Which buckets a read wants (empty filters match everything) and which page of them: the first
    `limit` keys after `after`, in key order."""

    dataset: str = ""
    model: str = ""
    version: int = 0
    after: StatsKey | None = None
    limit: int = 1000

    def matches(self, key: StatsKey) -> bool:
        return ((not self.dataset or key[0] == self.dataset) and (not self.model or key[1] == self.model)
                and (not self.version or key[2] == self.version))

    def page_keys(self, keys: Iterable[StatsKey]) -> tuple[list[StatsKey], bool]:
        """(the page's keys, whether more follow)."""
        wanted = sorted(k for k in keys if self.matches(k) and (self.after is None or k > self.after))
        return wanted[:self.limit], len(wanted) > self.limit

    def page(self, keys: Iterable[StatsKey], value: Callable[[StatsKey], Moments | None]) -> StatsPage:
        chosen, more = self.page_keys(keys)
        return StatsPage({k: m for k in chosen if (m := value(k)) is not None}, more)


@dataclass
class StatsPage:
    buckets: dict[StatsKey, Moments]  # in key order
    more: bool  # keys follow the last one of this page

    @property
    def last(self) -> StatsKey | None:
        return next(reversed(self.buckets), None)


# KEYS[1]: the hash, KEYS[2]: the flushing replica's ledger; ARGV: count, mean, m2, min, max, ttl, T,
# histogram low, histogram high, scores already left out of the histogram, the flush's sequence number, then
# HIST_BINS histogram counts. Nothing is merged when the ledger has the flush already (-1). Floats are written
# with %.17g: Lua's default tostring keeps only 14 digits. The histogram range is compared as the strings
# written (exact); a hash without one predates it and has the legacy range.
MERGE_SCRIPT = """
if tonumber(redis.call('HGET', KEYS[2], 'seq') or '0') >= tonumber(ARGV[11]) then return -1 end
local nb = tonumber(ARGV[1])
if nb == 0 then return 0 end
local mb, m2b, minb, maxb, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6])
local cur = redis.call('HMGET', KEYS[1], 'count', 'mean', 'm2', 'min', 'max', 'lo', 'hi')
local na = tonumber(cur[1]) or 0
local n, mean, m2, mn, mx = nb, mb, m2b, minb, maxb
if na > 0 then
  local ma, m2a = tonumber(cur[2]), tonumber(cur[3])
  n = na + nb
  local delta = mb - ma
  mean = ma + delta * nb / n
  m2 = m2a + m2b + delta * delta * na * nb / n
  mn = math.min(tonumber(cur[4]), minb)
  mx = math.max(tonumber(cur[5]), maxb)
end
redis.call('HSET', KEYS[1], 'count', string.format('%d', n), 'mean', string.format('%.17g', mean),
  'm2', string.format('%.17g', m2), 'min', string.format('%.17g', mn), 'max', string.format('%.17g', mx))
if tonumber(ARGV[7]) > 0 then redis.call('HSET', KEYS[1], 'T', ARGV[7]) end
local lo, hi = ARGV[8], ARGV[9]
if na == 0 then
  redis.call('HSET', KEYS[1], 'lo', lo, 'hi', hi)
else
  lo, hi = cur[6] or 'LEGACY_LOW', cur[7] or 'LEGACY_HIGH'
end
local skipped = tonumber(ARGV[10])
if lo == ARGV[8] and hi == ARGV[9] then
  for i = 12, #ARGV do
    local c = tonumber(ARGV[i])
    if c > 0 then redis.call('HINCRBY', KEYS[1], 'h' .. (i - 12), c) end
  end
else
  for i = 12, #ARGV do skipped = skipped + tonumber(ARGV[i]) end
end
if skipped > 0 then redis.call('HINCRBY', KEYS[1], 'skipped', skipped) end
redis.call('EXPIRE', KEYS[1], ttl)
return n
""".replace("LEGACY_LOW", repr(LEGACY_HIST_RANGE[0])).replace("LEGACY_HIGH", repr(LEGACY_HIST_RANGE[1]))

# The last command of a flush's transaction. KEYS[1]: the replica's ledger; ARGV: the flush's sequence number,
# its score count, ttl. Returns 1 when the flush is recorded now, 0 when the ledger had it already (the merges
# before it in the transaction were skipped).
LEDGER_SCRIPT = """
if tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'scores', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


def ledger_key(replica: str) -> str:
    return f"{LEDGER_PREFIX}:{replica}"


def new_replica_id() -> str:
    """An id for this process's flushes: host name (a pod's name), process id and 8 random hex digits, so
    that a restarted or forked process never reuses one."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class RedisStatsStore:
    """Statistics shared by every replica through Redis; short timeouts so a dead Redis fails fast."""

    def __init__(self, url: str, ttl_s: int, timeout_s: float = 1.0):
        import redis.asyncio as aioredis

        self._client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._client.register_script(MERGE_SCRIPT)
        self._ledger = self._client.register_script(LEDGER_SCRIPT)
        self._ttl = ttl_s

    async def merge(self, batch: dict[StatsKey, Moments], flush: FlushId) -> bool:
        """Merge `batch` unless the replica's ledger has `flush` already, in one MULTI/EXEC transaction: every
        key's merge, then the ledger's record. True when the flush is merged now."""
        ledger = ledger_key(flush.replica)
        async with self._client.pipeline(transaction=True) as pipe:
            for key, m in batch.items():
                args = [m.count, repr(m.mean), repr(m.m2), repr(m.min), repr(m.max), self._ttl, m.num_timesteps,
                        repr(m.hist_low), repr(m.hist_high), m.hist_skipped, flush.seq, *m.hist.tolist()]
                await self._script(keys=[redis_key(key), ledger], args=args, client=pipe)
            await self._ledger(keys=[ledger], args=[flush.seq, scores_in(batch), self._ttl], client=pipe)
            results = await pipe.execute()
        return bool(results[-1])

    async def read(self, query: StatsQuery) -> StatsPage:
        """Scan the matching keys, then fetch only the page's hashes."""
        # The filters are checked ids (no glob characters or ':'); the scan pattern narrows, `matches` decides.
        pattern = f"{KEY_PREFIX}:{query.dataset or '*'}:{query.model or '*'}:{query.version or '*'}:*"
        keys: dict[StatsKey, bytes | str] = {}
        async for raw_key in self._client.scan_iter(match=pattern, count=500):
            key = parse_redis_key(raw_key)
            if key is not None:
                keys[key] = raw_key
        chosen, more = query.page_keys(keys)
        out: dict[StatsKey, Moments] = {}
        if not chosen:
            return StatsPage(out, more)
        async with self._client.pipeline(transaction=False) as pipe:
            for key in chosen:
                pipe.hgetall(keys[key])
            values = await pipe.execute()
        for key, fields in zip(chosen, values, strict=True):
            if not fields:
                continue  # expired between the scan and the read
            b = StoredBucket.from_hash(fields)
            out[key] = Moments(b.count, b.mean, b.m2, b.min, b.max, np.array(b.hist, np.int64), b.hist_low,
                               b.hist_high, b.num_timesteps, b.hist_skipped)
        return StatsPage(out, more)

    async def close(self) -> None:
        await self._client.aclose()


class StatsRecorder:
    """Local accumulation on the request path plus the background flush into the store, exactly once per
    flush (see the module doc): `replica_id` names this process in the store's ledger."""

    def __init__(self, store: MemoryStatsStore | RedisStatsStore, metrics: ServerMetrics, flush_s: float,
                 flush_timeout_s: float = 2.0, max_datasets: int = 1024, replica_id: str | None = None):
        self.store = store
        self.replica_id = replica_id or new_replica_id()
        self._seq = 0
        self._in_doubt: tuple[FlushId, dict[StatsKey, Moments]] | None = None  # failed: maybe applied
        self.max_datasets = max_datasets
        self._datasets: set[str] = set()
        self._metrics = metrics
        self._flush_s = flush_s
        self._flush_timeout_s = flush_timeout_s
        self._pending: dict[StatsKey, Moments] = {}
        self._raw: list[tuple[str, str, int, int, tuple[float, float], np.ndarray, np.ndarray]] = []
        self._raw_count = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._failing = False

    def admit(self, dataset: str) -> None:
        """Agree to keep statistics for `dataset` (a checked id), or refuse it with RESOURCE_EXHAUSTED when
        `max_datasets` others are kept already."""
        if dataset in self._datasets:
            return
        if len(self._datasets) >= self.max_datasets:
            self._metrics.datasets_rejected.inc()
            raise TooManyDatasetsError(f"dataset: this server keeps statistics for at most {self.max_datasets} "
                                       f"datasets and {dataset!r} would be one more (--max-datasets)")
        self._datasets.add(dataset)

    def record(self, dataset: str, model: str, version: int, num_timesteps: int, t: np.ndarray,
               scores: np.ndarray, hist_range: tuple[float, float] = LEGACY_HIST_RANGE) -> None:
        """Keep the raw scores; they are summarised per bucket in bulk at the next flush (one np.unique per
        group and flush instead of per request), or sooner when too many are waiting. `hist_range`: the
        model version's histogram range (`probe_range`)."""
        if scores.size == 0:
            return
        self._raw.append((dataset, model, version, num_timesteps, hist_range, t, scores))
        self._raw_count += scores.size
        if self._raw_count >= RAW_LIMIT:
            self._compact()

    def _compact(self) -> None:
        raw, self._raw, self._raw_count = self._raw, [], 0
        groups: dict[tuple[str, str, int, int, tuple[float, float]], list[tuple[np.ndarray, np.ndarray]]] = {}
        for dataset, model, version, num_timesteps, hist_range, t, scores in raw:
            groups.setdefault((dataset, model, version, num_timesteps, hist_range), []).append((t, scores))
        for (dataset, model, version, num_timesteps, hist_range), parts in groups.items():
            t = np.concatenate([p[0] for p in parts])
            scores = np.concatenate([p[1] for p in parts])
            buckets = timestep_bucket(t, num_timesteps)
            for bucket in np.unique(buckets):
                part = scores[buckets == bucket]
                self._pending.setdefault((dataset, model, version, int(bucket)), Moments()).merge(
                    Moments.of(part, hist_range, num_timesteps))

    async def flush(self) -> bool:
        """Merge what is pending into the store. A flush that fails is kept as it is and retried first, under
        its own id, by the next call (it may have been applied: the store then skips it); what is recorded
        meanwhile waits for a flush of its own. True when nothing is left to flush."""
        async with self._lock:
            self._compact()
            while self._in_doubt is not None or self._pending:
                if self._in_doubt is None:
                    self._seq += 1
                    self._in_doubt, self._pending = (FlushId(self.replica_id, self._seq), self._pending), {}
                flush, batch = self._in_doubt
                try:
                    merged = await asyncio.wait_for(self.store.merge(batch, flush), self._flush_timeout_s)
                except Exception as exc:  # any Redis or network failure: keep the flush, count, go on
                    self._metrics.redis_flush_errors.inc()
                    if not self._failing:
                        log.warning("statistics flush failed (will retry): %s", str(exc).splitlines()[0]
                                    if str(exc) else type(exc).__name__)
                    self._failing = True
                    return False
                self._in_doubt = None
                if not merged:
                    self._metrics.stats_flush_duplicates.inc()
                if self._failing:
                    log.warning("statistics flush recovered")
                self._failing = False
            return True

    async def read(self, query: StatsQuery) -> StatsPage:
        await self.flush()
        return await self.store.read(query)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for attempt in range(FINAL_FLUSH_TRIES):  # what is not flushed now is lost with the process
            if await self.flush():
                break
            await asyncio.sleep(0.1 * (attempt + 1))
        await self.store.close()
