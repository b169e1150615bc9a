"""nrctl: train, export, deploy, inspect and benchmark NoiseRater raters.

Each command lives in its own module; this file only wires them into one Typer app. Errors are
reported as one line on stderr with a non-zero exit (see `noiserater.cli.output.fail`).
"""

from __future__ import annotations

import typer

import noiserater.cli.bench_serve as bench_serve
from noiserater.cli import bench_train_cmd, models_cmds, quickstart, train_cmd

app = typer.Typer(
    name="nrctl",
    help="NoiseRater: meta-learn a noise rater, export it, serve it, and measure whether it pays off.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that write reports (efficacy of training; serving throughput).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

models_cmds.register(app)
train_cmd.register(app)
quickstart.register(app)
bench_train_cmd.register(bench_app)
bench_serve.register(bench_app)


if __name__ == "__main__":
    app()
