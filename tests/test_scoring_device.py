"""Device choice for onnxruntime: `auto` probes the GPU once and quietly; on a machine without a usable GPU it
means CPU with one info line, never onnxruntime's red error block; `cuda` that cannot be honoured is an error.
The checks hold on any machine: where a GPU works, auto runs on it and cuda is honoured."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.hostile import ServerProcess, plain_rater_bytes, write_repository

from noiserater.core import scoring

ORT_ERROR = "[E:onnxruntime"


def test_auto_and_cuda_follow_the_probe(rater_onnx):
    reason = scoring.cuda_unavailable_reason()
    assert scoring.cuda_unavailable_reason() is reason  # asked once per process
    session = scoring.RaterSession(rater_onnx, device="auto")
    if reason is None:
        assert session.provider == scoring.CUDA_PROVIDER
        assert scoring.RaterSession(rater_onnx, device="cuda").provider == scoring.CUDA_PROVIDER
    else:
        assert session.provider == scoring.CPU_PROVIDER
        with pytest.raises(scoring.DeviceUnavailableError, match=r"^device: 'cuda' was asked for, but "):
            scoring.RaterSession(rater_onnx, device="cuda")
    with pytest.raises(scoring.ScoringError, match="^device: 'tpu' is not one of"):
        scoring.default_providers("tpu")


def test_local_selector_on_auto_prints_no_onnxruntime_error(rater_onnx):
    code = ("import logging, torch\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "from noiserater.client import NoiseSelector\n"
            f"selector = NoiseSelector.local({str(rater_onnx)!r}, num_candidates=4, device='auto')\n"
            "selector.select(torch.rand(3, 64), torch.randint(0, 100, (3,)))\n"
            f"selector = NoiseSelector.local({str(rater_onnx)!r}, num_candidates=4, device='auto')\n"
            "print('selected')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "selected" in proc.stdout
    assert ORT_ERROR not in proc.stderr and "Failed to create CUDAExecutionProvider" not in proc.stderr
    if scoring.cuda_unavailable_reason() is not None:  # one info line, however many sessions
        assert proc.stderr.count("device auto: onnxruntime runs on CPU") == 1, proc.stderr


def test_server_on_auto_prints_no_onnxruntime_error(tmp_path):
    repo = write_repository(tmp_path / "repo", {"digits": [plain_rater_bytes(), plain_rater_bytes()]})
    with ServerProcess(repo, "--device", "auto") as server:
        server.wait_serving()
        server.stop()
        output = server.wait_output()
    assert ORT_ERROR not in output and "Failed to create CUDAExecutionProvider" not in output, output
