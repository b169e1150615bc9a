"""nrctl export / deploy / models / stats: from a trained rater to a served, inspected model."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import typer

from noiserater.cli.output import emit_json, fail, table

SERVER_ENV = "NOISERATER_SERVER"
DEFAULT_SERVER = "localhost:50051"
TIMEOUT_S = 30.0

ServerOpt = typer.Option(None, "--server", help=f"Rater server HOST:PORT (env {SERVER_ENV}).")
JsonOpt = typer.Option(False, "--json", help="Print JSON for machines instead of a table.")
TokenFileOpt = typer.Option(None, "--token-file", help="File holding the admin bearer token (env NOISERATER_TOKEN).",
                            exists=True, dir_okay=False)


def server_target(server: str | None) -> str:
    return server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER


def read_token(token_file: Path | None) -> str | None:
    if token_file is not None:
        return token_file.read_text().strip()
    return os.environ.get("NOISERATER_TOKEN") or None


@contextlib.contextmanager
def rater_channel(server: str | None, token: str | None = None):
    """A RaterChannel to the server (no retries: a retried deploy could add a version twice); any gRPC error
    inside the block becomes one line and exit code 1."""
    import grpc

    from noiserater.client.channel import ChannelError, RaterChannel

    try:
        channel = RaterChannel(server_target(server), token=token, timeout_s=TIMEOUT_S, max_attempts=1)
    except ChannelError as exc:
        fail(str(exc))
    try:
        yield channel
    except grpc.RpcError as exc:
        fail(f"{channel.target}: {exc.code().name}: {exc.details()}")
    finally:
        channel.close()


def export(
    run: Path = typer.Argument(..., help="A train-rater RUN_DIR (or its rater.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the ONNX file."),
    as_json: bool = JsonOpt,
) -> None:
    """Export a trained rater to ONNX with metadata; parity with torch is checked."""
    from noiserater.trainer.stage1.export import ParityError, export_rater
    from noiserater.trainer.stage1.rater import RATER_FILE, load_rater

    checkpoint = run / RATER_FILE if run.is_dir() else run
    if not checkpoint.is_file():
        fail(f"no rater checkpoint at {checkpoint} (expected a train-rater RUN_DIR or a {RATER_FILE})")
    try:
        rater, info = load_rater(checkpoint)
        report = export_rater(rater, out, dataset=info.get("dataset", ""), schedule=info.get("schedule", ""),
                              provenance={"checkpoint": str(checkpoint.resolve()), **info.get("provenance", {})})
    except ParityError as exc:
        fail(f"export failed the parity check: {exc}")
    except (KeyError, RuntimeError, ValueError) as exc:
        fail(f"cannot export {checkpoint}: {exc}")
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
    server: str | None = typer.Option(None, "--server", help=f"Upload to this rater server (env {SERVER_ENV})."),
    version: int = typer.Option(0, "--version", help="Version number; 0 = newest + 1."),
    token_file: Path | None = TokenFileOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Deploy an ONNX rater as a new version: into a repository folder, or hot-loaded on a server."""
    from noiserater.core import repository as repo
    from noiserater.core import scoring

    if (repository is None) == (server is None and not os.environ.get(SERVER_ENV)):
        fail("give exactly one of --repository DIR or --server HOST:PORT")
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

        with rater_channel(server, read_token(token_file)) as channel:
            response = channel.call("DeployModel", pb.DeployModelRequest(name=name, version=version, onnx=data))
        result = {"name": response.model.name, "version": response.model.version, "server": server_target(server)}
    if as_json:
        emit_json(result)
    else:
        where = result.get("path") or result["server"]
        typer.echo(f"deployed {result['name']} version {result['version']} ({where})")


def models(
    server: str | None = ServerOpt,
    repository: Path | None = typer.Option(None, "--repository", help="List a repository folder instead."),
    as_json: bool = JsonOpt,
) -> None:
    """List models and versions on a server (or in a repository folder)."""
    if repository is not None:
        from noiserater.core import repository as repo

        found = repo.scan(repository)
        rows = [{"name": n, "versions": [{"version": v, "state": "ON_DISK"} for v in vs], "default_version": vs[-1]}
                for n, vs in found.items()]
    else:
        from noiserater.core.v1 import rater_service_pb2 as pb

        with rater_channel(server) as channel:
            response = channel.call("ListModels", pb.ListModelsRequest())
        rows = [{"name": m.name, "default_version": m.default_version,
                 "versions": [{"version": v.version, "state": v.state} for v in m.versions]}
                for m in response.models]
    if as_json:
        emit_json({"models": rows})
        return
    table("models", ["name", "versions", "default"], [
        [m["name"], ", ".join(f"{v['version']} ({v['state']})" for v in m["versions"]), m["default_version"]]
        for m in rows
    ])


def stats(
    dataset: str = typer.Option("", "--dataset", help="Only this dataset."),
    model: str = typer.Option("", "--model", help="Only this model."),
    version: int = typer.Option(0, "--version", help="Only this version (0 = all)."),
    server: str | None = ServerOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show the shared per-dataset score statistics (count, mean, std, min, max per timestep bucket)."""
    from noiserater.core.v1 import rater_service_pb2 as pb

    buckets, timestep_buckets, token = [], 0, ""
    with rater_channel(server) as channel:
        while True:  # every page: the server answers at most a bounded number of buckets per call
            response = channel.call("GetStats", pb.GetStatsRequest(dataset=dataset, model=model, version=version,
                                                                   page_token=token))
            buckets.extend(response.buckets)
            timestep_buckets, token = response.timestep_buckets, response.next_page_token
            if not token:
                break
    rows = []
    for b in buckets:
        variance = b.m2 / (b.count - 1) if b.count > 1 else 0.0
        rows.append({
            "dataset": b.dataset, "model": b.model, "version": b.version, "timestep_bucket": b.timestep_bucket,
            "count": b.count, "mean": b.mean, "std": variance ** 0.5, "min": b.min, "max": b.max,
            "histogram": list(b.histogram), "hist_low": b.hist_low, "hist_high": b.hist_high,
        })
    if as_json:
        emit_json({"timestep_buckets": timestep_buckets, "buckets": rows})
        return
    table("score statistics", ["dataset", "model", "version", "t bucket", "count", "mean", "std", "min", "max"],
          [[r["dataset"], r["model"], r["version"], r["timestep_bucket"], r["count"], r["mean"], r["std"],
            r["min"], r["max"]] for r in rows])


def register(app: typer.Typer) -> None:
    for command in (export, deploy, models, stats):
        app.command()(command)
