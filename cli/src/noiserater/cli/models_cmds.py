"""nrctl export / deploy / unload / set-default / models / stats: from a trained rater to a served, inspected
model, and through its lifecycle on a server (a rollback is a set-default to the previous version)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from noiserater.cli.output import console, emit_json, fail, table

SERVER_ENV = "NOISERATER_SERVER"
TOKEN_ENV = "NOISERATER_TOKEN"
DEFAULT_SERVER = "localhost:50051"
TIMEOUT_S = 30.0

ServerOpt = typer.Option(DEFAULT_SERVER, "--server", envvar=SERVER_ENV, help="Rater server HOST:PORT.")
JsonOpt = typer.Option(False, "--json", help="Print JSON for machines instead of a table.")
TokenFileOpt = typer.Option(None, "--token-file", help="File holding the admin bearer token.",
                            exists=True, dir_okay=False)
TokenOpt = typer.Option(None, "--token", envvar=TOKEN_ENV, help="The admin bearer token itself, when no "
                        "--token-file is given (better set in the environment than on a command line).")
TlsCaOpt = typer.Option(None, "--tls-ca", envvar="NOISERATER_TLS_CA", exists=True, dir_okay=False,
                        help="PEM root certificate(s): talk TLS to the server and verify it against these.")


def server_target(server: str | None) -> str:
    return server or DEFAULT_SERVER


def read_token(token_file: Path | None, token: str | None = None) -> str | None:
    """The admin token: from --token-file, else --token (or its environment variable)."""
    if token_file is not None:
        return token_file.read_text().strip()
    return token or None


@contextlib.contextmanager
def rater_channel(server: str | None, token: str | None = None, tls_ca: Path | None = None):
    """A RaterChannel to the server, over TLS when `tls_ca` is given (no retries: a retried deploy could add a
    version twice); any gRPC error inside the block becomes one line and exit code 1."""
    import grpc

    from noiserater.client.channel import ChannelError, RaterChannel

    try:
        channel = RaterChannel(server_target(server), token=token, timeout_s=TIMEOUT_S, max_attempts=1,
                               tls_root_cert=tls_ca.read_bytes() if tls_ca is not None else None)
    except ChannelError as exc:
        fail(str(exc))
    try:
        yield channel
    except grpc.RpcError as exc:
        fail(f"{channel.target}: {exc.code().name}: {exc.details()}")
    finally:
        channel.close()


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
        ["dataset", report.metadata["noiserater.dataset"] or "-"],
        ["size (bytes)", report.size_bytes],
        ["max |torch - onnx|", report.max_abs_diff],
    ])


def deploy(
    model: Path = typer.Argument(..., help="The ONNX file to deploy.", exists=True, dir_okay=False),
    name: str = typer.Option(..., "--name", help="Model name in the repository."),
    repository: Path | None = typer.Option(None, "--repository", help="Write into this model repository folder."),
    server: str | None = typer.Option(None, "--server", envvar=SERVER_ENV, help="Upload to this rater server "
                                      f"HOST:PORT (the default, {DEFAULT_SERVER}, unless --repository is given)."),
    version: int = typer.Option(0, "--version", help="Version number; 0 = newest + 1."),
    token_file: Path | None = TokenFileOpt,
    token: str | None = TokenOpt,
    tls_ca: Path | None = TlsCaOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Deploy an ONNX rater as a new version: into a repository folder, or hot-loaded on a server."""
    from noiserater.core import repository as repo
    from noiserater.core import scoring

    if repository is not None and server is not None:
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
    else:
        from noiserater.core.v1 import rater_service_pb2 as pb

        with rater_channel(server, read_token(token_file, token), tls_ca) as channel:
            response = channel.call("DeployModel", pb.DeployModelRequest(name=name, version=version, onnx=data))
        result = {"name": response.model.name, "version": response.model.version, "server": server_target(server)}
    if as_json:
        emit_json(result)
    else:
        where = result.get("path") or result["server"]
        typer.echo(f"deployed {result['name']} version {result['version']} ({where})")


def unload(
    name: str = typer.Argument(..., help="Model name on the server."),
    version: int = typer.Option(0, "--version", help="Only this version; 0 = every version of the model."),
    server: str = ServerOpt,
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
    server: str = ServerOpt,
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


def admin_call(server: str | None, token: str | None, tls_ca: Path | None, method: str, request, result: dict,
               done: str, as_json: bool) -> None:
    """One admin RPC whose answer is empty, then what it did: `result` (with the server) as JSON, or the
    `done` line."""
    with rater_channel(server, token, tls_ca) as channel:
        channel.call(method, request)
    if as_json:
        emit_json({**result, "server": server_target(server)})
    else:
        typer.echo(f"{done} ({server_target(server)})")


def models(
    server: str = ServerOpt,
    tls_ca: Path | None = TlsCaOpt,
    repository: Path | None = typer.Option(None, "--repository", help="List a repository folder instead (each "
                                           "version is loaded to check it: ON_DISK, or INVALID with the reason)."),
    as_json: bool = JsonOpt,
) -> None:
    """List models and versions on a server (or in a repository folder)."""
    if repository is not None:
        rows = repository_rows(repository)
    else:
        from noiserater.core.v1 import rater_service_pb2 as pb

        with rater_channel(server, tls_ca=tls_ca) as channel:
            response = channel.call("ListModels", pb.ListModelsRequest())
        rows = [{"name": m.name, "default_version": m.default_version,
                 "versions": [{"version": v.version, "state": v.state} for v in m.versions]}
                for m in response.models]
    if as_json:
        emit_json({"models": rows})
        return
    table("models", ["name", "versions", "default"], [
        [m["name"], ", ".join(f"{v['version']} ({v['state']}{': ' + v['reason'] if v.get('reason') else ''})"
                              for v in m["versions"]), m["default_version"] or "-"]
        for m in rows
    ])


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
                RaterSession(repo.version_dir(repository, name, version) / repo.MODEL_FILE, device="cpu")
                listed.append({"version": version, "state": "ON_DISK"})
            except (ScoringError, OSError) as exc:
                listed.append({"version": version, "state": "INVALID", "reason": str(exc).splitlines()[0]})
        valid = [v["version"] for v in listed if v["state"] == "ON_DISK"]
        rows.append({"name": name, "versions": listed, "default_version": valid[-1] if valid else 0})
    return rows


def stats(
    dataset: str = typer.Option("", "--dataset", help="Only this dataset."),
    model: str = typer.Option("", "--model", help="Only this model."),
    version: int = typer.Option(0, "--version", help="Only this version (0 = all)."),
    server: str | None = ServerOpt,
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

    if redis_url:
        try:
            rows = stats_view.rows_from_redis(redis_url, dataset, model, version)
        except Exception as exc:  # redis raises its own connection and URL errors
            fail(f"--redis-url {redis_url}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    else:
        from noiserater.core.v1 import rater_service_pb2 as pb

        buckets, token = [], ""
        with rater_channel(server, tls_ca=tls_ca) as channel:
            while True:  # every page: the server answers at most a bounded number of buckets per call
                response = channel.call("GetStats", pb.GetStatsRequest(dataset=dataset, model=model,
                                                                       version=version, page_token=token))
                buckets.extend(response.buckets)
                token = response.next_page_token
                if not token:
                    break
        rows = stats_view.rows_from_response(buckets)
    if not rows:
        asked = ", ".join(f"{k} {v!r}" for k, v in (("dataset", dataset), ("model", model), ("version", version)) if v)
        fail(f"no statistics{' for ' + asked if asked else ''} (nothing scored yet, or a misspelt name)")
    if plot is not None:
        stats_view.plot(rows, plot)
    if as_json:
        emit_json({"timestep_buckets": TIMESTEP_BUCKETS, "buckets": rows})
        return
    columns, cells, title = stats_view.TABLE_COLUMNS, stats_view.table_rows(rows), "score statistics"
    if len({r["dataset"] for r in rows}) == 1:  # one dataset: named in the title, its column left out
        columns, cells, title = columns[1:], [c[1:] for c in cells], f"score statistics of dataset {rows[0]['dataset']}"
    table(title, columns, cells)
    if plot is not None:
        console.print(f"plot: {plot}")


def register(app: typer.Typer) -> None:
    for name, command in (("export", export), ("deploy", deploy), ("unload", unload), ("set-default", set_default),
                          ("models", models), ("stats", stats)):
        app.command(name)(command)
