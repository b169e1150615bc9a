"""`nrctl bench serve` end to end with tiny windows: it starts both servers itself, measures, and writes a
report with the per-level figures and both summary ratios (their values are not asserted: speed lives in
the committed report, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_bench_serve_writes_a_report(tmp_path, rater_onnx, transport):
    out = tmp_path / "report.json"
    nrctl = Path(sys.executable).parent / "nrctl"
    result = subprocess.run(
        [str(nrctl), "bench", "serve", "--onnx", str(rater_onnx), "--model", "digits", "--concurrency", "1,2",
         "--batch", "4", "--k", "4", "--small-batch", "1", "--duration-s", "0.2", "--warmup-s", "0.05",
         "--max-windows", "3", "--rounds", "1", "--server-args", "--device cpu", "--device", "cpu",
         "--transport", transport, "--ceiling-callers", "2",
         *(["--perf-analyzer", "--stability", "1.0"] if transport == "stream" else []),
         "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout)["summary"] == report["summary"]
    assert [row["concurrency"] for row in report["levels"]] == [1, 2]
    for row in report["levels"]:
        for kind in ("batched", "unbatched"):
            assert row[kind]["errors"] == 0 and row[kind]["throughput"] > 0
            assert row[kind]["p50_ms"] <= row[kind]["p90_ms"] <= row[kind]["p99_ms"]
            assert row[kind]["server_cpu_us_per_request"] > 0 and row[kind]["client_cpu_us_per_request"] > 0
    assert report["method"]["transport"] == transport and report["ceiling_callers"] == 2
    assert report["ceiling_one_caller"]["throughput"] > 0 and report["ceiling_parallel"]["concurrency"] == 2
    assert report["candidates_per_request"] == 16
    assert report["small_requests"]["onnxruntime_us_per_small_run"] > 0
    if transport == "stream":  # Triton's perf_analyzer measured both servers at every level, both modes
        assert [row["concurrency"] for row in report["perf_analyzer"]] == [1, 2]
        for row in report["perf_analyzer"]:
            for kind in ("batched", "unbatched"):
                for mode in ("unary", "streaming"):
                    assert row[kind][mode]["throughput"] > 0 and row[kind][mode]["p50_ms"] > 0, row
    else:
        assert report["perf_analyzer"] is None
    summary = report["summary"]
    assert summary["batched_vs_unbatched_at_16"] > 0 and summary["best_vs_ceiling"] > 0
    assert summary["batching_gain_bound"] > 0
    # The ceiling is the better of its two measurements, so the sweep's ratio uses the larger one.
    best_ceiling = max(report["ceiling_one_caller"]["throughput"], report["ceiling_parallel"]["throughput"])
    assert summary["ceiling_throughput_sweep"] == best_ceiling
    assert set(summary["goals_met"]) == {"batched_vs_unbatched_at_16", "best_vs_ceiling"}
    assert "--max-batch 0" in report["servers_started_by_bench"]["unbatched"]


def test_bench_serve_errors_are_one_line(tmp_path):
    nrctl = Path(sys.executable).parent / "nrctl"
    result = subprocess.run([str(nrctl), "bench", "serve", "--onnx", str(tmp_path / "missing.onnx")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "missing.onnx" in result.stderr
