"""`nrctl bench select`: what a stage-2 training step pays for noise selection: uniform noise, in-process
selection, remote selection and remote selection with prefetch, in interleaved rounds. The benchmark is a
library (`noiserater.trainer.bench.select_overhead`, whose docstring describes the method); this command turns
options into its settings and prints or writes the report.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import typer

from noiserater.cli.options import Device, value
from noiserater.cli.output import emit_json, fail, progress_bar, table
from noiserater.trainer.bench.select_overhead import MODES


def bench_select(
    denoisers: str = typer.Option("mlp,unet", help="Comma-separated denoisers: mlp (trains on digits), unet "
                                  "(on digits-image)."),
    modes: str = typer.Option(",".join(MODES), help="Comma-separated modes (uniform always runs); the remote ones "
                              "start a rater-server."),
    rounds: int = typer.Option(3, min=1, help="Interleaved rounds: every mode runs once per round, in turn."),
    mlp_steps: int = typer.Option(300, min=4, help="Training steps per run of the MLP."),
    unet_steps: int = typer.Option(40, min=4, help="Training steps per run of the UNet."),
    warmup_steps: int = typer.Option(10, min=4, help="Steps of the one warm-up run per mode."),
    batch: int = typer.Option(128, min=1, help="Batch size B of a training step."),
    k: int = typer.Option(8, min=2, help="Candidates K per sample."),
    threads: int = typer.Option(1, min=1, help="torch intra-op threads, and the in-process rater's onnxruntime "
                                "intra-op threads."),
    device: Device = typer.Option(Device.cpu, help="Where the denoiser trains (the selection runs on CPU)."),
    rater_mlp: Path | None = typer.Option(None, help="ONNX rater for digits (default: an untrained one)."),
    rater_unet: Path | None = typer.Option(None, help="ONNX rater for digits-image (default: an untrained one)."),
    server_args: str = typer.Option("--device cpu --intra-op-threads 1", help="Flags for the rater-server the "
                                    "bench starts."),
    out: Path | None = typer.Option(None, help="Write the report here as JSON, and as Markdown next to it (.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (progress stays on stderr)."),
) -> None:
    """Milliseconds per stage-2 training step: uniform noise, in-process, remote and remote+prefetch selection."""
    from noiserater.trainer.bench.select_overhead import (
        SelectSettings,
        render_markdown,
        run_select_overhead,
        total_steps,
    )

    names = tuple(d.strip() for d in denoisers.split(",") if d.strip())
    raters = {name: path for name, path in (("mlp", rater_mlp), ("unet", rater_unet)) if path is not None}
    settings = SelectSettings(denoisers=names, modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
                              steps={"mlp": mlp_steps, "unet": unet_steps}, rounds=rounds,
                              warmup_steps=warmup_steps, batch=batch, k=k, threads=threads, device=value(device),
                              raters=raters, server_args=tuple(shlex.split(server_args)))
    try:
        settings.check()
        with progress_bar() as bar:
            task = bar.add_task("bench select", total=total_steps(settings), status="")
            report = run_select_overhead(settings, progress=lambda text: bar.update(task, status=text),
                                         advance=lambda n: bar.advance(task, n))
    except (ValueError, RuntimeError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    report["command"] = "nrctl bench select " + " ".join(shlex.quote(a) for a in sys.argv[3:] if a)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        out.with_suffix(".md").write_text(render_markdown(report))
    if as_json:
        emit_json(report)
        return
    shown = list(next(iter(report["summary"].values()))["ms_per_step"])
    ratios = [key for key in ("local_vs_uniform", "remote_prefetch_vs_local") if key in report["summary"][names[0]]]
    rows = [[name, *(f"{s['ms_per_step'][m]:.2f}" for m in shown), *(f"{s[key]:.3f}x" for key in ratios)]
            for name, s in report["summary"].items()]
    table(f"ms per training step (B={batch}, K={k}, {threads} thread(s), mean of {rounds} rounds)",
          ["denoiser", *(m.replace("_prefetch", "+pf") for m in shown),
           *(key.replace("_vs_", "/").replace("_prefetch", "+pf") for key in ratios)], rows)
    for key, goal in report["goals"].items():
        typer.echo(f"{key} at most {goal['at_most']}: {goal['value']:.3f} ({'met' if goal['met'] else 'not met'})")
    if out is not None:
        typer.echo(f"report written to {out} and {out.with_suffix('.md')}")


def register(bench_app: typer.Typer) -> None:
    bench_app.command("select")(bench_select)
