"""`nrctl quickstart` end to end on a tiny budget: a real rater-server subprocess, remote selection, stats."""

import json
import subprocess
import sys


def test_quickstart_runs_the_whole_pipeline(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "noiserater.cli.main", "quickstart", "--workdir", str(tmp_path), "--rater-steps", "3",
         "--train-steps", "20", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model_version"] == 1
    assert report["selector_fallbacks"] == 0
    # every training step scored batch x K candidates on the server
    assert report["candidates_scored_on_server"] == 20 * 128 * 8
    # ... and its statistics by timestep range (T=1000 for digits: ten ranges of 100)
    statistics = report["statistics"]
    assert sum(r["count"] for r in statistics) == 20 * 128 * 8
    assert all(r["t_last"] - r["t_first"] == 99 and r["min"] <= r["mean"] <= r["max"] for r in statistics)
    for method in ("uniform", "rater-argmax"):
        assert report["methods"][method]["val_loss"] > 0
    assert set(report["verdict"]) >= {"val_loss"}
    assert (tmp_path / "digits.onnx").is_file() and (tmp_path / "models" / "digits" / "1" / "model.onnx").is_file()
