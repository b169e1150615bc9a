"""The serving benchmark's report: assembled from one run's measurements (serve_run) and rendered as a table
and summary lines.

Summary ratios: `batched_vs_unbatched_at_16` (16 clients, small requests, batching on vs off; goal >= 3) and
`best_vs_ceiling` (best server throughput over the ceiling; goal >= 0.7). Next to them the report gives what
bounds the first one: how much faster per candidate onnxruntime scores one big merged run than many small
ones (the most batching can gain when requests cost nothing else), and the CPU time per request that the
server and the load generator spend (when the bench started the servers).
"""

from __future__ import annotations

import os
import platform

import numpy as np

from noiserater.trainer.bench.serve_ceiling import batching_gain_bound, ratio
from noiserater.trainer.bench.serve_run import KINDS, SMALL_CONCURRENCY, Measurements, ServeSettings

GOAL_BATCHED_VS_UNBATCHED = 3.0
GOAL_BEST_VS_CEILING = 0.7
COLUMNS = ["clients", "server", "cand/s", "p50 ms", "p90 ms", "p99 ms", "errors", "stable"]


def median_of(items: list[dict], kind: str, key: str) -> float | None:
    values = [item[kind][key] for item in items if key in item[kind]]
    return float(np.median(values)) if values else None


def small_requests(st: ServeSettings, m: Measurements) -> dict:
    """Batching on vs off with small requests, and what bounds the ratio: onnxruntime and CPU per request."""
    per_small = st.small_batch * st.k
    return {
        "batch": st.small_batch, "k": st.k, "concurrency": SMALL_CONCURRENCY, "rounds": m.small_rounds,
        "batched_throughput_median": median_of(m.small_rounds, "batched", "throughput"),
        "unbatched_throughput_median": median_of(m.small_rounds, "unbatched", "throughput"),
        "ratio_per_round": [ratio(r["batched"]["throughput"], r["unbatched"]["throughput"]) for r in m.small_rounds],
        "in_process_small_runs": m.small_runs.report(),
        "server_cpu_us_per_request_median": {
            kind: median_of(m.small_rounds, kind, "server_cpu_us_per_request") for kind in KINDS},
        "client_cpu_us_per_request_median": {
            kind: median_of(m.small_rounds, kind, "client_cpu_us_per_request") for kind in KINDS},
        "onnxruntime_us_per_small_run": 1e6 / m.small_runs.requests_per_s if m.small_runs.requests_per_s else None,
        "onnxruntime_us_per_request_in_big_runs": per_small / m.ceiling_one.throughput * 1e6
        if m.ceiling_one.throughput else None}


def summary(m: Measurements, small_ratios: list[float]) -> dict:
    ceiling_ratios = [ratio(r["server"]["throughput"], max(r["ceiling_one_caller"]["throughput"],
                                                          r["ceiling_parallel"]["throughput"]))
                      for r in m.ceiling_rounds]
    one_caller_ratios = [ratio(r["server"]["throughput"], r["ceiling_one_caller"]["throughput"])
                         for r in m.ceiling_rounds]
    best = max(m.levels, key=lambda r: r["batched"]["throughput"])
    best_ceiling = max(m.ceiling_one.throughput, m.ceiling_parallel.throughput)
    out = {
        # Medians of per-round ratios: each round measures both sides back to back, so load from other
        # processes on the machine hits both sides of a ratio alike.
        "batched_vs_unbatched_at_16": float(np.median(small_ratios)),
        "best_vs_ceiling": float(np.median(ceiling_ratios)),
        "best_vs_ceiling_per_round": ceiling_ratios,
        "best_vs_ceiling_one_caller": float(np.median(one_caller_ratios)),
        "batching_gain_bound": batching_gain_bound(m.ceiling_one, m.small_runs),
        "best_concurrency": best["concurrency"],
        "best_throughput_sweep": best["batched"]["throughput"],
        "ceiling_throughput_sweep": best_ceiling,
        "best_vs_ceiling_sweep": ratio(best["batched"]["throughput"], best_ceiling),
        "goals": {"batched_vs_unbatched_at_16": GOAL_BATCHED_VS_UNBATCHED,
                  "best_vs_ceiling": GOAL_BEST_VS_CEILING},
    }
    out["goals_met"] = {name: out[name] >= goal for name, goal in out["goals"].items()}
    return out


def build_report(st: ServeSettings, m: Measurements) -> dict:
    """The report JSON (docs/results/serve-report.json is an example of its shape), less "command"."""
    import onnxruntime as ort

    small = small_requests(st, m)
    w = st.windows
    return {
        "model": {"name": st.model, "onnx": str(st.onnx), "data_shape": list(m.data_shape),
                  "num_timesteps": m.num_timesteps},
        "batch": st.batch, "k": st.k, "candidates_per_request": st.batch * st.k, "levels": m.levels,
        "small_requests": small, "ceiling_one_caller": m.ceiling_one.report(),
        "ceiling_parallel": m.ceiling_parallel.report(), "ceiling_callers": st.ceiling_callers,
        "ceiling_rounds": m.ceiling_rounds, "in_process_select": m.select_path.report(),
        "perf_analyzer": m.perf_analyzer,
        "summary": summary(m, small["ratio_per_round"]),
        "targets": m.targets,
        "servers_started_by_bench": {kind: " ".join(command) for kind, command in m.servers_started.items()},
        "method": {"warmup_s": w.warmup_s, "window_s": w.window_s, "max_windows": w.max_windows,
                   "rounds": st.rounds, "stability": w.stability, "transport": st.transport,
                   "client": f"grpc.aio closed loop, <=4 channels, {st.transport} transport",
                   "ceiling": "in-process RaterSession.score, the better of 1 and ceiling_callers callers"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "ceiling_provider": m.ceiling_provider,
                    "note": "timings are noisy; compare only figures from one run"},
    }


def report_table(report: dict) -> tuple[str, list[str], list[list]]:
    """(title, columns, rows) of the report's table: every level on both servers, then the ceiling (in-process
    onnxruntime, its callers in the clients column). Short column names, so the table fits 80 columns."""
    rows = []
    for row in report["levels"]:
        for kind in KINDS:
            r = row[kind]
            rows.append([row["concurrency"], kind, round(r["throughput"]), round(r["p50_ms"], 2),
                         round(r["p90_ms"], 2), round(r["p99_ms"], 2), r["errors"], yes_no(r["stable"])])
    for callers, c in ((1, report["ceiling_one_caller"]), (report["ceiling_callers"], report["ceiling_parallel"])):
        rows.append([callers, "in-process", round(c["throughput"]), round(c["p50_ms"], 2), round(c["p90_ms"], 2),
                     round(c["p99_ms"], 2), 0, yes_no(c["stable"])])
    title = (f"bench serve: {report['model']['name']}, B={report['batch']} x K={report['k']} candidates per request, "
             f"{report['method']['transport']}; cand/s: candidates scored per second")
    return title, COLUMNS, rows


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def against_goal(value: float, goal: float, digits: int = 2) -> str:
    """`value` with enough decimals that it does not read as reaching `goal` when it does not (0.6977 against
    0.7 prints 0.698, not 0.70)."""
    text = f"{value:.{digits}f}"
    while value < goal <= float(text) and digits < 6:
        digits += 1
        text = f"{value:.{digits}f}"
    return f"just below {goal:g}" if value < goal <= float(text) else text


def summary_lines(report: dict) -> list[str]:
    """The summary ratios against their goals, and the bound on what batching could gain."""
    s = report["summary"]
    lines = []
    for name in ("batched_vs_unbatched_at_16", "best_vs_ceiling"):
        verdict = "met" if s["goals_met"][name] else "MISSED"
        lines.append(f"{name}: {against_goal(s[name], s['goals'][name])} (goal >= {s['goals'][name]:g}; {verdict})")
    lines.append(f"batching could gain at most {s['batching_gain_bound']:.2f}x here even if requests cost nothing "
                 "but onnxruntime (in-process small runs vs one big run)")
    return lines
