"""nrctl: train, export, deploy, inspect and benchmark NoiseRater raters.

Each command lives in its own module; this file only wires them into one Typer app. Starting nrctl imports
no torch, scikit-learn or matplotlib: the command modules imported here keep those imports inside the
command bodies, and the `bench` commands are imported only when one of them (or `nrctl bench --help`) runs.
Errors are reported as one line on stderr with a non-zero exit (see `noiserater.cli.output.fail`); the
packages' info and warning log lines, and progress bars, go to stderr too.
"""

from __future__ import annotations

import importlib

import click
import typer
from typer.core import TyperGroup

from noiserater.cli import models_cmds, quickstart, train_cmd
from noiserater.cli.output import setup_logging

DISTRIBUTION = "noiserater-cli"

# bench subcommand -> the module whose register(typer_app) adds it, in the order `nrctl bench --help` lists them
BENCH_COMMANDS = {"train": "noiserater.cli.bench_train_cmd", "serve": "noiserater.cli.bench_serve",
                  "serve-vs-triton": "noiserater.cli.bench_vs_triton", "select": "noiserater.cli.bench_select",
                  "variance": "noiserater.cli.bench_variance_cmd"}


class LazyBenchGroup(TyperGroup):
    """The `bench` group: a subcommand's module is imported the first time the subcommand is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*BENCH_COMMANDS, *(name for name in super().list_commands(ctx) if name not in BENCH_COMMANDS)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in BENCH_COMMANDS and name not in self.commands:
            module = importlib.import_module(BENCH_COMMANDS[name])
            loaded = typer.Typer(add_completion=False)
            module.register(loaded)
            self.add_command(typer.main.get_group(loaded).commands[name], name)
        return super().get_command(ctx, name)


app = typer.Typer(
    name="nrctl",
    help="NoiseRater: meta-learn a noise rater, export it, serve it, and measure whether it pays off.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def show_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"nrctl {version(DISTRIBUTION)}")
        except PackageNotFoundError:  # run from a source tree that is not installed
            typer.echo("nrctl (version unknown: noiserater-cli is not installed)")
        raise typer.Exit()


@app.callback()
def main(
    _version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                  help="Show nrctl's version and exit."),
) -> None:
    """NoiseRater: meta-learn a noise rater, export it, serve it, and measure whether it pays off."""
    setup_logging()

bench_app = typer.Typer(help="Benchmarks that write reports (efficacy of training; serving throughput; "
                        "selection cost per training step; the gradient variance noise selection could remove).",
                        no_args_is_help=True, cls=LazyBenchGroup)
app.add_typer(bench_app, name="bench")

models_cmds.register(app)
train_cmd.register(app)
quickstart.register(app)


if __name__ == "__main__":
    app()
