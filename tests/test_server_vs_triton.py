"""`nrctl bench serve-vs-triton`: the load generator speaks KServe (what Triton answers), the report's ratios
and summary come from paired rounds, and, where the PyTriton environment exists, the whole comparison runs
(speed itself lives in the committed report, not in tests)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.server import ServerThread, make_repository

from noiserater.server.config import ServerConfig
from noiserater.trainer.bench import serve_vs_triton as vs
from noiserater.trainer.bench.serve_load import make_kserve_request, measure_server
from noiserater.trainer.bench.serve_windows import Windows
from noiserater.trainer.bench.triton_env import default_env_dir, env_python


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")) as running:
        yield running


@pytest.mark.parametrize("transport", ["kserve", "kserve-stream"])
def test_the_load_generator_speaks_kserve(server, transport):
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 8, 64)).astype(np.float32)
    request = make_kserve_request("digits", {"x0": x0, "t": rng.integers(0, 100, 8), "eps": eps})
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [
        ("x0", "FP32", [8, 64]), ("t", "INT64", [8]), ("eps", "FP32", [8, 64])]
    level = asyncio.run(measure_server(server.target, request, 3, 8, Windows(0.05, 0.3, 1), transport=transport,
                                       channels=3))
    assert level.errors == 0 and level.requests > 0 and level.throughput == pytest.approx(level.requests_per_s * 8)


def test_rater_server_gets_the_shared_budget_and_extra_flags_win():
    settings = vs.CompareSettings(onnx=Path("x.onnx"), instances=2, workers=2, threads=1)
    flags = settings.rater_flags(("--workers", "1"))
    assert flags[flags.index("--workers") + 1] == "2" and flags[flags.index("--instances") + 1] == "2"
    assert flags[-2:] == ["--workers", "1"]  # extra flags come last: they win


def figures(throughput: float, p99: float, per_run: float = 1.0) -> dict:
    return {"throughput": throughput, "requests_per_s": throughput / 64, "p50_ms": p99 / 2, "p99_ms": p99,
            "requests_per_run": per_run}


def test_the_report_pairs_rounds_and_says_where_triton_is_ahead():
    st = vs.CompareSettings(onnx=Path("r.onnx"), levels=(1, 64), sizes=(8,), rounds=3, tools=("load",))
    sides = [vs.Side(name, "t", 1, [name, "--workers", "1", "--instances", "2"], "m", "m", False, False)
             for name in (vs.RATER, vs.TRITON, vs.BASELINE)]
    comparison = vs.Comparison(st, sides, load_before=(1.0, 1.0, 1.0), load_after=(2.0, 2.0, 2.0))
    comparison.cells[("load", 8, 1)] = {
        vs.RATER: [figures(300, 2), figures(200, 2), figures(330, 2)],
        vs.TRITON: [figures(100, 4), figures(100, 4), figures(100, 4)],
        vs.BASELINE: [figures(150, 2), figures(100, 2), figures(150, 2)]}
    comparison.cells[("load", 8, 64)] = {  # Triton ahead here; one round of rater-server failed
        vs.RATER: [figures(90, 30), {"error": "perf_analyzer failed"}, figures(80, 20)],
        vs.TRITON: [figures(100, 10), figures(100, 10), figures(100, 10)],
        vs.BASELINE: [figures(45, 10), figures(50, 10), figures(40, 10)]}
    report = vs.build_report(comparison, "nrctl bench serve-vs-triton --onnx r.onnx")
    low, high = report["cells"]
    assert low["throughput_ratio_per_round"] == [3.0, 2.0, 3.3] and low["throughput_ratio"] == 3.0
    assert low["p99_ratio"] == 0.5 and low["after_over_before_throughput_ratio"] == 2.0
    assert high["throughput_ratio_per_round"] == [0.9, None, 0.8] and high["throughput_ratio"] == pytest.approx(0.85)
    assert high[vs.RATER]["throughput"] == 85.0  # the failed round is left out
    summary = report["summary"]
    assert summary["throughput_ratio_min"] == pytest.approx(0.85) and summary["p99_ratio_max"] == 2.5
    assert summary["throughput_ratio_min_at"] == {"tool": "load", "samples": 8, "concurrency": 64}
    assert [(a["concurrency"], a["p99_ratio"]) for a in summary["triton_ahead"]] == [(64, 2.5)]
    assert summary["after_over_before_throughput_ratio_min"] == 2.0
    assert report["machine"]["loadavg_before"] == [1.0, 1.0, 1.0]
    markdown = vs.render_markdown(report)
    assert ("- load, 8 samples, 64 clients: throughput ratio 0.85 (rounds 0.90, -, 0.80); p99 ratio 2.50 (rounds "
            "3.00, -, 2.00); requests per run 1.0 (rater-server) vs 1.0 (Triton)") in markdown
    assert "at least **0.85x**" in markdown and "nrctl bench serve-vs-triton --onnx r.onnx" in markdown


@pytest.mark.skipif(not env_python(default_env_dir()).exists(),
                    reason="no PyTriton environment (the bench makes one on first use: about a minute, 0.7 GB)")
def test_serve_vs_triton_end_to_end(tmp_path, rater_onnx):
    out = tmp_path / "vs.json"
    nrctl = Path(sys.executable).parent / "nrctl"
    result = subprocess.run(
        [str(nrctl), "bench", "serve-vs-triton", "--onnx", str(rater_onnx), "--concurrency", "2", "--samples", "2",
         "--k", "4", "--rounds", "1", "--window-s", "0.3", "--warmup-s", "0.1", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {(c["tool"], c["samples"], c["concurrency"]) for c in report["cells"]} == {
        ("load", 2, 2), ("perf_analyzer", 2, 2)}
    for cell in report["cells"]:
        for side in (vs.RATER, vs.TRITON):
            (measured,) = cell[side]["rounds"]
            assert measured["throughput"] > 0 and measured.get("errors", 0) == 0, measured
            assert measured["requests_per_run"] >= 1
        assert cell["throughput_ratio"] > 0
    assert report["servers"]["triton"]["load_model"] == "digits_select"
    assert out.with_suffix(".md").read_text().startswith("# rater-server vs Triton Inference Server")
