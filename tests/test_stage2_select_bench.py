"""`nrctl bench select` end to end on a tiny budget: it starts its server, runs every mode in interleaved
rounds and writes the report (JSON and Markdown) with the summary ratios and the goals (their values are not
asserted: speed lives in the committed report, not in tests)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from noiserater.trainer.bench.select_overhead import MODES

NRCTL = Path(sys.executable).parent / "nrctl"


def test_bench_select_writes_a_report(tmp_path, rater_onnx):
    out = tmp_path / "select.json"
    result = subprocess.run(
        [str(NRCTL), "bench", "select", "--denoisers", "mlp", "--rater-mlp", str(rater_onnx), "--mlp-steps", "4",
         "--warmup-steps", "4",
         "--rounds", "2", "--batch", "16", "--k", "4", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout)["summary"] == report["summary"]
    assert report["command"].startswith("nrctl bench select --denoisers mlp")
    mlp = report["denoisers"]["mlp"]
    assert set(mlp["modes"]) == set(MODES) and mlp["dataset"] == "digits"
    for row in mlp["modes"].values():
        assert len(row["rounds"]) == 2 and row["ms_per_step"] == sum(row["rounds"]) / 2
        assert row["ms_per_step"] > 0 and row["cpu_ms_per_step"] > 0
    assert mlp["remote_failures"] == {"fallback_local": 0, "fallback_gaussian": 0, "outages": 0}
    assert mlp["rater"] == str(rater_onnx)
    summary = report["summary"]["mlp"]
    modes = summary["ms_per_step"]
    assert math.isclose(summary["remote_prefetch_vs_local"], modes["remote_prefetch"] / modes["local"])
    assert math.isclose(summary["local_vs_uniform"], modes["local"] / modes["uniform"])
    assert set(report["goals"]) == {"mlp.remote_prefetch_vs_local"}  # the UNet's goal needs the UNet
    assert len(report["machine"]["loadavg_before"]) == len(report["machine"]["loadavg_after"]) == 3
    assert "PORT" in report["server_command"] and "REPOSITORY" in report["server_command"]
    markdown = out.with_suffix(".md").read_text()
    assert "| remote_prefetch |" in markdown and report["command"] in markdown


def test_bench_select_without_a_server_and_its_errors(tmp_path):
    """No --rater-mlp: the bench exports an untrained rater of the default kind itself."""
    out = tmp_path / "select.json"
    result = subprocess.run(
        [str(NRCTL), "bench", "select", "--denoisers", "mlp", "--modes", "local", "--mlp-steps", "4",
         "--warmup-steps", "4", "--rounds", "1", "--batch", "8", "--k", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["denoisers"]["mlp"]["modes"]) == {"uniform", "local"} and report["server_command"] is None
    assert report["denoisers"]["mlp"]["rater"].startswith("untrained")
    assert set(report["summary"]["mlp"]) == {"local_vs_uniform", "ms_per_step", "cpu", "cpu_ms_per_step"}
    assert set(report["summary"]["mlp"]["cpu"]) == {"local_vs_uniform"}
    bad = subprocess.run([str(NRCTL), "bench", "select", "--modes", "remote,sometimes"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: modes: sometimes (choose from uniform, local, local_prefetch, remote, remote_prefetch)"]
