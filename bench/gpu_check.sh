#!/usr/bin/env bash
# GPU checks for a session that has the device machine (see the device tool's README); NOT a test.
# Not yet run: no session so far had a device. Writes $OUT/gpu_check.json (+ logs) with:
#   - stage 1 on CUDA: `nrctl train-rater --device cuda` (short) and its seconds per meta step,
#     next to the same run on the machine's CPU, as a ratio measured in this one call;
#   - CUDA execution provider serving: RaterSession on CUDA vs CPU, candidates scored per second at
#     B x K = 1 x 8, 64 x 8 and 1024 x 8, and per device the batching gain bound (candidates/s of one
#     1024 x 8 run over that of 1 x 8 runs: what merging small requests can gain at most, the figure
#     `nrctl bench serve` reports as batching_gain_bound); skipped with a reason when onnxruntime there
#     has no CUDA provider
#     (the device image ships CPU onnxruntime, and onnxruntime-gpu is larger than the 64 MiB carry limit);
#   - what a stage-2 step pays for noise selection with the denoiser on the GPU: `nrctl bench select
#     --device cuda` (uniform, in-process, remote and prefetched selection, interleaved rounds; the rater
#     scores on CPU there) -> $OUT/select-overhead-cuda.json (its Markdown on stdout).
# The device image has python3 3.12 with torch, onnx, onnxruntime, grpcio, typer, rich, tqdm, scipy,
# scikit-learn; protobuf may be older than our gencode (7.35), so carry a wheel made here first:
#   echo /.whl/ >> .git/info/exclude; v=$(.venv/bin/python -c 'import grpc; print(grpc.__version__)')
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl "protobuf==7.36.2"
#   - rater-server against Triton Inference Server (`nrctl bench serve-vs-triton`, one round, both on
#     onnxruntime's CPU provider) on the device's 16 cores, where no neighbours share them: written to
#     $OUT/serve-vs-triton.json/.md. It needs nvidia-pytriton in a venv that the bench makes (with the image's
#     own onnxruntime, --system-site-packages); the device reaches no index, so it installs from a wheelhouse
#     .whl-triton carried along and is skipped (said in $OUT/serve-vs-triton.log) without one. Made here:
#       echo /.whl-triton/ >> .git/info/exclude
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_35_x86_64 --platform manylinux2014_x86_64 -d .whl-triton \
#         "nvidia-pytriton==0.7.0" "numpy==1.26.4" "tritonclient[grpc,http]==2.73.0" "sh>=1.14" \
#         "typing_inspect>=0.6" "mypy_extensions>=0.3" "wrapt>=1.11" "pyzmq>=23" "protobuf==6.33.6"
#     (nvidia-pytriton alone is 53 MB: with numpy this is over the 64 MiB carry limit, so until the image ships
#     PyTriton or reaches PyPI the step records why it was skipped). Without perf_analyzer in the image only
#     the bench's own load generator runs.
# then run (device tool): carry [".whl"] (and ".whl-triton"), timeout_s 600, command `bash bench/gpu_check.sh`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/core/src:$PWD/client/src:$PWD/trainer/src:$PWD/server/src:$PWD/cli/src"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
for device in cuda cpu; do
  timeout 150 python3 -m noiserater.cli.main train-rater --dataset digits --out "/tmp/run-$device" --steps 60 \
    --device "$device" --json > "$OUT/train-$device.json" 2> "$OUT/train-$device.log"
done
python3 - "$OUT" <<'PY' > "$OUT/serve.log" 2>&1
import json, sys, time
from pathlib import Path
import numpy as np
out = Path(sys.argv[1])
result = {}
for device in ("cuda", "cpu"):
    p = out / f"train-{device}.json"
    try:
        summary = json.loads(p.read_text())
        rows = [json.loads(l) for l in Path(f"/tmp/run-{device}/metrics.jsonl").read_text().splitlines()]
        result[f"stage1_{device}"] = {"wall_seconds": summary["wall_seconds"], "device": summary["device"],
                                      "median_seconds_per_step": float(np.median([r["seconds_per_step"] for r in rows]))}
    except Exception as exc:  # a failed run is reported, not hidden
        result[f"stage1_{device}"] = {"error": f"{type(exc).__name__}: {exc}"}
if all("median_seconds_per_step" in result.get(f"stage1_{d}", {}) for d in ("cuda", "cpu")):
    result["stage1_cpu_over_cuda_step_time"] = (result["stage1_cpu"]["median_seconds_per_step"]
                                                / result["stage1_cuda"]["median_seconds_per_step"])
import onnxruntime as ort
result["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
from noiserater.core import scoring
from noiserater.core.selection import SelectionPlan
from noiserater.trainer.stage1.export import export_rater
from noiserater.trainer.stage1.rater import load_rater
rater, _ = load_rater("/tmp/run-cpu/rater.pt")
export_rater(rater, "/tmp/gpu_check.onnx")
for device in ("cuda", "cpu"):
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        result["serving_cuda"] = {"skipped": "onnxruntime on the device has no CUDAExecutionProvider"}
        continue
    session = scoring.RaterSession(Path("/tmp/gpu_check.onnx"), device=device)
    figures = {"provider": session.provider}
    for batch in (1, 64, 1024):
        rng = np.random.default_rng(0)
        x0 = rng.standard_normal((batch, 64), dtype=np.float32)
        t = rng.integers(0, 1000, batch)
        cand = rng.standard_normal((batch, 8, 64), dtype=np.float32)
        triples = SelectionPlan(8).triples(x0, t, cand)
        for _ in range(10):
            session.score(*triples)
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < 3:
            session.score(*triples); runs += 1
        figures[f"candidates_per_s_b{batch}_k8"] = runs * batch * 8 / (time.perf_counter() - start)
    figures["batching_gain_bound"] = figures["candidates_per_s_b1024_k8"] / figures["candidates_per_s_b1_k8"]
    result[f"serving_{device}"] = figures
(out / "gpu_check.json").write_text(json.dumps(result, indent=2, sort_keys=True))
print(json.dumps(result, indent=2, sort_keys=True))
PY
# The remote modes start a rater-server, which needs grpcio-health-checking, grpcio-reflection, redis and
# prometheus-client (carry their wheels in .whl too); without them the bench measures the in-process modes.
select="python3 -m noiserater.cli.main bench select --device cuda --rounds 3 --mlp-steps 200 --unet-steps 60"
timeout 200 $select --out /tmp/select-overhead-cuda.json > /tmp/select-overhead.log 2>&1 ||
  timeout 120 $select --modes uniform,local,local_prefetch --out /tmp/select-overhead-cuda.json \
    >> /tmp/select-overhead.log 2>&1 || tail -5 /tmp/select-overhead.log
cp /tmp/select-overhead-cuda.json "$OUT/" 2>/dev/null  # $OUT brings back 8 files at most: the .md is printed
cat "$OUT/gpu_check.json" 2>/dev/null || tail -20 "$OUT/serve.log"
if ls .whl-triton/*.whl >/dev/null 2>&1; then
  tools=load,perf_analyzer
  python3 -c "from noiserater.trainer.bench import perf_analyzer as p; p.find()" 2>/dev/null || tools=load
  PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/.whl-triton" timeout 300 python3 -m noiserater.cli.main bench serve-vs-triton \
    --onnx docs/results/bench-digits/rater.onnx --rounds 1 --window-s 1 --tools "$tools" \
    --triton-env /tmp/pytriton-env --out "$OUT/serve-vs-triton.json" > "$OUT/serve-vs-triton.log" 2>&1
  tail -30 "$OUT/serve-vs-triton.md" 2>/dev/null || tail -5 "$OUT/serve-vs-triton.log"
else
  echo "serve-vs-triton skipped: no .whl-triton wheelhouse carried (see the header)" | tee "$OUT/serve-vs-triton.log"
fi
cat /tmp/select-overhead-cuda.md 2>/dev/null
