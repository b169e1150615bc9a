"""The efficacy benchmark (`nrctl bench train`), running half: every method x seed through `train_stage2` with
the same budget, paired by seed (per seed every method shares the model init, minibatches and timesteps).
`bench.train_report` turns the runs into the report files.

    runs = run_bench(data, ["uniform", "rater-argmax"], range(3), 2000, rater_onnx="digits.onnx")
    write_report(runs, "out", command="...")

A method is any name in the noise-source registry (`noiserater.client.sources`; the rater rules are
registered by `noiserater.trainer.stage2.sources`, plugins by `load_plugin`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from noiserater.client.sources import names
from noiserater.trainer.stage2.sources import Stage2Error, load_plugin, needs_rater
from noiserater.trainer.stage2.training import EvalContext, Stage2Config, Stage2Result, train_stage2
from noiserater.trainer.substrate.data import DataSplits, warn_if_tiny

BASELINE = "uniform"  # every comparison is paired against it, so it always runs


@dataclass
class BenchRuns:
    """What a benchmark ran and measured: `runs[method]` holds one result per seed, in seed order."""

    data: DataSplits
    methods: list[str]
    seeds: list[int]
    steps: int
    config: Stage2Config
    rater: str | None
    context: EvalContext
    runs: dict[str, list[Stage2Result]]
    wall_seconds: float


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """Registered source names from "a,b,c" (or a list); unknown or repeated names are errors."""
    methods = [m.strip() for m in text.split(",")] if isinstance(text, str) else list(text)
    methods = [m for m in methods if m]
    known = names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise Stage2Error(f"methods: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    if not methods:
        raise Stage2Error("methods: none given")
    if len(set(methods)) != len(methods):
        raise Stage2Error("methods: listed twice")
    return methods


def require_rater(methods: Sequence[str], rater: Any) -> None:
    need = [m for m in methods if needs_rater(m)]
    if need and rater is None:
        raise Stage2Error(f"{', '.join(need)}: selecting with a rater needs --rater RUN_DIR|MODEL.onnx")


def rater_schedule(rater_onnx: str | Path) -> tuple[int, str]:
    """(num_timesteps, schedule kind or "") the exported rater was trained with, from its ONNX metadata."""
    from noiserater.core.scoring import RaterSession

    info = RaterSession(Path(rater_onnx), device="cpu").info
    return info.num_timesteps, info.schedule


def check_rater_matches(rater_onnx: str | Path, data: DataSplits, cfg: Stage2Config) -> None:
    from noiserater.core.scoring import RaterSession

    info = RaterSession(Path(rater_onnx), device="cpu").info
    if tuple(info.data_shape) != tuple(data.data_shape):
        raise Stage2Error(f"rater: data shape {list(info.data_shape)} does not match the dataset's "
                          f"{list(data.data_shape)}")
    if info.num_timesteps != cfg.num_timesteps:
        raise Stage2Error(f"rater: trained for T={info.num_timesteps} timesteps, the run uses T={cfg.num_timesteps}")
    if info.objective != cfg.objective:
        raise Stage2Error(f"rater: trained for the {info.objective} objective, the run uses {cfg.objective} "
                          f"(--objective {info.objective})")


def logged_runs(path: str | Path, cfg: Stage2Config) -> dict[tuple[str, int], Stage2Result]:
    """The runs logged in `path` (a bench's runs.jsonl, one run per line) that trained with exactly `cfg`'s
    settings, by (method, seed); `run_bench(finished=...)` keeps them instead of training them again. A logged
    run with other settings is an error (resuming must not mix two setups); a setting added after a run was
    logged is taken to have had its default value."""
    path = Path(path)
    if not path.is_file():
        return {}
    defaults, wanted = asdict(Stage2Config()), json.loads(json.dumps(asdict(cfg)))
    found: dict[tuple[str, int], Stage2Result] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            settings = {**defaults, **record["config"]}
            result = Stage2Result(**record)
        except (ValueError, KeyError, TypeError) as exc:
            raise Stage2Error(f"{path}:{number}: not a logged run ({type(exc).__name__})") from None
        differ = sorted(k for k in wanted if settings.get(k) != wanted[k])
        if differ:
            raise Stage2Error(f"{path}:{number}: {record['method']} seed {record['seed']} ran with other settings "
                              f"({', '.join(differ)}); resume with the same options or use another --out")
        found[result.method, result.seed] = result
    return found


_WORKER: dict[str, Any] = {}


def _init_worker(data: DataSplits, cfg: dict[str, Any], threads: int, plugins: Sequence[str]) -> None:
    torch.set_num_threads(threads)
    for plugin in plugins:
        load_plugin(plugin)
    config = Stage2Config(**cfg)
    _WORKER.update(data=data, cfg=config, context=EvalContext.build(data, config))


def _worker_run(method: str, steps: int, seed: int, rater: str | None) -> Stage2Result:
    return train_stage2(_WORKER["data"], method, steps, seed, rater=rater, config=_WORKER["cfg"],
                        context=_WORKER["context"])


def _run_in_workers(data: DataSplits, cfg: Stage2Config, jobs_list: list[tuple[str, int]], rater: str | None,
                    jobs: int, plugins: Sequence[str], progress: Callable[[int], None] | None,
                    on_run: Callable[[Stage2Result], None] | None) -> dict[tuple[str, int], Stage2Result]:
    """Independent runs in worker processes; results are the same as in one process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done: dict[tuple[str, int], Stage2Result] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(data, asdict(cfg), torch.get_num_threads(), list(plugins))) as pool:
        futures = {pool.submit(_worker_run, method, cfg.steps, seed, rater): (method, seed)
                   for method, seed in jobs_list}
        for future in as_completed(futures):
            result = future.result()
            done[futures[future]] = result
            if progress is not None:
                progress(cfg.steps)
            if on_run is not None:
                on_run(result)
    return done


def run_bench(data: DataSplits, methods: Sequence[str], seeds: Sequence[int], steps: int, *,
              rater_onnx: str | Path | None = None, config: Stage2Config | None = None,
              progress: Callable[[int], None] | None = None, on_run: Callable[[Stage2Result], None] | None = None,
              jobs: int = 1, plugins: Sequence[str] = (),
              finished: dict[tuple[str, int], Stage2Result] | None = None) -> BenchRuns:
    """Train every method (uniform added first if missing) for every seed with the same budget.
    `jobs` > 1 runs that many trainings at once in worker processes (each with this process's torch threads,
    each importing `plugins` first so plugin sources exist there too). `finished` (from `logged_runs`) holds
    runs already done with this setup: they are kept, not trained again."""
    methods = parse_methods(list(methods))
    if BASELINE not in methods:
        methods = [BASELINE, *methods]
    require_rater(methods, rater_onnx)
    cfg = Stage2Config(**{**asdict(config or Stage2Config()), "steps": int(steps)})
    if rater_onnx is not None:
        check_rater_matches(rater_onnx, data, cfg)
    warn_if_tiny(data, cfg.batch_size)
    rater = str(rater_onnx) if rater_onnx is not None else None
    seeds = list(seeds)
    context = EvalContext.build(data, cfg)
    started = time.time()
    kept = {key: run for key, run in (finished or {}).items() if key[0] in methods and key[1] in seeds}
    jobs_list = [(method, seed) for seed in seeds for method in methods if (method, seed) not in kept]
    if progress is not None and kept:
        progress(cfg.steps * len(kept))
    if jobs > 1:
        done = {**kept, **_run_in_workers(data, cfg, jobs_list, rater, jobs, plugins, progress, on_run)}
    else:
        done = dict(kept)
        for method, seed in jobs_list:
            done[method, seed] = train_stage2(data, method, cfg.steps, seed, rater=rater, config=cfg,
                                              context=context, progress=progress)
            if on_run is not None:
                on_run(done[method, seed])
    runs = {m: [done[m, seed] for seed in seeds] for m in methods}
    return BenchRuns(data, methods, seeds, cfg.steps, cfg, rater, context, runs, time.time() - started)
