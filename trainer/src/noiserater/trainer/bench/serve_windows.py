"""The measurement method of the serving benchmark, in the manner of Triton's perf_analyzer: a warm-up, then
windows of `window_s` until the last three agree within `stability` (or `max_windows` is reached); rates and
latency percentiles come from the stable windows. The load (gRPC clients or in-process callers) appends
(finish time, latency) to a list; this module only reads it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Windows:
    warmup_s: float = 1.0
    window_s: float = 2.0
    max_windows: int = 5
    stability: float = 0.15  # max spread of the last 3 windows, relative to their mean

    def agree(self, last: list[float]) -> bool:
        return len(last) == 3 and (max(last) - min(last)) <= self.stability * float(np.mean(last))


@dataclass
class Level:
    concurrency: int
    throughput: float = 0.0  # candidates scored per second
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: int = 0
    error_sample: str = ""
    windows: list[float] = field(default_factory=list)
    stable: bool = False
    latencies: list[list[float]] = field(default_factory=list, repr=False)  # per window (s), not reported

    def report(self) -> dict:
        out = asdict(self)
        del out["latencies"]
        return out


async def measure_windows(done: list[tuple[float, float]], level: Level, windows: Windows) -> None:
    """Fill `level`'s windows from `done` (finish time, latency), which the load fills in meanwhile."""
    await asyncio.sleep(windows.warmup_s)
    for _ in range(windows.max_windows):
        start_index, started = len(done), time.perf_counter()
        await asyncio.sleep(windows.window_s)
        end_index, ended = len(done), time.perf_counter()
        level.windows.append(len(done[start_index:end_index]) / (ended - started))
        level.latencies.append([lat for _, lat in done[start_index:end_index]])
        if windows.agree(level.windows[-3:]):
            break
    level.requests = len(done)


def summarise(level: Level, candidates: int, windows: Windows) -> Level:
    """Rates and latency percentiles over the last three windows; `candidates` per request or run."""
    latencies = [lat for window in level.latencies[-3:] for lat in window]
    used = level.windows[-3:]
    level.windows = [round(w, 1) for w in level.windows]
    level.requests_per_s = float(np.mean(used)) if used else 0.0
    level.throughput = level.requests_per_s * candidates
    level.stable = windows.agree(used)
    if latencies:
        p50, p90, p99 = np.percentile(np.asarray(latencies) * 1000.0, [50, 90, 99])
        level.p50_ms, level.p90_ms, level.p99_ms = float(p50), float(p90), float(p99)
    return level
