"""How the server's score statistics are laid out: timestep buckets and the Redis keys and hash fields that
hold them. Shared by the server, which writes them, and `nrctl stats --redis-url`, which reads them without
a server."""

from __future__ import annotations

from dataclasses import dataclass

TIMESTEP_BUCKETS = 10
HIST_BINS = 40
LEGACY_HIST_RANGE = (-10.0, 10.0)  # the range of statistics written before it was stored with them
KEY_PREFIX = "nr:stats"

StatsKey = tuple[str, str, int, int]  # dataset, model, version, timestep bucket


def bucket_range(bucket: int, num_timesteps: int) -> tuple[int, int]:
    """(t_first, t_last) of the timesteps t with floor(t * TIMESTEP_BUCKETS / T) == bucket (the last bucket
    also takes anything above); (0, 0) when T is unknown."""
    if num_timesteps <= 0:
        return 0, 0
    first = -(-bucket * num_timesteps // TIMESTEP_BUCKETS)
    if bucket >= TIMESTEP_BUCKETS - 1:
        return first, num_timesteps - 1
    last = -(-(bucket + 1) * num_timesteps // TIMESTEP_BUCKETS) - 1
    return first, last


def redis_key(key: StatsKey) -> str:
    dataset, model, version, bucket = key
    return f"{KEY_PREFIX}:{dataset}:{model}:{version}:{bucket}"


def parse_redis_key(raw: bytes | str) -> StatsKey | None:
    """The key of a Redis hash name, None for a name that is not one of ours."""
    parts = (raw.decode() if isinstance(raw, bytes) else raw).split(":")
    if len(parts) != 6 or not parts[4].isdigit() or not parts[5].isdigit():
        return None
    return parts[2], parts[3], int(parts[4]), int(parts[5])


@dataclass
class StoredBucket:
    """One bucket's hash as Redis holds it: fields count, mean, m2, min, max, T (timesteps), lo and hi (the
    histogram range), skipped (scores left out of the histogram) and h0..h{HIST_BINS-1}."""

    count: int
    mean: float
    m2: float
    min: float
    max: float
    hist: list[int]
    hist_low: float
    hist_high: float
    num_timesteps: int
    hist_skipped: int

    @classmethod
    def from_hash(cls, fields: dict) -> StoredBucket:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        low, high = LEGACY_HIST_RANGE
        return cls(int(f["count"]), float(f["mean"]), float(f["m2"]), float(f["min"]), float(f["max"]),
                   [int(f.get(f"h{i}", 0)) for i in range(HIST_BINS)], float(f.get("lo", low)),
                   float(f.get("hi", high)), int(f.get("T", 0)), int(f.get("skipped", 0)))
