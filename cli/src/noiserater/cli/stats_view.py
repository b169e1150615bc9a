"""Score statistics as `nrctl stats` and quickstart show them: rows from GetStats or straight from Redis, a
table per timestep range, and a plot of the score distributions. Light imports only at module level:
redis and matplotlib are imported where they are used."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from noiserater.core.stats_layout import KEY_PREFIX, StoredBucket, bucket_range, parse_redis_key

TABLE_COLUMNS = ["dataset", "model", "version", "timesteps", "count", "mean", "std", "min", "max"]


def row(dataset: str, model: str, version: int, bucket: int, count: int, mean: float, m2: float, low: float,
        high: float, histogram: Iterable[int], hist_low: float, hist_high: float, num_timesteps: int,
        hist_skipped: int = 0) -> dict[str, Any]:
    """One bucket as a plain dict (the --json form): its timestep range, moments and histogram."""
    first, last = bucket_range(bucket, num_timesteps)
    variance = m2 / (count - 1) if count > 1 else 0.0
    return {"dataset": dataset, "model": model, "version": version, "timestep_bucket": bucket,
            "num_timesteps": num_timesteps, "t_first": first, "t_last": last, "count": count, "mean": mean,
            "std": variance ** 0.5, "min": low, "max": high, "histogram": list(histogram), "hist_low": hist_low,
            "hist_high": hist_high, "hist_skipped": hist_skipped}


def rows_from_response(buckets: Iterable[Any]) -> list[dict[str, Any]]:
    """Rows of GetStats buckets (StatsBucket messages)."""
    return [row(b.dataset, b.model, b.version, b.timestep_bucket, b.count, b.mean, b.m2, b.min, b.max, b.histogram,
                b.hist_low, b.hist_high, b.num_timesteps, b.hist_skipped) for b in buckets]


def rows_from_redis(url: str, dataset: str = "", model: str = "", version: int = 0,
                    timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Rows read straight from the Redis the servers flush into (no server needed), in key order."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        pattern = f"{KEY_PREFIX}:{dataset or '*'}:{model or '*'}:{version or '*'}:*"
        keys = {}
        for raw in client.scan_iter(match=pattern, count=500):
            key = parse_redis_key(raw)
            if key is not None and (not dataset or key[0] == dataset) and (not model or key[1] == model) \
                    and (not version or key[2] == version):
                keys[key] = raw
        chosen = sorted(keys)
        pipe = client.pipeline(transaction=False)
        for key in chosen:
            pipe.hgetall(keys[key])
        values = pipe.execute() if chosen else []
    finally:
        client.close()
    out = []
    for key, fields in zip(chosen, values, strict=True):
        if fields:  # else expired between the scan and the read
            b = StoredBucket.from_hash(fields)
            out.append(row(*key, b.count, b.mean, b.m2, b.min, b.max, b.hist, b.hist_low, b.hist_high,
                           b.num_timesteps, b.hist_skipped))
    return out


def timesteps(r: dict[str, Any]) -> str:
    """A bucket's timestep range, e.g. `0-99`; `bucket 3` when the model's T was not recorded."""
    if r["num_timesteps"] <= 0:
        return f"bucket {r['timestep_bucket']}"
    return f"{r['t_first']}-{r['t_last']}"


def table_rows(rows: Iterable[dict[str, Any]]) -> list[list[Any]]:
    """The table's cells; scores to 4 significant digits, so nine columns fit an 80-column terminal."""
    return [[r["dataset"], r["model"], r["version"], timesteps(r), r["count"],
             *(f"{r[k]:.4g}" for k in ("mean", "std", "min", "max"))] for r in rows]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per (dataset, model, version): each timestep range's score histogram, as a share of its
    scores, over the version's histogram range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["version"]), []).append(r)
    fig, axes = plt.subplots(len(groups) or 1, 1, figsize=(8, 3.2 * max(1, len(groups))), squeeze=False)
    for ax, ((dataset, model, version), group) in zip(axes[:, 0], groups.items(), strict=False):
        cmap = plt.get_cmap("viridis")
        for i, r in enumerate(group):
            hist = np.asarray(r["histogram"], np.float64)
            if hist.sum() == 0:
                continue
            edges = np.linspace(r["hist_low"], r["hist_high"], hist.size + 1)
            ax.stairs(hist / hist.sum(), edges, color=cmap(i / max(1, len(group) - 1)),
                      label=f"t {timesteps(r)} (n={r['count']})")
        ax.set_title(f"{dataset}: {model} version {version}")
        ax.set_xlabel("score")
        ax.set_ylabel("share of scores")
        ax.legend(fontsize="x-small", ncol=2)
    if not groups:
        axes[0, 0].set_title("no statistics")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
