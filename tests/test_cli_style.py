"""nrctl's conventions: --version, shell completion, choices as enums in help, defaults and environment
variables shown and honoured through Typer, and output that reads right (goals with enough digits, yes/no,
tables that fit 80 columns, the quickstart verdict in words)."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
from rich.console import Console
from support import free_port
from typer.testing import CliRunner

from noiserater.cli import options
from noiserater.cli.main import app


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_version_and_completion():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"nrctl {version('noiserater-cli')}"
    help_text = invoke("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text


@pytest.mark.parametrize("command, choices", [
    (["train-rater"], ["auto|cpu|cuda", "exact|fast", "auto|nchw|nhwc", "none|tensorboard"]),
    (["bench", "train"], ["auto|mlp|unet", "auto|nchw|nhwc"]),
    (["bench", "serve"], ["stream|unary", "auto|cpu|cuda"]),
    (["bench", "variance"], ["eps|flow", "auto|mlp|unet"]),
])
def test_choices_are_listed_in_help(command, choices):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    for choice in choices:
        assert choice in result.stdout, choice


def test_enums_match_the_libraries():
    from noiserater.client.transports import TRANSPORTS
    from noiserater.trainer.stage1.meta import META_GRAD_ROUTES
    from noiserater.trainer.stage1.train import LOGGERS
    from noiserater.trainer.substrate.data import LAYOUTS
    from noiserater.trainer.substrate.diffusion import OBJECTIVES

    assert [t.value for t in options.Transport] == list(TRANSPORTS)
    assert sorted(m.value for m in options.MetaGrad) == sorted(META_GRAD_ROUTES)
    assert [lay.value for lay in options.Layout] == list(LAYOUTS)
    assert [lw.value for lw in options.LogWith] == ["none", *LOGGERS]
    assert [o.value for o in options.Objective] == list(OBJECTIVES)


@pytest.mark.parametrize("command", ["models", "stats"])
def test_default_target_and_env_var_in_help(command):
    text = " ".join(invoke(command, "--help").stdout.split())
    assert "[env var: NOISERATER_SERVER]" in text and "[default: localhost:50051]" in text


def test_server_env_var_is_honoured():
    target = f"127.0.0.1:{free_port()}"
    result = invoke("models", env={"NOISERATER_SERVER": target})
    assert result.exit_code == 1 and target in result.stderr and "UNAVAILABLE" in result.stderr


def test_serve_report_reads_right():
    from noiserater.cli.output import table
    from noiserater.trainer.bench.serve_report import against_goal, report_table, summary_lines

    assert against_goal(0.6977, 0.7) == "0.698" and against_goal(0.35, 0.7) == "0.35"
    assert against_goal(0.7, 0.7) == "0.70" and against_goal(0.69999999999, 0.7) == "just below 0.7"
    with open("docs/results/serve-report.json") as fh:
        report = json.load(fh)
    report["summary"]["best_vs_ceiling"] = 0.6977
    assert "best_vs_ceiling: 0.698 (goal >= 0.7; MISSED)" in summary_lines(report)
    title, columns, rows = report_table(report)
    assert {row[-1] for row in rows} == {"yes"} and {row[1] for row in rows} >= {"batched", "in-process"}
    console = Console(width=80, record=True)
    import noiserater.cli.output as output

    saved, output.console = output.console, console
    try:
        table(title, columns, rows)
    finally:
        output.console = saved
    rendered = console.export_text()
    assert all(name in rendered for name in columns) and "…" not in rendered


def test_quickstart_verdict_in_words():
    from noiserater.cli.quickstart import verdict_line

    line = verdict_line({"val_loss": "rater worse", "frechet": "rater better"})
    assert line.endswith(": val_loss: rater worse, frechet: rater better") and "{" not in line


def test_bench_train_cells_without_error_bars_for_one_seed():
    from noiserater.cli.bench_train_cmd import cell

    paired = {"mean": 0.0228, "se": float("nan"), "lower_beyond_2se": False, "higher_beyond_2se": False}
    assert cell({"mean": 0.1173, "std": 0.0}, paired, seeds=1) == "0.1173 (Δ +0.0228)"
    paired3 = {"mean": 0.0036, "se": 0.0005, "lower_beyond_2se": False, "higher_beyond_2se": True}
    assert cell({"mean": 0.1209, "std": 0.001}, paired3, seeds=3) == "0.1209 ± 0.001 (Δ +0.0036 ± 0.0005 worse)"
