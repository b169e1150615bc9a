"""`import noiserater.client` (and its channel and transports) and the admin commands' `--help` (nrctl
deploy, unload, set-default, models, stats) import no torch, scikit-learn or matplotlib: a training job's
client and an admin command must not pay for them. Each check runs in a fresh interpreter, which prints the
modules it ended up with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = {"torch", "sklearn", "matplotlib"}
PRINT_MODULES = "print(json.dumps(sorted(sys.modules)))"


def modules_after(code: str) -> tuple[set[str], str]:
    """The top-level packages loaded once `code` has run, and what it printed before them."""
    proc = subprocess.run([sys.executable, "-c", f"import json, sys\n{code}\n{PRINT_MODULES}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *printed, last = proc.stdout.splitlines()
    return {name.split(".")[0] for name in json.loads(last)}, "\n".join(printed)


def test_client_imports_no_torch():
    loaded, _ = modules_after("import noiserater.client, noiserater.client.channel, noiserater.client.transports\n"
                              "noiserater.client.RaterChannel('localhost:1')")
    assert "grpc" in loaded and not loaded & HEAVY


@pytest.mark.parametrize("command", ["deploy", "unload", "set-default", "models", "stats"])
def test_admin_command_help_imports_no_torch(command):
    code = ("from noiserater.cli.main import app\n"
            f"try:\n    app([{command!r}, '--help'], prog_name='nrctl')\nexcept SystemExit:\n    pass")
    loaded, printed = modules_after(code)
    assert f"nrctl {command}" in printed and "--server" in printed
    assert not loaded & HEAVY


def test_bench_commands_load_when_asked_for():
    code = ("from noiserater.cli.main import app\n"
            "try:\n    app(['bench', '--help'], prog_name='nrctl')\nexcept SystemExit:\n    pass")
    _, printed = modules_after(code)
    assert "serve" in printed and "train" in printed and "Throughput and latency" in printed
