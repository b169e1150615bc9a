"""How nrctl talks to people and machines: JSON on --json, rich tables otherwise, one-line errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


class CliError(Exception):
    """An expected failure: printed as one line, exit code 1."""


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    out = Table(title=title)
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    console.print(out)


def set_torch_threads() -> int:
    """torch intra-op threads for the tiny proxy models: NOISERATER_THREADS, else OMP_NUM_THREADS, else 1.

    More threads buy little on these models and, on a shared machine, oversubscribed pools made a step up to
    10x (stage 1) and 25x (stage 2) slower in our measurements.
    """
    import torch

    threads = int(os.environ.get("NOISERATER_THREADS") or os.environ.get("OMP_NUM_THREADS") or 1)
    torch.set_num_threads(threads)
    return threads
