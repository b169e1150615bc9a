"""How nrctl talks to people and machines: JSON on --json, rich tables otherwise, one-line errors, log lines
and progress bars on stderr (so stdout stays clean for --json)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class LineHandler(logging.Handler):
    """Log records of the noiserater packages as one line each on stderr: `info: ...`, `warning: ...`."""

    STYLES = {"warning": "yellow", "error": "bold red", "critical": "bold red"}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            style = self.STYLES.get(level)
            prefix = f"[{style}]{level}:[/]" if style else f"{level}:"
            err_console.print(prefix, record.getMessage(), highlight=False, soft_wrap=True, markup=True)
        except Exception:  # logging must never break the command
            self.handleError(record)


def setup_logging() -> None:
    """Show the packages' info and warning lines (data normalisation, device choice, fallbacks); idempotent."""
    logger = logging.getLogger("noiserater")
    if not any(isinstance(h, LineHandler) for h in logger.handlers):
        logger.addHandler(LineHandler())
    logger.setLevel(logging.INFO)


def progress_bar(transient: bool = False):
    """nrctl's one progress-bar style (rich, on stderr, also under --json). Tasks take a `status` field:
    `bar.add_task(description, total=n, status="")`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column

    return Progress(TextColumn("[progress.description]{task.description}", table_column=Column(no_wrap=True)),
                    BarColumn(bar_width=20), MofNCompleteColumn(table_column=Column(no_wrap=True)),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                              max_width=40)),
                    console=err_console, transient=transient)


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    out = Table(title=title)
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*(cell(v) for v in row))
    console.print(out)


def cell(value: Any) -> str:
    """A table cell: floats to 6 significant digits, booleans as yes / no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def set_torch_threads() -> int:
    """torch intra-op threads for the tiny proxy models: NOISERATER_THREADS, else OMP_NUM_THREADS, else 1.

    More threads buy little on these models and, on a shared machine, oversubscribed pools made a step up to
    10x (stage 1) and 25x (stage 2) slower in our measurements.
    """
    import torch

    threads = int(os.environ.get("NOISERATER_THREADS") or os.environ.get("OMP_NUM_THREADS") or 1)
    torch.set_num_threads(threads)
    return threads
