"""What a server could reach at best: in-process onnxruntime (`RaterSession`) on the same model file and the
same triples, no gRPC, measured with the same windows as the server."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from noiserater.trainer.bench.serve_windows import Level, Windows, measure_windows, summarise


def measure_ceiling(onnx: Path, device: str, threads: int, triples, candidates: int, windows: Windows,
                    select_args=None, callers: int = 1) -> Level:
    """In-process runs back to back: `callers` threads sharing one session (onnxruntime releases the GIL, so
    they run in parallel as a server's instances do); score(*triples) or, with select_args (x0, t,
    candidates), the whole selection. `candidates` are scored per run."""
    from noiserater.core.scoring import RaterSession
    from noiserater.core.selection import SelectionPlan

    session = RaterSession(onnx, device=device, intra_op_threads=threads)
    plan = SelectionPlan.for_candidates(select_args[2], 1, "top_k", 1.0) if select_args is not None else None
    done: list[tuple[float, float]] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            if select_args is not None:
                plan.select(session.score, session.info, *select_args)
            else:
                session.score(*triples)
            finished = time.perf_counter()
            done.append((finished, finished - started))

    level = Level(callers)
    workers = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
    for worker in workers:
        worker.start()
    try:
        asyncio.run(measure_windows(done, level, windows))
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    return summarise(level, candidates, windows)


def batching_gain_bound(big_runs: Level, small_runs: Level) -> float:
    """Per candidate, one big in-process run against many small ones: what batching could gain if a request
    cost nothing but its onnxruntime run."""
    return ratio(big_runs.throughput, small_runs.throughput)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")
