"""nrctl export / deploy / unload / set-default / models / stats: from a trained rater to a served, inspected
model, and through its lifecycle on a server (a rollback is a set-default to the previous version).

The server commands take several servers (`--server` repeated, or comma-separated): the replicas of one
service. Each replica is asked on its own, one after another, and reported on its own: a line (or a table)
per replica, and under `--json` a list with one object per replica, in the order given, each naming its
`server` and holding either the answer or an `error`. A replica that fails does not stop the others; the
command then exits 1. With one server the output is as it always was (under `--json` one object, which also
names its `server`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from noiserater.cli.output import console, emit_json, err_console, fail, table

SERVER_ENV = "NOISERATER_SERVER"
TOKEN_ENV = "NOISERATER_TOKEN"
DEFAULT_SERVER = "localhost:50051"
TIMEOUT_S = 30.0

ServerOpt = typer.Option([DEFAULT_SERVER], "--server", envvar=SERVER_ENV,
                         help="Rater server HOST:PORT; repeat it or separate by commas to address several replicas, "
                              "each on its own.")
JsonOpt = typer.Option(False, "--json", help="Print JSON for machines instead of a table.")
TokenFileOpt = typer.Option(None, "--token-file", help="File holding the admin bearer token.",
                            exists=True, dir_okay=False)
TokenOpt = typer.Option(None, "--token", envvar=TOKEN_ENV, help="The admin bearer token itself, when no "
                        "--token-file is given (better set in the environment than on a command line).")
TlsCaOpt = typer.Option(None, "--tls-ca", envvar="NOISERATER_TLS_CA", exists=True, dir_okay=False,
                        help="PEM root certificate(s): talk TLS to the server and verify it against these.")


def server_targets(servers: list[str] | str | None) -> list[str]:
    """The servers named by --server (repeated and/or comma-separated), each once, in order; the default
    server when none is named."""
    if isinstance(servers, str):
        servers = [servers]
    targets: list[str] = []
    for value in servers or []:
        for part in value.split(","):
            if part.strip() and part.strip() not in targets:
                targets.append(part.strip())
    return targets or [DEFAULT_SERVER]


class ReplicaFailure(Exception):
    """One server's failure, reported for that server while the others go on."""


def on_each_server(targets: list[str], token: str | None, tls_ca: Path | None,
                   ask: Callable[[Any, str], dict]) -> list[dict]:
    """`ask(channel, target)` on every server in turn: [{"server": target, **answer}] or, for a server that
    failed, {"server": target, "error": "..."}."""
    import grpc

    from noiserater.client.channel import ChannelError, RaterChannel

    results = []
    for target in targets:
        try:
            channel = RaterChannel(target, token=token, timeout_s=TIMEOUT_S, max_attempts=1,
                                   tls_root_cert=tls_ca.read_bytes() if tls_ca is not None else None)
        except ChannelError as exc:
            results.append({"server": target, "error": str(exc)})
            continue
        try:
            results.append({"server": target, **ask(channel, target)})
        except grpc.RpcError as exc:
            results.append({"server": target, "error": f"{exc.code().name}: {exc.details()}"})
        except ReplicaFailure as exc:
            results.append({"server": target, "error": str(exc)})
        finally:
            channel.close()
    return results


def report(results: list[dict], as_json: bool, show: Callable[[dict], None]) -> None:
    """Print every server's result (`show` for one that answered; an error line on stderr for one that failed)
    or, with `as_json`, the one result as an object or several as a list; exit 1 when a server failed."""
    failed = [r for r in results if "error" in r]
    if as_json and (len(results) > 1 or not failed):
        emit_json(results if len(results) > 1 else results[0])
    for result in results:
        if "error" in result:
            err_console.print(f"[bold red]error:[/] {result['server']}: {result['error']}", highlight=False,
                              soft_wrap=True)
        elif not as_json:
            show(result)
    if failed:
        raise typer.Exit(1)


def read_token(token_file: Path | None, token: str | None = None) -> str | None:
    """The admin token: from --token-file, else --token (or its environment variable)."""
    if token_file is not None:
        return token_file.read_text().strip()
    return token or None


def export(
    run: Path = typer.Argument(..., help="A trained rater: a train-rater RUN_DIR, its rater.pt, or a folder with "
                               "model.safetensors + config.json."),
    out: Path = typer.Option(..., "--out", "-o", help="The ONNX file to write."),
    as_json: bool = JsonOpt,
) -> None:
    """Export a trained rater to ONNX with metadata; parity with torch is checked."""
    from noiserater.trainer.stage1.export import ParityError, export_rater
    from noiserater.trainer.stage1.rater import RaterLoadError, load_rater, rater_source

    if out.is_dir():
        fail(f"--out {out} is a folder; give the ONNX file to write, e.g. {out / 'rater.onnx'}")
    try:
        checkpoint = rater_source(run)
        rater, info = load_rater(checkpoint)
    except RaterLoadError as exc:
        fail(f"cannot export: {exc}")
    try:
        report = export_rater(rater, out, dataset=info.get("dataset", ""), schedule=info.get("schedule", ""),
                              objective=info.get("objective") or "eps", meta_objective=info.get("meta_objective", ""),
                              provenance={"checkpoint": str(checkpoint.resolve()), **info.get("provenance", {})})
    except ParityError as exc:
        fail(f"export failed the parity check: {exc}")
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
        fail(f"cannot write {out}: {exc.strerror or exc}{where}")
    except (KeyError, RuntimeError, ValueError) as exc:
        fail(f"cannot export {checkpoint}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if as_json:
        emit_json(report.to_dict())
        return
    table(f"exported {out}", ["field", "value"], [
        ["data shape", report.metadata["noiserater.data_shape"]],
        ["timesteps", report.metadata["noiserater.num_timesteps"]],
        ["objective", report.metadata["noiserater.objective"]],
        ["dataset", report.metadata["noiserater.dataset"] or "-"],
        ["size (bytes)", report.size_bytes],
        ["max |torch - onnx|", report.max_abs_diff],
    ])


def deploy(
    model: Path = typer.Argument(..., help="The ONNX file to deploy.", exists=True, dir_okay=False),
    name: str = typer.Option(..., "--name", help="Model name in the repository."),
    repository: Path | None = typer.Option(None, "--repository", help="Write into this model repository folder."),
    server: list[str] | None = typer.Option(None, "--server", envvar=SERVER_ENV, help="Upload to this rater server "
                                            f"HOST:PORT (the default, {DEFAULT_SERVER}, unless --repository is "
                                            "given); repeat it or separate by commas for several replicas."),
    version: int = typer.Option(0, "--version", help="Version number; 0 = newest + 1."),
    token_file: Path | None = TokenFileOpt,
    token: str | None = TokenOpt,
    tls_ca: Path | None = TlsCaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Deploy an ONNX rater as a new version: into a repository folder (written atomically: servers watching it
    with --repository-poll-s load it), or hot-loaded on a server. On several servers the version the first one
    gives it is the version deployed on the others, so every replica serves it under one number."""
    from noiserater.core import repository as repo
    from noiserater.core import scoring

    if repository is not None and server:
        fail("give one of --repository DIR or --server HOST:PORT, not both")
    data = model.read_bytes()
    if repository is not None:
        try:
            repo.check_model_name(name)
            session = scoring.RaterSession(data, device="cpu")
            session.warm_up()
            version, path = repo.write_version(repository, name, data, version)
        except (scoring.ScoringError, repo.RepositoryError) as exc:
            fail(f"{model}: {exc}")
        result = {"name": name, "version": version, "path": str(path)}
        if as_json:
            emit_json(result)
        else:
            typer.echo(f"deployed {name} version {version} ({path})")
        return
    from noiserater.core.v1 import rater_service_pb2 as pb

    chosen = version

    def upload(channel, target: str) -> dict:
        nonlocal chosen
        response = channel.call("DeployModel", pb.DeployModelRequest(name=name, version=chosen, onnx=data))
        chosen = chosen or response.model.version
        return {"name": response.model.name, "version": response.model.version}

    results = on_each_server(server_targets(server), read_token(token_file, token), tls_ca, upload)
    report(results, as_json, lambda r: typer.echo(f"deployed {r['name']} version {r['version']} ({r['server']})"))


def unload(
    name: str = typer.Argument(..., help="Model name on the server."),
    version: int = typer.Option(0, "--version", help="Only this version; 0 = every version of the model."),
    server: list[str] | None = ServerOpt,
    token_file: Path | None = TokenFileOpt,
    token: str | None = TokenOpt,
    tls_ca: Path | None = TlsCaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Stop serving a model version, or all its versions, on a server; its files stay in the repository."""
    from noiserater.core.v1 import rater_service_pb2 as pb

    which = f"version {version}" if version else "every version"
    admin_call(server, read_token(token_file, token), tls_ca, "UnloadModel",
               pb.UnloadModelRequest(model=pb.ModelRef(name=name, version=version)),
               {"name": name, "version": version or "all"}, f"unloaded {name} {which}", as_json)


def set_default(
    name: str = typer.Argument(..., help="Model name on the server."),
    version: int = typer.Argument(..., help="The loaded version that requests naming no version get."),
    server: list[str] | None = ServerOpt,
    token_file: Path | None = TokenFileOpt,
    token: str | None = TokenOpt,
    tls_ca: Path | None = TlsCaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Make a loaded version the model's default on a server (a rollback: the previous version)."""
    from noiserater.core.v1 import rater_service_pb2 as pb

    admin_call(server, read_token(token_file, token), tls_ca, "SetDefaultVersion",
               pb.SetDefaultVersionRequest(model=pb.ModelRef(name=name, version=version)),
               {"name": name, "default_version": version}, f"{name}: default version is now {version}", as_json)


def admin_call(server: list[str] | None, token: str | None, tls_ca: Path | None, method: str, request,
               result: dict, done: str, as_json: bool) -> None:
    """One admin RPC whose answer is empty, on every server, then what it did on each: `result` (with the
    server) as JSON, or the `done` line."""

    def call(channel, target: str) -> dict:
        channel.call(method, request)
        return result

    report(on_each_server(server_targets(server), token, tls_ca, call), as_json,
           lambda r: typer.echo(f"{done} ({r['server']})"))


def models(
    server: list[str] | None = ServerOpt,
    tls_ca: Path | None = TlsCaOpt,
    repository: Path | None = typer.Option(None, "--repository", help="List a repository folder instead (each "
                                           "version is loaded to check it: ON_DISK, or INVALID with the reason)."),
    as_json: bool = JsonOpt,
) -> None:
    """List models and versions on a server (or in a repository folder), each version with the objective its
    rater was trained for (eps or flow)."""
    if repository is not None:
        rows = repository_rows(repository)
        if as_json:
            emit_json({"models": rows})
        else:
            models_table("models", rows)
        return
    from noiserater.core.v1 import rater_service_pb2 as pb

    def listing(channel, target: str) -> dict:
        response = channel.call("ListModels", pb.ListModelsRequest())
        return {"models": [{"name": m.name, "default_version": m.default_version,
                            "versions": [{"version": v.version, "state": v.state,
                                          "objective": _served_objective(channel, m.name, v.version)}
                                         for v in m.versions]}
                           for m in response.models]}

    targets = server_targets(server)
    results = on_each_server(targets, None, tls_ca, listing)
    report(results, as_json, lambda r: models_table("models" if len(targets) == 1 else f"models on {r['server']}",
                                                    r["models"]))


def models_table(title: str, rows: list[dict]) -> None:
    table(title, ["name", "versions", "default"], [
        [m["name"], ", ".join(f"{v['version']} ({v['state']}{', ' + v['objective'] if v.get('objective') else ''}"
                              f"{': ' + v['reason'] if v.get('reason') else ''})"
                              for v in m["versions"]), m["default_version"] or "-"]
        for m in rows
    ])


def _served_objective(channel, name: str, version: int) -> str:
    """The objective a served version was trained for, from its metadata ("" when it cannot be asked: a
    version unloaded meanwhile)."""
    import grpc

    from noiserater.core import scoring
    from noiserater.core.v1 import rater_service_pb2 as pb

    try:
        response = channel.call("GetModelMetadata",
                                pb.GetModelMetadataRequest(model=pb.ModelRef(name=name, version=version)))
    except grpc.RpcError:
        return ""
    return response.metadata.get(scoring.META_OBJECTIVE) or scoring.DEFAULT_OBJECTIVE


def repository_rows(repository: Path) -> list[dict]:
    """The models of a repository folder as `models` lists them: each version loaded with onnxruntime (as the
    server would load it), ON_DISK when it loads, INVALID with the reason when not; the default is the newest
    valid version (0: none)."""
    from noiserater.core import repository as repo
    from noiserater.core.scoring import RaterSession, ScoringError

    if not repository.is_dir():
        fail(f"--repository {repository}: {'not a folder' if repository.exists() else 'no such folder'}")
    rows = []
    for name, versions in repo.scan(repository).items():
        listed = []
        for version in versions:
            try:
                session = RaterSession(repo.version_dir(repository, name, version) / repo.MODEL_FILE, device="cpu")
                listed.append({"version": version, "state": "ON_DISK", "objective": session.info.objective})
            except (ScoringError, OSError) as exc:
                listed.append({"version": version, "state": "INVALID", "reason": str(exc).splitlines()[0]})
        valid = [v["version"] for v in listed if v["state"] == "ON_DISK"]
        rows.append({"name": name, "versions": listed, "default_version": valid[-1] if valid else 0})
    return rows


def stats(
    dataset: str = typer.Option("", "--dataset", help="Only this dataset."),
    model: str = typer.Option("", "--model", help="Only this model."),
    version: int = typer.Option(0, "--version", help="Only this version (0 = all)."),
    server: list[str] | None = ServerOpt,
    tls_ca: Path | None = TlsCaOpt,
    redis_url: str | None = typer.Option(None, "--redis-url", help="Read the statistics straight from the Redis "
                                         "the servers flush into (redis://HOST:PORT/DB); no server needed. "
                                         "Without it, a running server (--server) is asked."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw the score distribution of each timestep "
                                     "range, per model version, into this PNG file.", dir_okay=False),
    as_json: bool = JsonOpt,
) -> None:
    """Show the shared per-dataset score statistics (count, mean, std, min, max per timestep range)."""
    from noiserater.cli import stats_view
    from noiserater.core.stats_layout import TIMESTEP_BUCKETS

    asked = ", ".join(f"{k} {v!r}" for k, v in (("dataset", dataset), ("model", model), ("version", version)) if v)
    nothing = f"no statistics{' for ' + asked if asked else ''} (nothing scored yet, or a misspelt name)"
    if redis_url:  # no server is asked
        try:
            rows = stats_view.rows_from_redis(redis_url, dataset, model, version)
        except Exception as exc:  # redis raises its own connection and URL errors
            fail(f"--redis-url {redis_url}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        if not rows:
            fail(nothing)
        if plot is not None:
            stats_view.plot(rows, plot)
        show_stats({"buckets": rows}, as_json, "")
        if plot is not None and not as_json:
            console.print(f"plot: {plot}")
        return
    from noiserater.core.v1 import rater_service_pb2 as pb

    def read(channel, target: str) -> dict:
        buckets, token = [], ""
        while True:  # every page: the server answers at most a bounded number of buckets per call
            response = channel.call("GetStats", pb.GetStatsRequest(dataset=dataset, model=model, version=version,
                                                                   page_token=token))
            buckets.extend(response.buckets)
            token = response.next_page_token
            if not token:
                break
        rows = stats_view.rows_from_response(buckets)
        if not rows:
            raise ReplicaFailure(nothing)
        return {"timestep_buckets": TIMESTEP_BUCKETS, "buckets": rows}

    targets = server_targets(server)
    results = on_each_server(targets, None, tls_ca, read)
    answered = [r for r in results if "error" not in r]
    if plot is not None and answered:  # the first replica's: with a shared Redis every replica reads the same
        stats_view.plot(answered[0]["buckets"], plot)
    try:
        report(results, as_json, lambda r: show_stats(r, False, r["server"] if len(targets) > 1 else ""))
    finally:
        if plot is not None and answered and not as_json:
            console.print(f"plot: {plot}")


def show_stats(result: dict, as_json: bool, server: str) -> None:
    """One statistics table (`server` named in its title when several are asked), or the JSON object."""
    from noiserater.cli import stats_view
    from noiserater.core.stats_layout import TIMESTEP_BUCKETS

    rows = result["buckets"]
    if as_json:
        emit_json({"timestep_buckets": TIMESTEP_BUCKETS, "buckets": rows})
        return
    columns, cells, title = stats_view.TABLE_COLUMNS, stats_view.table_rows(rows), "score statistics"
    if len({r["dataset"] for r in rows}) == 1:  # one dataset: named in the title, its column left out
        columns, cells, title = columns[1:], [c[1:] for c in cells], f"score statistics of dataset {rows[0]['dataset']}"
    table(f"{title} on {server}" if server else title, columns, cells)


def register(app: typer.Typer) -> None:
    for name, command in (("export", export), ("deploy", deploy), ("unload", unload), ("set-default", set_default),
                          ("models", models), ("stats", stats)):
        app.command(name)(command)
