"""nrctl quickstart: the whole pipeline on the built-in digits data, end to end, in a few minutes.

train-rater (short) -> export -> rater-server (a real subprocess on a free port) -> deploy over gRPC ->
stage-2 training through the remote selector (prefetching: each step's selection travels while the step
before trains) next to plain Gaussian noise -> a printed comparison and the server's score statistics.
Everything lands in --workdir. The server is the installed `rater-server` console script, started as a user
would start it.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import typer

from noiserater.cli import stats_view
from noiserater.cli.output import console, emit_json, fail, progress_bar, set_torch_threads, table
from noiserater.trainer.bench.local_server import start_rater_server


def quickstart(
    workdir: Path = typer.Option(None, "--workdir", help="Where runs, models and logs go (default: a temp dir)."),
    rater_steps: int = typer.Option(150, "--rater-steps", help="Meta steps of the short stage-1 run."),
    train_steps: int = typer.Option(1500, "--train-steps", help="Stage-2 training steps per method."),
    k: int = typer.Option(8, "--k", help="Candidates per sample for the rater's selection."),
    seed: int = typer.Option(0, "--seed", help="Seed of every stage."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Run the whole pipeline on digits: train-rater, export, serve, deploy, select remotely, compare."""
    from noiserater.client.channel import RaterChannel
    from noiserater.client.selector import NoiseSelector
    from noiserater.core.v1 import rater_service_pb2 as pb
    from noiserater.trainer.stage1.export import export_rater
    from noiserater.trainer.stage1.rater import load_rater
    from noiserater.trainer.stage1.train import TrainConfig, train_rater
    from noiserater.trainer.stage2.training import EvalContext, Stage2Config, train_stage2
    from noiserater.trainer.substrate.data import load_dataset

    set_torch_threads()
    work = workdir or Path(tempfile.mkdtemp(prefix="nrctl-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    say = (lambda *a, **kw: None) if as_json else console.print
    started = time.perf_counter()

    say(f"[bold]1/5 train-rater[/] digits, {rater_steps} meta steps -> {work / 'run'}")
    with progress_bar() as bar:
        task = bar.add_task("meta steps", total=rater_steps, status="")
        try:
            summary = train_rater(TrainConfig(dataset="digits", steps=rater_steps, seed=seed), work / "run",
                                  progress=lambda step, total, row: bar.update(task, completed=step))
        except ValueError as exc:  # e.g. --workdir holds a run with another seed
            fail(f"quickstart: {str(exc).splitlines()[0]}")
    learned = summary.get("last_quarter_learned", float("nan"))
    uniform = summary.get("last_quarter_uniform", float("nan"))
    say(f"    last quarter: held-out loss after a virtual step, learned weights {learned:.5f} vs uniform {uniform:.5f}")

    say("[bold]2/5 export[/] -> digits.onnx")
    rater, info = load_rater(work / "run" / "rater.pt")
    onnx_path = work / "digits.onnx"
    report = export_rater(rater, onnx_path, dataset="digits", schedule=info.get("schedule", ""),
                          objective=info.get("objective") or "eps", provenance=info.get("provenance", {}))
    say(f"    parity with torch: max |diff| = {report.max_abs_diff:.2e}")

    repository = work / "models"
    repository.mkdir(exist_ok=True)
    say("[bold]3/5 serve[/] rater-server on a free loopback port, then deploy over gRPC")
    # The server refuses deploys unless it has an admin token: a fresh one, readable by this user only.
    token = secrets.token_urlsafe(24)
    token_file = work / "admin-token"
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)  # an older file keeps its mode through touch
    token_file.write_text(token + "\n")
    with ExitStack() as stack:
        try:
            target = start_rater_server(stack, repository, ["--auth-token-file", str(token_file)],
                                        log_path=work / "rater-server.log").target
        except (RuntimeError, OSError) as exc:
            fail(f"{exc}; see {work / 'rater-server.log'}")
        with RaterChannel(target, token=token, max_attempts=1) as channel:
            deployed = channel.call("DeployModel", pb.DeployModelRequest(name="digits", onnx=onnx_path.read_bytes()),
                                    timeout_s=60).model
            say(f"    {target}: deployed digits version {deployed.version}")

            say(f"[bold]4/5 stage 2[/] {train_steps} steps each: uniform Gaussian noise vs the served rater "
                f"(argmax of K={k}, remote selector, each step's selection started during the step before)")
            data = load_dataset("digits", seed=seed)
            cfg = Stage2Config(steps=train_steps, k=k)
            context = EvalContext.build(data, cfg)
            results = {}
            selector = NoiseSelector.remote(target, model="digits", dataset="digits", num_candidates=k, seed=seed)
            for method, sel in (("uniform", None), ("rater-argmax", selector)):
                with progress_bar() as bar:
                    task = bar.add_task(method, total=train_steps, status="")
                    results[method] = train_stage2(data, method, train_steps, seed, selector=sel, config=cfg,
                                                   context=context, progress=lambda n, t=task: bar.advance(t, n))
            fallbacks = selector.counters["fallback_local"] + selector.counters["fallback_gaussian"]
            selector.close()

            say("[bold]5/5 statistics[/] the server's score statistics for dataset digits")
            stats = channel.call("GetStats", pb.GetStatsRequest(dataset="digits"), timeout_s=10)
    scored = sum(b.count for b in stats.buckets)
    stat_rows = stats_view.rows_from_response(stats.buckets)

    metrics = ["val_loss", "frechet", "swd", "ms_per_step", "noise_sq_norm_per_dim", "noise_cosine_with_x0"]
    rows = {m: {name: r.metrics.get(name) for name in metrics} for m, r in results.items()}
    base, ours = rows["uniform"], rows["rater-argmax"]
    verdict = {name: ("rater better" if ours[name] < base[name] else "rater worse")
               for name in ("val_loss", "frechet", "swd") if ours.get(name) is not None and base.get(name) is not None}
    statistics = [{k: r[k] for k in ("version", "t_first", "t_last", "count", "mean", "std", "min", "max")}
                  for r in stat_rows]
    payload = {"workdir": str(work), "model_version": deployed.version, "candidates_scored_on_server": scored,
               "statistics": statistics,
               "selector_fallbacks": fallbacks, "methods": rows, "verdict": verdict,
               "seconds": round(time.perf_counter() - started, 1), "seed": seed}
    if as_json:
        emit_json(payload)
        return
    table("stage 2 on digits, one seed (lower is better for val_loss, frechet, swd)", ["metric", *rows],
          [[name, *(rows[m].get(name) if rows[m].get(name) is not None else "-" for m in rows)] for name in metrics])
    say(verdict_line(verdict))
    table(f"the server's score statistics for dataset digits (version {deployed.version}, by timestep range)",
          ["timesteps", "count", "mean", "std", "min", "max"],
          [[stats_view.timesteps(r), r["count"], r["mean"], r["std"], r["min"], r["max"]] for r in stat_rows])
    say(f"server scored {scored} candidates for dataset digits; selector fallbacks: {fallbacks}; "
        f"total {payload['seconds']} s; files in {work}")
    if fallbacks:
        fail(f"the remote selector fell back {fallbacks} times; see {work / 'rater-server.log'}")


def verdict_line(verdict: dict[str, str]) -> str:
    """The comparison in words, e.g. `val_loss: rater worse, frechet: rater better`."""
    words = ", ".join(f"{name}: {word}" for name, word in verdict.items()) or "no metric to compare"
    return f"verdict (one seed, not a benchmark; see `nrctl bench train` for seeds and error bars): {words}"


def register(app: typer.Typer) -> None:
    app.command()(quickstart)
