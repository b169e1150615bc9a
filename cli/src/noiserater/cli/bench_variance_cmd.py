"""`nrctl bench variance`: how much of a denoiser's gradient variance is due to the noise, and the most any
unbiased noise selection could remove."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from noiserater.cli.options import Denoiser, Objective, value
from noiserater.cli.output import emit_json, fail, progress_bar, table


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers") from None
    if not ks or min(ks) < 1:
        raise typer.BadParameter("every K must be >= 1")
    return ks


def bench_variance(
    dataset: str = typer.Option("digits", help="Built-in dataset name or a .npy/.npz file / image folder."),
    objective: Objective = typer.Option(None, help="The training objective [default: eps, or the objective of "
                                        "the --model-from model]."),
    steps: int = typer.Option(2000, min=1, help="Training steps of the uniform-noise denoiser."),
    seed: int = typer.Option(0, help="Seed of the training run and of the measurement's draws."),
    model_from: Path | None = typer.Option(None, "--model-from", help="Measure the denoiser an earlier run saved "
                                           "(its --out folder or denoiser.pt) instead of training one."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for variance.json, variance.md and the "
                             "trained denoiser.pt."),
    n_t: int = typer.Option(40, "--n-t", min=2, help="Timesteps, one per equal stratum of [0, T)."),
    n_x0: int = typer.Option(16, "--n-x0", min=2, help="Training items per timestep."),
    n_eps: int = typer.Option(16, "--n-eps", min=2, help="Gaussian noises per (item, timestep)."),
    buckets: int = typer.Option(10, min=1, help="Equal ranges of t in the breakdown (at most --n-t)."),
    k: str = typer.Option("2,4,8,16", "--k", help="Candidates per sample for the K-candidate ceilings."),
    chunk: int = typer.Option(32, min=1, help="Per-sample gradients computed at once (bounds memory)."),
    batch_size: int = typer.Option(128, min=1, help="Training batch size."),
    lr: float = typer.Option(1e-3, help="Training learning rate."),
    denoiser: Denoiser = typer.Option(Denoiser.auto, help="The denoiser trained (auto: unet for images, mlp "
                                      "otherwise)."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print variance.json (progress stays on stderr)."),
) -> None:
    """Split a denoiser's per-sample gradient variance into the parts due to t, x0 and eps given (x0, t), and
    print the ceiling importance sampling over the noise puts on the variance reduction (the most any
    unbiased noise selection could gain in effective batch size)."""
    import torch

    from noiserater.trainer.bench.variance import (
        VarianceConfig,
        load_denoiser,
        run_variance,
        save_denoiser,
        train_denoiser,
        write_report,
    )
    from noiserater.trainer.stage2.sources import Stage2Error
    from noiserater.trainer.stage2.training import Stage2Config
    from noiserater.trainer.substrate.data import load_dataset

    if threads:
        torch.set_num_threads(threads)
    cfg = VarianceConfig(n_t=n_t, n_x0=n_x0, n_eps=n_eps, buckets=buckets, k=parse_ks(k), chunk=chunk, seed=seed)
    command = "nrctl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        cfg.check()
        data = load_dataset(dataset)
        out.mkdir(parents=True, exist_ok=True)
        with progress_bar() as bar:
            if model_from is not None:
                model, info = load_denoiser(model_from)
                if objective is not None and value(objective) != info["objective"]:
                    raise ValueError(f"--objective {value(objective)}: the --model-from denoiser was trained for "
                                     f"{info['objective']}")
                info = {**info, "model_from": str(model_from)}
            else:
                train_task = bar.add_task("train", total=steps, status=f"uniform, {value(objective) or 'eps'}")
                train_cfg = Stage2Config(batch_size=batch_size, lr=lr, denoiser=value(denoiser), quality=False)
                model, info = train_denoiser(data, value(objective) or "eps", steps, seed, config=train_cfg,
                                             progress=lambda n: bar.advance(train_task, n))
                save_denoiser(model, out / "denoiser.pt", info)
            task = bar.add_task("gradients", total=cfg.n_t * cfg.n_x0 * cfg.n_eps, status=info["objective"])
            result = run_variance(model, info, data, cfg, progress=lambda n: bar.advance(task, n), command=command)
        write_report(result, out)
    except (Stage2Error, ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if as_json:
        emit_json(result)
        return
    show(result)
    typer.echo(f"report: {out / 'variance.md'}")


def show(result: dict) -> None:
    g, loss, m, se = result["gradient"], result["loss"], result["model"], result["gradient"]["se"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    names = {"t": "t", "x0": "x0 | t", "eps": "eps | x0, t"}
    rows = [[names[p], f"{g[p]:.4g}", pct(g["fractions"][p]), f"{100 * se['fraction_' + p]:.1f}",
             pct(loss["fractions"][p])] for p in ("t", "x0", "eps")]
    rows.append(["total", f"{g['total']:.4g}", "", "", ""])
    table(f"{m['dataset']}, {m['objective']}, {m['steps']} steps: gradient variance by part",
          ["part", "variance", "share", "± pts", "loss share"], rows)
    ceilings = [["IS over eps, q ∝ p‖g‖", f"{g['is_noise']['min_total']:.4g}",
                 f"{g['is_noise']['ratio']:.4g} ± {se['ratio']:.2g}"]]
    ceilings += [[f"best of K = {kk}, reweighted", f"{v['min_total']:.4g}", f"{v['ratio']:.4g}"]
                 for kk, v in g["is_noise_k"].items()]
    ceilings.append(["(eps part removed)", f"{g['eps_removed']['min_total']:.4g}", f"{g['eps_removed']['ratio']:.4g}"])
    ceilings.append(["(IS over t, x0, eps)", f"{g['is_joint']['min_total']:.4g}", f"{g['is_joint']['ratio']:.4g}"])
    table("ceiling of any unbiased noise selection", ["scheme", "min variance", "total / min"], ceilings)
    table("by range of t", ["t", "eps share", "of all eps", "total / min", "mean loss"],
          [[f"{r['t_lo']}-{r['t_hi'] - 1}", pct(r["eps_fraction"]), pct(r["eps_share_of_all"]),
            f"{r['is_noise_ratio']:.4g}", f"{r['loss_mean']:.4g}"] for r in result["buckets"]])


def register(bench_app: typer.Typer) -> None:
    bench_app.command("variance")(bench_variance)
