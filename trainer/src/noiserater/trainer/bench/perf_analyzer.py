"""Triton's perf_analyzer against a rater-server's KServe endpoint.

The `tritonclient` wheel ships the perf_analyzer binary (C++). It links against libb64 (Debian package
libb64-0d) and the CUDA runtime library libcudart.so.12 (the `nvidia-cuda-runtime-cu12` wheel), even when
no GPU is used; `make venv` installs both. rater-server answers the RPCs it asks for: ServerMetadata,
ModelMetadata, ModelConfig, ModelStatistics and ModelInfer (or ModelStreamInfer with `--streaming`).

A rater's inputs have a variable N axis and t must lie in [0, T), so perf_analyzer is given the request
as an --input-data JSON file (one fixed set of triples) rather than generating random tensors.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from noiserater.trainer.bench.serve_windows import Windows


class PerfAnalyzerUnavailable(RuntimeError):
    pass


def cuda_runtime_lib_dir() -> Path | None:
    try:
        import nvidia.cuda_runtime as cuda_runtime  # namespace package of the nvidia-cuda-runtime-cu12 wheel
    except ImportError:
        return None
    for root in cuda_runtime.__path__:
        lib = Path(root) / "lib"
        if (lib / "libcudart.so.12").exists():
            return lib
    return None


@functools.cache
def find() -> tuple[str, dict[str, str]]:
    """The perf_analyzer binary and the environment it runs in, probed once per process;
    PerfAnalyzerUnavailable says what is missing."""
    binary = shutil.which("perf_analyzer", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                   os.environ.get("PATH", "")]))
    if binary is None:
        raise PerfAnalyzerUnavailable("perf_analyzer not found (pip install 'tritonclient[grpc]' ships it)")
    env = dict(os.environ)
    lib = cuda_runtime_lib_dir()
    if lib is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH", "")) if p)
    probe = subprocess.run([binary, "--version"], env=env, capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        detail = (probe.stderr or probe.stdout).strip().splitlines()
        hint = " (apt-get install libb64-0d; pip install nvidia-cuda-runtime-cu12)" if detail and \
            "shared libraries" in detail[0] else ""
        raise PerfAnalyzerUnavailable(f"perf_analyzer cannot run: {detail[0] if detail else probe.returncode}{hint}")
    return binary, env


def write_input_data(path: Path, x0: np.ndarray, t: np.ndarray, eps: np.ndarray) -> Path:
    """perf_analyzer's --input-data JSON: one request of N triples (for a batching model, N = 1 and without the
    batch axis: x0 [*data], t [1], eps [*data])."""
    def tensor(a: np.ndarray) -> dict:
        return {"content": a.ravel().tolist(), "shape": list(a.shape)}

    path.write_text(json.dumps({"data": [{"x0": tensor(x0), "t": tensor(t), "eps": tensor(eps)}]}))
    return path


def run(target: str, model: str, input_data: Path, concurrency: list[int], window_ms: int, csv_path: Path,
        streaming: bool = False, stability_percent: float = 15.0, max_trials: int = 5,
        timeout_s: float = 600.0, batch_size: int = 1) -> list[dict[str, float]]:
    """One perf_analyzer run over the concurrency levels; its CSV rows (latencies in microseconds).
    `batch_size` > 1 is for a model with Triton's batch axis (max_batch_size > 0): each request stacks that many
    copies of `input_data`'s one element, and "Inferences/Second" counts elements, not requests."""
    binary, env = find()
    rows: list[dict[str, float]] = []
    for level in concurrency:
        args = [binary, "-m", model, "-u", target, "-i", "grpc", "--input-data", str(input_data),
                "--concurrency-range", str(level), "-p", str(window_ms), "-s", str(stability_percent),
                "-r", str(max_trials), "-f", str(csv_path)]
        if batch_size != 1:
            args += ["-b", str(batch_size)]
        if streaming:
            args.append("--streaming")
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not csv_path.exists():
            lines = (done.stderr + done.stdout).strip().splitlines()
            why = next((ln for ln in lines if "rror" in ln or "ailed" in ln), lines[-1] if lines else done.returncode)
            raise RuntimeError(f"perf_analyzer failed at concurrency {level}: {why}")
        with csv_path.open() as handle:
            rows.extend({k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle))
        csv_path.unlink()
    return rows


def measure_levels(targets: dict[str, str], model: str, triples, levels: list[int], windows: Windows,
                   work: Path) -> list[dict]:
    """perf_analyzer's figures per level, server (`targets`: name -> HOST:PORT) and mode (unary, streaming), in
    the serving benchmark's units (candidates/s, ms) and with its windows; a failed run is recorded as
    {"error": ...} and the rest are still measured."""
    data = write_input_data(work / "perf_analyzer_input.json", *triples)
    per_request = triples[0].shape[0]
    rows = []
    for level in levels:
        row: dict = {"concurrency": level}
        for kind, where in targets.items():
            for streaming in (False, True):
                mode = "streaming" if streaming else "unary"
                try:
                    (got,) = run(where, model, data, [level], int(windows.window_s * 1000), work / "perf_analyzer.csv",
                                 streaming=streaming, stability_percent=windows.stability * 100,
                                 max_trials=windows.max_windows)
                except RuntimeError as exc:  # e.g. no stable windows
                    row.setdefault(kind, {})[mode] = {"error": str(exc)}
                    continue
                row.setdefault(kind, {})[mode] = {
                    "throughput": got["Inferences/Second"] * per_request, "requests_per_s": got["Inferences/Second"],
                    "p50_ms": got["p50 latency"] / 1000, "p90_ms": got["p90 latency"] / 1000,
                    "p99_ms": got["p99 latency"] / 1000, "server_queue_us": got["Server Queue"],
                    "server_compute_us": got["Server Compute Infer"]}
        rows.append(row)
    return rows
