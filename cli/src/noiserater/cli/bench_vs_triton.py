"""`nrctl bench serve-vs-triton`: rater-server against Triton Inference Server (through PyTriton) on this machine,
with the same model and thread budget, measured by Triton's perf_analyzer and by the serving benchmark's own
load generator in alternating rounds. The method is `noiserater.trainer.bench.serve_vs_triton`'s docstring;
Triton's environment (made on first use) is described in `noiserater.trainer.bench.triton_env`.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer

from noiserater.cli.options import Transport, value
from noiserater.cli.output import emit_json, fail

DEFAULT_OUT = Path("docs/results/serve-vs-triton.json")


def parse_ints(option: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{option}: {text!r} needs positive integers")
    return values


def bench_serve_vs_triton(
    onnx: Path = typer.Option(..., help="The rater's ONNX file, served by both."),
    model: str = typer.Option("digits", help="Model name on both servers."),
    concurrency: str = typer.Option("1,4,16,64", help="Comma-separated numbers of concurrent clients."),
    samples: str = typer.Option("8,512", help="Comma-separated request sizes, in samples B."),
    k: int = typer.Option(8, min=1, help="Candidates K per sample (top-1 of K)."),
    rounds: int = typer.Option(3, min=1, help="Rounds; each measures every cell on both sides, alternating."),
    threads: int = typer.Option(1, min=1, help="onnxruntime intra-op threads per instance, both servers."),
    instances: int = typer.Option(2, min=1, help="Instances (batches at once), both servers."),
    workers: int = typer.Option(2, min=1, help="rater-server worker processes (--workers); --instances counts over "
                                "all of them."),
    max_delay_ms: float = typer.Option(0.0, min=0.0, help="Dynamic batcher queue delay, both servers."),
    max_batch: int = typer.Option(8192, min=1, help="Triples per onnxruntime run at most, both servers."),
    transport: Transport = typer.Option(Transport.unary, help="The load generator's calls: unary (SelectNoise / "
                                        "ModelInfer) or stream (SelectNoiseStream / ModelStreamInfer)."),
    tools: str = typer.Option("load,perf_analyzer", help="Load generators: load (nrctl's), perf_analyzer."),
    warmup_s: float = typer.Option(0.5, help="Warm-up of each measurement (s)."),
    window_s: float = typer.Option(2.0, help="Measurement window (s)."),
    server_args: str = typer.Option("", help="Extra rater-server flags."),
    baseline_args: str | None = typer.Option(None, help="Also measure a rater-server with these extra flags "
                                             "(e.g. \"--workers 1\"): the after/before ratios of a "
                                             "change, in the same run."),
    triton_env: Path | None = typer.Option(None, help="The PyTriton virtual environment, made when it does not "
                                           "work (default: beside the running one, <venv>-pytriton)."),
    out: Path = typer.Option(DEFAULT_OUT, help="Report JSON; the Markdown report goes beside it (.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (progress stays on stderr)."),
) -> None:
    """rater-server vs Triton Inference Server: throughput and p50/p99 per concurrency level and request size."""
    from noiserater.trainer.bench.serve_vs_triton import (
        TOOLS,
        CompareSettings,
        build_report,
        render_markdown,
        run_comparison,
    )

    try:
        chosen = tuple(t.strip() for t in tools.split(",") if t.strip())
        if not chosen or any(t not in TOOLS for t in chosen):
            raise ValueError(f"--tools: {tools!r}; choose from {', '.join(TOOLS)}")
        if not onnx.is_file():
            raise ValueError(f"--onnx: no such file {onnx}")
        settings = CompareSettings(
            onnx=onnx, model=model, levels=parse_ints("--concurrency", concurrency),
            sizes=parse_ints("--samples", samples), k=k, rounds=rounds, threads=threads, instances=instances,
            workers=workers, max_delay_ms=max_delay_ms, max_batch=max_batch, transport=value(transport), tools=chosen,
            warmup_s=warmup_s, window_s=window_s, server_args=tuple(shlex.split(server_args)),
            baseline_args=tuple(shlex.split(baseline_args)) if baseline_args is not None else None,
            triton_env=triton_env)
        comparison = run_comparison(settings, lambda text: typer.echo(text, err=True))
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    report = build_report(comparison, "nrctl bench serve-vs-triton " + " ".join(shlex.quote(a) for a in sys.argv[3:]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    markdown = out.with_suffix(".md")
    markdown.write_text(render_markdown(report) + "\n")
    if as_json:
        emit_json(report)
        return
    typer.echo(render_markdown(report))
    typer.echo(f"report written to {out} and {markdown}")


def register(bench_app: typer.Typer) -> None:
    bench_app.command("serve-vs-triton")(bench_serve_vs_triton)
