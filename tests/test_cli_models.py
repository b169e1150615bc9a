"""nrctl export / deploy --repository / models: the offline half of the user's day."""

import json
import os
import subprocess
import sys

import pytest
import torch

from noiserater.core import repository, scoring
from noiserater.trainer.stage1.rater import RATER_FILE, build_rater, save_rater


def nrctl(*args, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "noiserater.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"nrctl {args} failed: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    rater = build_rater("mlp", (64,), 100, hidden=16)
    save_rater(run / RATER_FILE, rater, "mlp", dataset="digits", schedule="linear", rater_kwargs={"hidden": 16},
               provenance={"steps": 3})
    return run


def test_export_deploy_models(run_dir, tmp_path):
    out = tmp_path / "digits.onnx"
    report = json.loads(nrctl("export", run_dir, "--out", out, "--json").stdout)
    assert report["max_abs_diff"] <= report["parity_tolerance"]
    session = scoring.RaterSession(out, device="cpu")
    assert session.info.data_shape == (64,) and session.info.num_timesteps == 100
    assert session.info.dataset == "digits"
    assert json.loads(session.info.metadata[scoring.META_PROVENANCE])["steps"] == 3

    repo = tmp_path / "models"
    first = json.loads(nrctl("deploy", out, "--name", "digits", "--repository", repo, "--json").stdout)
    second = json.loads(nrctl("deploy", out, "--name", "digits", "--repository", repo, "--json").stdout)
    assert (first["version"], second["version"]) == (1, 2)
    assert repository.scan(repo) == {"digits": [1, 2]}
    listed = json.loads(nrctl("models", "--repository", repo, "--json").stdout)
    assert listed["models"][0]["name"] == "digits" and listed["models"][0]["default_version"] == 2
    assert "digits" in nrctl("models", "--repository", repo).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "/nonexistent", "--out", "x.onnx"], "/nonexistent: no such file or folder"),
        (["deploy", "{bad}", "--name", "../escape", "--repository", "{tmp}"], "invalid model name"),
        (["deploy", "{bad}", "--name", "ok", "--repository", "{tmp}"], "model: onnxruntime cannot load it"),
        (["deploy", "{bad}", "--name", "ok", "--repository", "{tmp}", "--server", "localhost:1"], "not both"),
    ],
)
def test_errors_are_one_line(args, message, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    args = [a.format(bad=bad, tmp=tmp_path / "repo") for a in args]
    proc = nrctl(*args, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_deploy_models_stats_on_a_server(tmp_path, rater_onnx):
    """The server half over RaterChannel: deploy with the admin token, list, statistics; an unreachable server
    is one line."""
    from support.server import ServerThread, make_repository

    from noiserater.client.selector import NoiseSelector
    from noiserater.server.config import ServerConfig

    token = tmp_path / "token"
    token.write_text("admin-token\n")
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, auth_token_file=str(token))
    with ServerThread(config) as server:
        refused = nrctl("deploy", rater_onnx, "--name", "digits", "--server", server.target, check=False)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        deployed = json.loads(nrctl("deploy", rater_onnx, "--name", "digits", "--token-file", token, "--json",
                                    env={"NOISERATER_SERVER": server.target}).stdout)  # the default server
        assert deployed == {"name": "digits", "version": 2, "server": server.target}
        listed = json.loads(nrctl("models", "--server", server.target, "--json").stdout)["models"]
        assert [(m["name"], m["default_version"], len(m["versions"])) for m in listed] == [("digits", 2, 2)]
        with NoiseSelector.remote(server.target, model="digits", dataset="cli", num_candidates=2) as selector:
            selector.select(torch.rand(3, 64), torch.randint(0, 100, (3,)))
        stats = json.loads(nrctl("stats", "--server", server.target, "--dataset", "cli", "--json").stdout)
        assert sum(b["count"] for b in stats["buckets"]) == 6 and stats["buckets"][0]["version"] == 2
        misspelt = nrctl("stats", "--server", server.target, "--dataset", "clj", check=False)
        assert misspelt.returncode == 1 and "no statistics for dataset 'clj'" in misspelt.stderr
        assert len(misspelt.stderr.strip().splitlines()) == 1
    from support import free_port

    unreachable = nrctl("models", "--server", f"127.0.0.1:{free_port()}", check=False)
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1


def invoke(*args):
    """nrctl in this process (the subprocess of `nrctl` above costs seconds of imports per call)."""
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_export_mistakes_are_one_line(run_dir, tmp_path):
    """An ONNX file (or any non-rater file) where a run is expected, and a folder as --out: one line, exit 1."""
    onnx = tmp_path / "digits.onnx"
    invoke("export", run_dir, "--out", onnx)
    (tmp_path / "some_dir").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for args, message in [
        ((onnx, "--out", tmp_path / "x.onnx"), "an exported ONNX model, not a trained rater"),
        ((tmp_path / "junk.pt", "--out", tmp_path / "x.onnx"), "not a rater checkpoint"),
        ((run_dir, "--out", tmp_path / "some_dir"), "is a folder; give the ONNX file to write"),
        ((run_dir, "--out", onnx / "x.onnx"), "cannot write"),
    ]:
        proc = invoke("export", *args)
        assert proc.exit_code == 1 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_export_reads_a_pretrained_folder(tmp_path):
    from noiserater.trainer.stage1.rater import save_pretrained

    torch.manual_seed(0)
    folder = save_pretrained(tmp_path / "rater", build_rater("mlp", (64,), 100, hidden=16), "mlp",
                             dataset="digits", rater_kwargs={"hidden": 16}, provenance={"steps": 5})
    report = json.loads(invoke("export", folder, "--out", tmp_path / "m.onnx", "--json").stdout)
    assert report["max_abs_diff"] <= report["parity_tolerance"]
    assert json.loads(report["metadata"][scoring.META_PROVENANCE])["steps"] == 5


def test_models_repository_mistakes(tmp_path, rater_onnx):
    """A missing folder is an error, not an empty list; a version that does not load is INVALID, with the
    reason, and not the default."""
    for path, message in [(tmp_path / "no-such-dir", "no such folder"), (rater_onnx, "not a folder")]:
        proc = invoke("models", "--repository", path)
        assert proc.exit_code == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    repo = tmp_path / "repo"
    repository.write_version(repo, "digits", rater_onnx.read_bytes())
    repository.write_version(repo, "digits", b"corrupt")
    listed = json.loads(invoke("models", "--repository", repo, "--json").stdout)["models"]
    assert listed[0]["default_version"] == 1
    assert [(v["version"], v["state"]) for v in listed[0]["versions"]] == [(1, "ON_DISK"), (2, "INVALID")]
    assert "onnxruntime cannot load it" in listed[0]["versions"][1]["reason"]
    assert "2 (INVALID" in invoke("models", "--repository", repo).stdout


def test_deploy_to_a_server_without_admin_is_one_line(tmp_path, rater_onnx):
    """A server started without --auth-token-file or --insecure-admin refuses deploys: nrctl says so in one line."""
    from support.server import ServerThread, make_repository

    from noiserater.server.config import ServerConfig

    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0)) as server:
        refused = invoke("deploy", rater_onnx, "--name", "digits", "--server", server.target)
    assert refused.exit_code == 1 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "PERMISSION_DENIED" in line and "--auth-token-file" in line and "--insecure-admin" in line


def test_admin_commands_on_several_replicas(tmp_path, rater_onnx):
    """--server repeated or comma-separated (or $NOISERATER_SERVER with commas): every replica is asked and
    reported on its own, a line or a JSON object each; one that cannot be reached is reported as such, the others
    are still done, and the command exits 1. A deploy gives the version the first replica chose on every one."""
    from support import free_port
    from support.server import ServerThread, make_repository

    from noiserater.client.selector import NoiseSelector
    from noiserater.server.config import ServerConfig

    token = tmp_path / "token"
    token.write_text("admin-token\n")
    configs = [ServerConfig(repository=make_repository(tmp_path / f"repo{n}", {"digits": [rater_onnx] * n}),
                            host="127.0.0.1", port=0, auth_token_file=str(token)) for n in (2, 1)]
    down = f"127.0.0.1:{free_port()}"
    with ServerThread(configs[0]) as first, ServerThread(configs[1]) as second:
        both = f"{first.target},{second.target}"
        listed = invoke("models", "--server", both, "--server", down, "--json")
        assert listed.exit_code == 1
        replies = json.loads(listed.stdout)
        assert [r["server"] for r in replies] == [first.target, second.target, down]
        assert [[v["version"] for v in r["models"][0]["versions"]] for r in replies[:2]] == [[1, 2], [1]]
        assert "UNAVAILABLE" in replies[2]["error"] and "models" not in replies[2]
        (line,) = listed.stderr.strip().splitlines()
        assert line.startswith(f"error: {down}: UNAVAILABLE")

        deployed = invoke("deploy", rater_onnx, "--name", "digits", "--server", both, "--token-file", token, "--json")
        assert deployed.exit_code == 0, deployed.stderr
        assert json.loads(deployed.stdout) == [{"name": "digits", "version": 3, "server": first.target},
                                               {"name": "digits", "version": 3, "server": second.target}]
        pinned = invoke("set-default", "digits", "1", "--server", first.target, "--server", second.target,
                        "--server", down, "--token-file", token)
        assert pinned.exit_code == 1
        assert pinned.stdout.splitlines() == [f"digits: default version is now 1 ({first.target})",
                                              f"digits: default version is now 1 ({second.target})"]
        assert pinned.stderr.strip().splitlines()[0].startswith(f"error: {down}: ")
        assert len(pinned.stderr.strip().splitlines()) == 1
        from typer.testing import CliRunner

        from noiserater.cli.main import app

        unloaded = CliRunner().invoke(app, ["unload", "digits", "--version", "3", "--token-file", str(token)],
                                      env={"NOISERATER_SERVER": both})
        assert unloaded.exit_code == 0 and len(unloaded.stdout.splitlines()) == 2, unloaded.stderr
        for server in (first, second):
            listing = json.loads(invoke("models", "--server", server.target, "--json").stdout)
            assert listing["server"] == server.target and listing["models"][0]["default_version"] == 1

        with NoiseSelector.remote(first.target, model="digits", dataset="replicas-cli", num_candidates=2) as selector:
            selector.select(torch.rand(3, 64), torch.randint(0, 100, (3,)))
        stats = invoke("stats", "--server", both, "--dataset", "replicas-cli", "--json")
        assert stats.exit_code == 1  # the second replica keeps its statistics in its own memory: none there
        replies = json.loads(stats.stdout)
        assert sum(b["count"] for b in replies[0]["buckets"]) == 6
        assert replies[1]["server"] == second.target and "no statistics" in replies[1]["error"]
        table = invoke("stats", "--server", both, "--dataset", "replicas-cli")
        assert f"on {first.target}" in table.stdout and f"{second.target}: no statistics" in table.stderr
