"""rater-server against Triton Inference Server on the same machine, the same model and the same thread budget
(`nrctl bench serve-vs-triton`).

The bench starts both servers itself from one ONNX file:
- rater-server with `--device cpu --intra-op-threads T --workers W --instances I --max-delay-ms D
  --max-batch M` (and any extra flags): W processes sharing the port, I batches at once over all of them;
- Triton through PyTriton (triton_env, triton_server.py): I instances per model, each its own onnxruntime
  session (CPU provider) with T intra-op threads, Triton's dynamic batcher with D of queue delay, M triples per
  run. Its `<model>_select` model runs rater-server's selection (SelectionPlan, top-1 of K) on the same
  RaterSession; its `<model>` model scores triples like rater-server's KServe ModelInfer.
Optionally a third side, rater-server with other flags (`baseline_args`, e.g. before a server change), to
measure a change against its baseline in the same run.

Two load generators, each at every concurrency level C and request size B (samples, K candidates each):
- "load": the serving benchmark's own (serve_load), C closed-loop clients, each on its own connection as
  separate client processes would be (rater-server's workers share the port by connection); against
  rater-server the SelectNoise
  request of B x K (v1 API, unary or stream), against Triton the same arrays as a KServe ModelInfer (or
  ModelStreamInfer) of `<model>_select`: the same selection, each server's own protocol;
- "perf_analyzer": Triton's own load generator (C++), KServe ModelInfer of the B x K triples to score against
  both servers' scoring model (on Triton's batch axis with -b B*K, the whole request on rater-server's N axis).
The measurements go in rounds: every round measures every (tool, B, C) cell on every side back to back, the
order of the sides rotating from cell to cell, so load from other processes hits both sides of a ratio alike.
A cell's ratio is the median of its per-round ratios. Besides throughput and latency, each measurement reads
the requests merged per onnxruntime run from the servers' ModelStatistics (with rater-server `--workers` > 1,
one worker's view) and, for the load generator, the CPU time per request of the server's process tree.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from noiserater.trainer.bench import perf_analyzer
from noiserater.trainer.bench.cpu import CpuMeter
from noiserater.trainer.bench.local_server import start_onnx_server
from noiserater.trainer.bench.serve_load import make_kserve_request, make_request, measure_server
from noiserater.trainer.bench.serve_windows import Windows
from noiserater.trainer.bench.triton_env import ensure_env, start_triton

RATER, TRITON, BASELINE = "rater_server", "triton", "rater_server_baseline"
TOOLS = ("load", "perf_analyzer")
# perf_analyzer's own criterion (the last 3 windows within this many percent of each other) is relaxed: on a
# machine shared with other work it often fails at 15-50 %, and the rounds, paired and summarised by their
# median, are what stand against that noise here.
PERF_ANALYZER_STABILITY = 100


@dataclass(frozen=True)
class CompareSettings:
    onnx: Path
    model: str = "digits"
    levels: tuple[int, ...] = (1, 4, 16, 64)
    sizes: tuple[int, ...] = (8, 512)  # samples B per request
    k: int = 8  # candidates per sample
    rounds: int = 3
    threads: int = 1  # onnxruntime intra-op threads per instance, both servers
    instances: int = 2  # batches run at once, both servers (rater-server: over all its workers)
    workers: int = 2  # rater-server processes (--workers)
    max_delay_ms: float = 0.0
    max_batch: int = 8192  # triples per onnxruntime run
    transport: str = "unary"  # load generator: "unary" (SelectNoise / ModelInfer) or "stream"
    tools: tuple[str, ...] = TOOLS
    warmup_s: float = 0.5
    window_s: float = 2.0
    server_args: tuple[str, ...] = ()  # extra rater-server flags
    baseline_args: tuple[str, ...] | None = None  # flags of a third side, rater-server as it was
    triton_env: Path | None = None  # the PyTriton environment (default: triton_env.default_env_dir())

    def rater_flags(self, extra: tuple[str, ...]) -> list[str]:
        """rater-server's flags; `extra` comes last, so it overrides them (argparse keeps the last value)."""
        return ["--device", "cpu", "--intra-op-threads", str(self.threads), "--workers", str(self.workers),
                "--instances", str(self.instances), "--max-delay-ms", f"{self.max_delay_ms:g}",
                "--max-batch", str(self.max_batch), *extra]


@dataclass
class Side:
    name: str
    target: str
    pid: int
    command: list[str]
    select_model: str  # what the load generator asks for
    score_model: str  # what perf_analyzer asks for
    kserve_select: bool  # the load generator speaks KServe to it (Triton), else the v1 API
    batch_axis: bool  # its scoring model has Triton's batch axis (perf_analyzer -b)


@dataclass
class Comparison:
    settings: CompareSettings
    sides: list[Side]
    cells: dict[tuple[str, int, int], dict[str, list[dict]]] = field(default_factory=dict)  # per round
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    round_loads: list[tuple[float, float, float]] = field(default_factory=list)


class StatsReader:
    """Cumulative (requests, runs) of a model from a server's KServe ModelStatistics, over one connection kept
    open (so that with several rater-server workers it is always the same worker's)."""

    def __init__(self, target: str):
        import grpc

        from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc

        self.channel = grpc.insecure_channel(target)
        self.stub = kserve_grpc.GRPCInferenceServiceStub(self.channel)

    def counts(self, model: str) -> tuple[int, int]:
        from noiserater.core.inference import grpc_service_pb2 as kserve_pb

        stats = self.stub.ModelStatistics(kserve_pb.ModelStatisticsRequest(name=model), timeout=10).model_stats
        return (sum(s.inference_stats.success.count for s in stats), sum(s.execution_count for s in stats))

    def close(self) -> None:
        self.channel.close()


def run_comparison(st: CompareSettings, say: Callable[[str], None] = lambda text: None) -> Comparison:
    from noiserater.core.scoring import RaterSession
    from noiserater.core.selection import SelectionPlan
    from noiserater.trainer.bench.triton_env import default_env_dir

    if "perf_analyzer" in st.tools:
        perf_analyzer.find()  # fail now, with what is missing
    info = RaterSession(st.onnx, device="cpu").info
    python = ensure_env(st.triton_env or default_env_dir(), say)
    arrays = {}
    for size in st.sizes:
        request, (x0, t, candidates) = make_request(st.model, info.data_shape, info.num_timesteps, size, st.k)
        arrays[size] = (request, x0, t, candidates)
    load_before = os.getloadavg()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nr-vs-triton-")))
        say("starting rater-server and Triton ...")
        sides = []
        rater = start_onnx_server(stack, st.onnx, st.model, st.rater_flags(st.server_args))
        sides.append(Side(RATER, rater.target, rater.pid, rater.command, st.model, st.model, False, False))
        triton = start_triton(stack, python, st.onnx, st.model, st.k, st.instances, st.threads, st.max_batch,
                              int(st.max_delay_ms * 1000), work)
        sides.append(Side(TRITON, triton.target, triton.pid, triton.command, triton.select_model, triton.score_model,
                          True, True))
        if st.baseline_args is not None:
            base = start_onnx_server(stack, st.onnx, st.model, st.rater_flags(st.baseline_args))
            sides.append(Side(BASELINE, base.target, base.pid, base.command, st.model, st.model, False, False))
        readers = {side.name: StatsReader(side.target) for side in sides}
        stack.callback(lambda: [reader.close() for reader in readers.values()])
        inputs = {}  # perf_analyzer's --input-data files, per (side kind, size)
        for size, (_, x0, t, candidates) in arrays.items():
            triples = SelectionPlan(st.k).triples(x0, t, candidates)
            inputs[(False, size)] = perf_analyzer.write_input_data(work / f"pa-n-{size}.json", *triples)
            inputs[(True, size)] = perf_analyzer.write_input_data(work / f"pa-b-{size}.json", triples[0][0],
                                                                  triples[1][:1], triples[2][0])
        comparison = Comparison(st, sides, load_before=load_before)
        cell_index = 0
        for round_number in range(st.rounds):
            comparison.round_loads.append(os.getloadavg())
            for tool in st.tools:
                for size in st.sizes:
                    for level in st.levels:
                        turn = (round_number + cell_index) % len(sides)
                        cell_index += 1
                        for side in sides[turn:] + sides[:turn]:
                            say(f"round {round_number + 1}/{st.rounds}: {tool}, B={size}, {level} clients, "
                                f"{side.name} ...")
                            result = measure(st, tool, side, readers[side.name], arrays[size], inputs, size, level,
                                             work)
                            comparison.cells.setdefault((tool, size, level), {}).setdefault(side.name, []).append(
                                result)
        comparison.load_after = os.getloadavg()
    return comparison


def measure(st: CompareSettings, tool: str, side: Side, reader: StatsReader, arrays, inputs, size: int, level: int,
            work: Path) -> dict:
    """One measurement of one side: throughput (candidates/s), requests/s, p50/p99, requests per run."""
    request, x0, t, candidates = arrays
    candidates_per_request = size * st.k
    model = side.select_model if tool == "load" else side.score_model
    before = reader.counts(model)
    if tool == "load":
        meter = CpuMeter(side.pid)
        if side.kserve_select:
            kserve = make_kserve_request(model, {"x0": x0, "t": t.reshape(-1, 1), "candidates": candidates})
            transport = "kserve-stream" if st.transport == "stream" else "kserve"
            level_result = asyncio.run(measure_server(side.target, kserve, level, candidates_per_request,
                                                      Windows(st.warmup_s, st.window_s, 1), transport=transport,
                                                      channels=level))
        else:
            level_result = asyncio.run(measure_server(side.target, request, level, candidates_per_request,
                                                      Windows(st.warmup_s, st.window_s, 1), transport=st.transport,
                                                      channels=level))
        result = {"throughput": level_result.throughput, "requests_per_s": level_result.requests_per_s,
                  "p50_ms": level_result.p50_ms, "p99_ms": level_result.p99_ms, "errors": level_result.errors}
        if level_result.error_sample:
            result["error_sample"] = level_result.error_sample
        if level_result.requests:
            result["server_cpu_us_per_request"] = meter.server_us_per_request(level_result.requests)
            result["client_cpu_us_per_request"] = meter.client_us_per_request(level_result.requests)
    else:
        batch = candidates_per_request if side.batch_axis else 1
        try:
            (row,) = perf_analyzer.run(side.target, model, inputs[(side.batch_axis, size)], [level],
                                       int(st.window_s * 1000), work / "perf_analyzer.csv",
                                       stability_percent=PERF_ANALYZER_STABILITY, max_trials=4, batch_size=batch)
        except RuntimeError as exc:
            return {"error": str(exc)}
        requests_per_s = row["Inferences/Second"] / batch
        result = {"throughput": requests_per_s * candidates_per_request, "requests_per_s": requests_per_s,
                  "p50_ms": row["p50 latency"] / 1000, "p99_ms": row["p99 latency"] / 1000,
                  "server_queue_us": row.get("Server Queue"), "server_compute_us": row.get("Server Compute Infer")}
    after = reader.counts(model)
    runs = after[1] - before[1]
    result["requests_per_run"] = (after[0] - before[0]) / runs if runs > 0 else None
    return result


# -- the report ---------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def side_summary(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if "error" not in r]
    out = {key: _median([r.get(key) for r in ok]) for key in
           ("throughput", "requests_per_s", "p50_ms", "p99_ms", "requests_per_run", "server_cpu_us_per_request")}
    out["rounds"] = rounds
    return out


def paired(rounds_a: list[dict], rounds_b: list[dict], key: str) -> list[float | None]:
    """Per-round ratios a/b of `key` (None where either side failed)."""
    return [_ratio(a.get(key), b.get(key)) if "error" not in a and "error" not in b else None
            for a, b in zip(rounds_a, rounds_b, strict=True)]


def build_report(c: Comparison, command: str) -> dict:
    import platform

    st = c.settings
    cells = []
    for (tool, size, level), by_side in c.cells.items():
        cell = {"tool": tool, "samples": size, "k": st.k, "concurrency": level,
                **{name: side_summary(rounds) for name, rounds in by_side.items()}}
        for other, prefix in ((TRITON, ""), (BASELINE, "after_over_before_")):
            if other not in by_side:
                continue
            throughput = paired(by_side[RATER], by_side[other], "throughput")
            p99 = paired(by_side[RATER], by_side[other], "p99_ms")
            cell[f"{prefix}throughput_ratio"] = _median(throughput)
            cell[f"{prefix}p99_ratio"] = _median(p99)
            cell[f"{prefix}throughput_ratio_per_round"] = throughput
            cell[f"{prefix}p99_ratio_per_round"] = p99
        cells.append(cell)
    report = {
        "command": command,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": list(c.load_before), "loadavg_after": list(c.load_after),
                    "loadavg_per_round": [list(x) for x in c.round_loads]},
        "settings": {"onnx": str(st.onnx), "model": st.model, "concurrency": list(st.levels),
                     "samples_per_request": list(st.sizes), "k": st.k, "rounds": st.rounds,
                     "intra_op_threads": st.threads, "instances": st.instances, "rater_server_workers": st.workers,
                     "max_delay_ms": st.max_delay_ms,
                     "max_batch_triples": st.max_batch, "transport": st.transport, "tools": list(st.tools),
                     "warmup_s": st.warmup_s, "window_s": st.window_s},
        "servers": {side.name: {"command": side.command, "load_model": side.select_model,
                                "perf_analyzer_model": side.score_model} for side in c.sides},
        "units": {"throughput": "candidates (triples) scored per second", "p50_ms/p99_ms": "client-side latency",
                  "throughput_ratio": "rater-server over Triton, median of per-round ratios",
                  "p99_ratio": "rater-server's p99 over Triton's, median of per-round ratios",
                  "requests_per_run": "requests merged per onnxruntime run (ModelStatistics)"},
        "cells": cells,
    }
    report["summary"] = summarise(cells, BASELINE in {side.name for side in c.sides})
    return report


def _extreme(cells: list[dict], key: str, pick) -> dict:
    valid = [c for c in cells if c.get(key) is not None]
    if not valid:
        return {key: None}
    best = pick(valid, key=lambda c: c[key])
    return {key: best[key], f"{key}_at": {"tool": best["tool"], "samples": best["samples"],
                                          "concurrency": best["concurrency"]}}


def summarise(cells: list[dict], with_baseline: bool) -> dict:
    out = {**_extreme(cells, "throughput_ratio", min), **_extreme(cells, "p99_ratio", max)}
    out["throughput_ratio_min"] = out.pop("throughput_ratio")
    out["throughput_ratio_min_at"] = out.pop("throughput_ratio_at", None)
    out["p99_ratio_max"] = out.pop("p99_ratio")
    out["p99_ratio_max_at"] = out.pop("p99_ratio_at", None)
    out["by_tool"] = {}
    for tool in TOOLS:
        mine = [c for c in cells if c["tool"] == tool]
        if mine:
            low, high = _extreme(mine, "throughput_ratio", min), _extreme(mine, "p99_ratio", max)
            out["by_tool"][tool] = {"throughput_ratio_min": low["throughput_ratio"],
                                    "p99_ratio_max": high["p99_ratio"]}
    out["triton_ahead"] = [
        {"tool": c["tool"], "samples": c["samples"], "concurrency": c["concurrency"],
         "throughput_ratio": c["throughput_ratio"], "p99_ratio": c["p99_ratio"]}
        for c in cells if (c.get("throughput_ratio") or 1.0) < 1.0 or (c.get("p99_ratio") or 1.0) > 1.0]
    if with_baseline:
        low = _extreme(cells, "after_over_before_throughput_ratio", min)
        high = _extreme(cells, "after_over_before_p99_ratio", max)
        out["after_over_before_throughput_ratio_min"] = low["after_over_before_throughput_ratio"]
        out["after_over_before_p99_ratio_max"] = high["after_over_before_p99_ratio"]
    return out


def _f(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def render_markdown(report: dict) -> str:
    st, summary, m = report["settings"], report["summary"], report["machine"]
    with_baseline = "rater_server_baseline" in report["servers"]
    lines = [
        "# rater-server vs Triton Inference Server",
        "",
        "Written by `nrctl bench serve-vs-triton`; regenerate with:",
        "",
        f"    {report['command']}",
        "",
        f"Same machine ({m['cpus']} CPUs, load average {_f(m['loadavg_before'][0])} before, "
        f"{_f(m['loadavg_after'][0])} after), same ONNX rater, same budget on both: {st['instances']} instances "
        f"(rater-server: {st['rater_server_workers']} worker processes sharing the port), "
        f"{st['intra_op_threads']} onnxruntime thread each (CPU provider), {_f(st['max_delay_ms'])} ms queue delay, "
        f"{st['max_batch_triples']} triples per run at most. K = {st['k']} candidates per sample; "
        f"{st['rounds']} rounds, the sides alternating within each; windows of {st['window_s']:g} s.",
        "",
        f"**Summary**: rater-server's throughput over Triton's is at least **{_f(summary['throughput_ratio_min'])}x** "
        f"(at {_at(summary['throughput_ratio_min_at'])}); its p99 latency over Triton's is at most "
        f"**{_f(summary['p99_ratio_max'])}x** (at {_at(summary['p99_ratio_max_at'])}).",
        "",
    ]
    titles = {"load": f"nrctl's load generator ({st['transport']}): rater-server SelectNoise vs Triton ModelInfer "
                      "of the same top-1-of-K selection (PyTriton model `<model>_select`)",
              "perf_analyzer": "Triton's perf_analyzer: KServe ModelInfer of the B x K triples to score, both servers"}
    for tool in st["tools"]:
        cells = [c for c in report["cells"] if c["tool"] == tool]
        lines += [f"## {titles[tool]}", "",
                  "| samples | clients | rater-server cand/s | Triton cand/s | ratio | rater p50 / p99 ms | "
                  "Triton p50 / p99 ms | p99 ratio | req/run rater / Triton | server CPU us/req rater / Triton |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in sorted(cells, key=lambda c: (c["samples"], c["concurrency"])):
            r, t = c["rater_server"], c["triton"]
            lines.append(
                f"| {c['samples']} | {c['concurrency']} | {_f(r['throughput'])} | {_f(t['throughput'])} | "
                f"**{_f(c['throughput_ratio'])}** | {_f(r['p50_ms'])} / {_f(r['p99_ms'])} | "
                f"{_f(t['p50_ms'])} / {_f(t['p99_ms'])} | {_f(c['p99_ratio'])} | "
                f"{_f(r['requests_per_run'], 1)} / {_f(t['requests_per_run'], 1)} | "
                f"{_f(r['server_cpu_us_per_request'], 0)} / {_f(t['server_cpu_us_per_request'], 0)} |")
        lines.append("")
    ahead = summary["triton_ahead"]
    lines += ["## Where Triton is ahead, and why", ""]
    if not ahead:
        lines += ["Nowhere in this run: rater-server's throughput is higher and its p99 lower in every cell.", ""]
    else:
        cells = {(c["tool"], c["samples"], c["concurrency"]): c for c in report["cells"]}
        for a in ahead:
            cell = cells[(a["tool"], a["samples"], a["concurrency"])]
            what = []
            if (a["throughput_ratio"] or 1) < 1:
                what.append(f"throughput ratio {_f(a['throughput_ratio'])} (rounds "
                            f"{', '.join(_f(x) for x in cell['throughput_ratio_per_round'])})")
            if (a["p99_ratio"] or 1) > 1:
                what.append(f"p99 ratio {_f(a['p99_ratio'])} (rounds "
                            f"{', '.join(_f(x) for x in cell['p99_ratio_per_round'])})")
            lines.append(f"- {a['tool']}, {a['samples']} samples, {a['concurrency']} clients: {'; '.join(what)}; "
                         f"requests per run {_f(cell['rater_server']['requests_per_run'], 1)} (rater-server) vs "
                         f"{_f(cell['triton']['requests_per_run'], 1)} (Triton)")
        lines += ["", WHY, ""]
    if with_baseline:
        lines += ["## rater-server against its baseline (same run)", "",
                  f"Baseline: `{' '.join(report['servers']['rater_server_baseline']['command'][-6:])}`; "
                  "ratios are this rater-server over the baseline, medians of per-round ratios.", "",
                  "| tool | samples | clients | throughput after/before | p99 after/before | "
                  "req/run after / before |", "|---|---|---|---|---|---|"]
        for c in sorted(report["cells"], key=lambda c: (c["tool"], c["samples"], c["concurrency"])):
            lines.append(f"| {c['tool']} | {c['samples']} | {c['concurrency']} | "
                         f"{_f(c.get('after_over_before_throughput_ratio'))} | "
                         f"{_f(c.get('after_over_before_p99_ratio'))} | {_f(c['rater_server']['requests_per_run'], 1)}"
                         f" / {_f(c['rater_server_baseline']['requests_per_run'], 1)} |")
        lines.append("")
    return "\n".join(lines)


WHY = """What differs between the two, and what the columns above show of it:
- Triton's gRPC front end is C++ on its own threads: a request is parsed and queued for the dynamic batcher
  as it arrives, so under load its batches grow (requests per run) and its Python cost is paid once per
  batch. rater-server's front end is Python (grpc.aio): about 1 ms of CPU per request (server CPU column,
  8 samples) whatever the batch, most of it gRPC's own machinery, on one event loop per worker. With many
  small requests that front end, not onnxruntime, bounds it; `--workers` runs several, but on a machine
  whose cores are shared with the load generator (and here other work: see the load average) there is
  little CPU to add.
- rater-server's workers share the port by connection. perf_analyzer multiplexes its clients over a few
  connections, so one worker can get most of them; its own load generator gives each client a connection.
- Tail latency: requests wait in gRPC's C core until an event loop takes them, in no set order across
  connections, where Triton's queue is first come, first served; rater-server's p50 is lower in most cells
  while its p99 is often higher. On a shared machine the p99 of a 2 s window (a few dozen requests at one
  client) is mostly the scheduler's: compare the rounds before reading much into one cell."""


def _at(where: dict | None) -> str:
    if not where:
        return "-"
    return f"{where['tool']}, {where['samples']} samples, {where['concurrency']} clients"
