"""Unary vs stream transport, in paired rounds within one run, against one batched rater-server started with
the committed bench settings. Prints JSON; docs/serving.md quotes the figures. Not a test.

Run after exporting runs/bench/digits.onnx as docs/serving.md shows:
    .venv/bin/python bench/transport_pairs.py
"""

from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from noiserater.trainer.bench.cpu import CpuMeter
from noiserater.trainer.bench.local_server import start_onnx_server
from noiserater.trainer.bench.serve_load import make_request, measure_server
from noiserater.trainer.bench.serve_windows import Windows

ROUNDS = 4
SERVER_ARGS = ["--intra-op-threads", "1", "--instances", "2"]
WINDOWS = Windows(warmup_s=1.0, window_s=2.0, max_windows=1)


def main() -> None:
    small, _ = make_request("digits", (64,), 1000, 1, 8, seed=1)
    big, _ = make_request("digits", (64,), 1000, 64, 8)
    out = {}
    with ExitStack() as stack:
        server = start_onnx_server(stack, Path("runs/bench/digits.onnx"), "digits", SERVER_ARGS)
        for name, request, clients, candidates in (("B1_K8_16clients", small, 16, 8),
                                                   ("B64_K8_64clients", big, 64, 512)):
            rounds = []
            for _ in range(ROUNDS):
                row = {}
                for transport in ("unary", "stream"):
                    meter = CpuMeter(server.pid)
                    level = asyncio.run(measure_server(server.target, request, clients, candidates, WINDOWS,
                                                       transport=transport))
                    row[transport] = {
                        "throughput": level.throughput,
                        "server_cpu_us": meter.server_us_per_request(level.requests),
                        "client_cpu_us": meter.client_us_per_request(level.requests),
                    }
                rounds.append(row)

            def median(key: str, transport: str, rows=rounds) -> float:
                return float(np.median([r[transport][key] for r in rows]))

            ratios = [r["stream"]["throughput"] / r["unary"]["throughput"] for r in rounds]
            out[name] = {"stream_over_unary_per_round": ratios, "stream_over_unary_median": float(np.median(ratios)),
                         **{f"{key}_median": {t: median(key, t) for t in ("unary", "stream")}
                            for key in ("throughput", "server_cpu_us", "client_cpu_us")}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
