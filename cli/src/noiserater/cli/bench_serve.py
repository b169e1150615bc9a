"""`nrctl bench serve`: serving throughput and latency in the manner of Triton's perf_analyzer, against
in-process onnxruntime and a server with batching off. The benchmark is a library
(`noiserater.trainer.bench.serve_run`, whose docstring describes the method); this command turns options into
its settings and prints or writes the report (`noiserater.trainer.bench.serve_report`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import typer

from noiserater.cli.options import Device, Transport, value
from noiserater.cli.output import emit_json, fail, table
from noiserater.trainer.bench.serve_report import build_report, report_table, summary_lines
from noiserater.trainer.bench.serve_run import ServeSettings, run_serve
from noiserater.trainer.bench.serve_windows import Windows


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--concurrency: {text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--concurrency: {text!r} needs positive integers")
    return tuple(values)


def progress(text: str) -> None:
    """The bench's progress lines: on stderr, also under --json."""
    typer.echo(text, err=True)


def bench_serve(
    target: str | None = typer.Option(None, help="HOST:PORT of the rater-server to measure (batching on). "
                                      "Default: the bench starts one from --onnx."),
    model: str = typer.Option("digits", help="Model name on the server."),
    onnx: Path = typer.Option(..., help="The same model's ONNX file: for the in-process ceiling and the "
                              "batching-off server."),
    concurrency: str = typer.Option("1,4,16,64", help="Comma-separated numbers of concurrent clients."),
    batch: int = typer.Option(64, min=1, help="Samples B per request in the sweep."),
    k: int = typer.Option(8, min=1, help="Candidates K per sample."),
    small_batch: int = typer.Option(1, min=1, help="Samples per request for batched_vs_unbatched_at_16."),
    transport: Transport = typer.Option(Transport.stream, help="stream (one SelectNoiseStream per client) or "
                                        "unary (one SelectNoise call per request)."),
    unbatched_target: str | None = typer.Option(None, help="HOST:PORT of a server run with --max-batch 0; "
                                                "default: the bench starts one."),
    server_args: str = typer.Option("--device auto", help="Extra flags for the servers the bench starts."),
    device: Device = typer.Option(Device.auto, help="onnxruntime device of the in-process ceiling."),
    threads: int = typer.Option(0, help="onnxruntime intra-op threads of the ceiling (0: default)."),
    ceiling_callers: int = typer.Option(0, min=0, help="Parallel in-process callers of the ceiling's "
                                        "second measurement (0: one per CPU core)."),
    warmup_s: float = typer.Option(1.0, help="Warm-up per level (s)."),
    window_s: float = typer.Option(2.0, "--duration-s", "--window-s", help="Measurement window (s)."),
    max_windows: int = typer.Option(5, min=3, help="Windows per level at most (stops at 3 stable ones)."),
    stability: float = typer.Option(0.15, help="Max spread of the last 3 windows, relative to their mean."),
    rounds: int = typer.Option(5, min=1, help="Paired rounds (both sides back to back) behind each summary ratio."),
    token_file: Path | None = typer.Option(None, help="Bearer token file, when the server uses --auth-all."),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", exists=True, dir_okay=False, help="PEM root "
                                       "certificate(s) of --target / --unbatched-target servers that serve TLS."),
    with_perf_analyzer: bool = typer.Option(False, "--perf-analyzer", help="Also measure every level with "
                                            "Triton's perf_analyzer (KServe ModelInfer of the same B x K "
                                            "triples, unary and --streaming) against both servers."),
    out: Path | None = typer.Option(None, help="Write the report JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (progress stays on stderr)."),
) -> None:
    """Throughput and latency per concurrency level, against in-process onnxruntime and batching off."""
    try:
        levels = parse_levels(concurrency)
        if not onnx.is_file():
            raise ValueError(f"--onnx: no such file {onnx}")
        settings = ServeSettings(
            onnx=onnx, model=model, levels=levels, batch=batch, k=k, small_batch=small_batch,
            transport=value(transport), server_args=tuple(shlex.split(server_args)), device=value(device),
            threads=threads,
            ceiling_callers=ceiling_callers or os.cpu_count() or 1,
            windows=Windows(warmup_s, window_s, max_windows, stability), rounds=rounds, target=target,
            unbatched_target=unbatched_target, token_file=token_file, tls_ca=tls_ca,
            perf_analyzer=with_perf_analyzer)
        report = build_report(settings, run_serve(settings, progress))
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    report["command"] = "nrctl bench serve " + " ".join(shlex.quote(a) for a in sys.argv[3:] if a)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if as_json:
        emit_json(report)
        return
    table(*report_table(report))
    for line in summary_lines(report):
        typer.echo(line)
    if out is not None:
        typer.echo(f"report written to {out}")


def register(bench_app: typer.Typer) -> None:
    bench_app.command("serve")(bench_serve)
