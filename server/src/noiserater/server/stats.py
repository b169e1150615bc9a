"""Per-(dataset, model, version, timestep bucket) score statistics.

Scores are accumulated locally on the request path (cheap numpy work, no I/O) and merged into a store
by a background flush: in process memory by default, or in Redis, where a Lua script applies Chan's
parallel Welford merge atomically so that any number of replicas can flush into the same keys. With
Redis unreachable the flush fails fast (short socket timeouts), the pending statistics stay local and
are retried on the next flush, and the failure is counted; requests never wait on Redis.

Dataset ids come from clients, so the recorder keeps statistics for at most `max_datasets` of them (the
ones this process has recorded since it started); a request for a further one is refused with
RESOURCE_EXHAUSTED before it is scored, and counted in nr_datasets_rejected. Reads are paged, in key order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np

from noiserater.core.text import clip
from noiserater.server.metrics import ServerMetrics
from noiserater.server.rpc import RpcError

log = logging.getLogger("rater-server.stats")

TIMESTEP_BUCKETS = 10
HIST_LOW, HIST_HIGH, HIST_BINS = -10.0, 10.0, 40
KEY_PREFIX = "nr:stats"
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


def histogram(values: np.ndarray) -> np.ndarray:
    """Fixed bins over [HIST_LOW, HIST_HIGH); values outside land in the end bins."""
    idx = np.floor((values.astype(np.float64) - HIST_LOW) * (HIST_BINS / (HIST_HIGH - HIST_LOW)))
    return np.bincount(np.clip(idx, 0, HIST_BINS - 1).astype(np.int64), minlength=HIST_BINS)


@dataclass
class Moments:
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, np.int64))

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        v = values.astype(np.float64)
        mean = float(v.mean())
        return cls(int(v.size), mean, float(((v - mean) ** 2).sum()), float(v.min()), float(v.max()),
                   histogram(v))

    def merge(self, other: Moments) -> None:
        """Chan et al.'s parallel combination of two Welford summaries."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            self.min, self.max, self.hist = other.min, other.max, other.hist.copy()
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / n
        self.m2 += other.m2 + delta * delta * self.count * other.count / n
        self.count = n
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.hist = self.hist + other.hist


StatsKey = tuple[str, str, int, int]  # dataset, model, version, timestep bucket


def redis_key(key: StatsKey) -> str:
    dataset, model, version, bucket = key
    return f"{KEY_PREFIX}:{dataset}:{model}:{version}:{bucket}"


def parse_redis_key(raw: bytes | str) -> StatsKey | None:
    """The key of a Redis hash name, None for a name that is not one of ours."""
    parts = (raw.decode() if isinstance(raw, bytes) else raw).split(":")
    if len(parts) != 6 or not parts[4].isdigit() or not parts[5].isdigit():
        return None
    return parts[2], parts[3], int(parts[4]), int(parts[5])


class MemoryStatsStore:
    """The embedded default: statistics in this process only."""

    def __init__(self) -> None:
        self._data: dict[StatsKey, Moments] = {}

    async def merge(self, batch: dict[StatsKey, Moments]) -> None:
        for key, moments in batch.items():
            self._data.setdefault(key, Moments()).merge(moments)

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


# KEYS[1]: the hash; ARGV: count, mean, m2, min, max, ttl, then HIST_BINS histogram counts.
# Floats are written with %.17g: Lua's default tostring keeps only 14 digits.
MERGE_SCRIPT = """
local nb = tonumber(ARGV[1])
if nb == 0 then return 0 end
local mb, m2b, minb, maxb, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6])
local cur = redis.call('HMGET', KEYS[1], 'count', 'mean', 'm2', 'min', 'max')
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
for i = 7, #ARGV do
  local c = tonumber(ARGV[i])
  if c > 0 then redis.call('HINCRBY', KEYS[1], 'h' .. (i - 7), c) end
end
redis.call('EXPIRE', KEYS[1], ttl)
return n
"""


class RedisStatsStore:
    """Statistics shared by every replica through Redis; short timeouts so a dead Redis fails fast."""

    def __init__(self, url: str, ttl_s: int, timeout_s: float = 1.0):
        import redis.asyncio as aioredis

        self._client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._client.register_script(MERGE_SCRIPT)
        self._ttl = ttl_s

    async def merge(self, batch: dict[StatsKey, Moments]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            for key, m in batch.items():
                args = [m.count, repr(m.mean), repr(m.m2), repr(m.min), repr(m.max), self._ttl, *m.hist.tolist()]
                await self._script(keys=[redis_key(key)], args=args, client=pipe)
            await pipe.execute()

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
            f = {k.decode(): v.decode() for k, v in fields.items()}
            hist = np.array([int(f.get(f"h{i}", 0)) for i in range(HIST_BINS)], np.int64)
            out[key] = Moments(int(f["count"]), float(f["mean"]), float(f["m2"]), float(f["min"]), float(f["max"]),
                               hist)
        return StatsPage(out, more)

    async def close(self) -> None:
        await self._client.aclose()


class StatsRecorder:
    """Local accumulation on the request path plus the background flush into the store."""

    def __init__(self, store: MemoryStatsStore | RedisStatsStore, metrics: ServerMetrics, flush_s: float,
                 flush_timeout_s: float = 2.0, max_datasets: int = 1024):
        self.store = store
        self.max_datasets = max_datasets
        self._datasets: set[str] = set()
        self._metrics = metrics
        self._flush_s = flush_s
        self._flush_timeout_s = flush_timeout_s
        self._pending: dict[StatsKey, Moments] = {}
        self._raw: list[tuple[str, str, int, int, np.ndarray, np.ndarray]] = []
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
               scores: np.ndarray) -> None:
        """Keep the raw scores; they are summarised per bucket in bulk at the next flush (one np.unique per
        group and flush instead of per request), or sooner when too many are waiting."""
        if scores.size == 0:
            return
        self._raw.append((dataset, model, version, num_timesteps, t, scores))
        self._raw_count += scores.size
        if self._raw_count >= RAW_LIMIT:
            self._compact()

    def _compact(self) -> None:
        raw, self._raw, self._raw_count = self._raw, [], 0
        groups: dict[tuple[str, str, int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        for dataset, model, version, num_timesteps, t, scores in raw:
            groups.setdefault((dataset, model, version, num_timesteps), []).append((t, scores))
        for (dataset, model, version, num_timesteps), parts in groups.items():
            t = np.concatenate([p[0] for p in parts])
            scores = np.concatenate([p[1] for p in parts])
            buckets = timestep_bucket(t, num_timesteps)
            for bucket in np.unique(buckets):
                part = scores[buckets == bucket]
                self._pending.setdefault((dataset, model, version, int(bucket)), Moments()).merge(Moments.of(part))

    async def flush(self) -> bool:
        """Merge what is pending into the store; on failure keep it for the next try. True on success."""
        async with self._lock:
            self._compact()
            if not self._pending:
                return True
            batch, self._pending = self._pending, {}
            try:
                await asyncio.wait_for(self.store.merge(batch), self._flush_timeout_s)
            except Exception as exc:  # any Redis or network failure: keep the data, count, go on
                for key, moments in batch.items():
                    moments.merge(self._pending.get(key, Moments()))
                    self._pending[key] = moments
                self._metrics.redis_flush_errors.inc()
                if not self._failing:
                    log.warning("statistics flush failed (will retry): %s", str(exc).splitlines()[0] if str(exc)
                                else type(exc).__name__)
                self._failing = True
                return False
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
        await self.flush()
        await self.store.close()
