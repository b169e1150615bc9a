"""nrctl train-rater: stage 1, meta-learning a noise rater on a dataset (resumes from RUN_DIR's checkpoint)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import typer

from noiserater.cli.options import Device, Layout, LogWith, MetaGrad, MetaObjective, Objective, value
from noiserater.cli.output import emit_json, err_console, fail, progress_bar, set_torch_threads, table


def train_rater(
    dataset: str = typer.Option(None, "--dataset", help="Built-in name (digits, digits-image, moons, gaussians) "
                                "or a .npy/.npz file or an image folder.",
                                show_default="digits, or the run's"),
    key: str = typer.Option(None, "--key", help="The array of an .npz file that holds several."),
    data_range: str = typer.Option(None, "--data-range", help="How a user array is scaled to [-1, 1]: auto "
                                   "(uint8 from 0..255; floats as they are; other integers refused), LOW:HIGH "
                                   "(e.g. 0:255) or none.", show_default="auto"),
    layout: Layout = typer.Option(None, "--layout", help="Layout of a user image array: auto reads (N, H, W, C) "
                                  "with C <= 4 as channel-last and transposes it.",
                                  show_default="auto"),
    out: Path = typer.Option(..., "--out", "-o", help="RUN_DIR: rater/ (safetensors), rater.pt, checkpoint, "
                             "config, metrics, plot. An existing RUN_DIR is resumed with its own settings."),
    resume: bool = typer.Option(False, "--resume", help="Resume RUN_DIR with its own settings even where "
                                "options given here differ (only --steps and --device apply)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run in RUN_DIR and start again."),
    steps: int = typer.Option(None, "--steps", help="Meta steps in total.",
                              show_default="600, or the run's"),
    inner_steps: int = typer.Option(None, "--inner-steps", help="U: unrolled virtual SGD steps.",
                                    show_default="1"),
    population: int = typer.Option(None, "--population", help="P: inner models per process.",
                                   show_default="4"),
    meta_grad: MetaGrad = typer.Option(None, "--meta-grad", help="exact (unrolled, torch.func) or fast "
                                       "(directional derivatives).", show_default="fast"),
    seed: int = typer.Option(None, "--seed", help="Random seed.", show_default="0"),
    candidate_group: int = typer.Option(None, "--candidate-group", help="G: noises per (x0, t) in a train batch, "
                                        "weights softmaxed within each group (1: over the batch).",
                                        show_default="1"),
    tau: float = typer.Option(None, "--tau", help="Softmax temperature of the soft weights (through-selection: "
                              "of the selection).", show_default="1"),
    objective: Objective = typer.Option(None, "--objective", help="What the inner denoisers predict: eps (VP "
                                        "DDPM) or flow (linear interpolant, velocity eps - x0).",
                                        show_default="eps, or the run's"),
    meta_objective: MetaObjective = typer.Option(None, "--meta-objective", help="What the rater learns: "
                                                 "soft-weights (one virtual step, weighted loss), "
                                                 "through-selection (H real steps on its Gumbel-softmax "
                                                 "picks), through-assignment (the same through the batch's "
                                                 "assignment), grad-norm (log per-sample gradient norm, for "
                                                 "importance-weighted selection) or denoiser-error (minus the "
                                                 "loss of a denoiser trained on Gaussian noise for --steps).",
                                                 show_default="soft-weights, or the run's"),
    selection_candidates: int = typer.Option(None, "--selection-candidates", help="through-selection: K "
                                             "candidate noises per sample.", show_default="8"),
    selection_horizon: int = typer.Option(None, "--selection-horizon", help="through-selection/-assignment: H "
                                          "differentiable Adam steps per meta step.", show_default="4"),
    device: Device = typer.Option(Device.auto, "--device", help="Where torch trains."),
    log_with: LogWith = typer.Option(LogWith.none, "--log-with", help="Also log the metrics to this tracker "
                                     "(tensorboard: RUN_DIR/tensorboard; needs the tensorboard package)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (progress stays on stderr)."),
) -> None:
    """Meta-learn a noise rater: soft weights on the denoising loss, tuned so held-out loss falls faster.

    Options left out take the values of the run already in RUN_DIR, else the defaults shown."""
    import torch

    from noiserater.trainer.stage1.train import TrainConfig, cleanup_distributed, saved_config
    from noiserater.trainer.stage1.train import train_rater as run

    if resume and overwrite:
        fail("train-rater: give at most one of --resume and --overwrite")
    given = {"dataset": dataset, "data_key": key, "data_range": data_range, "data_layout": value(layout),
             "steps": steps, "inner_steps": inner_steps, "population": population, "meta_grad": value(meta_grad),
             "seed": seed, "candidate_group": candidate_group, "tau": tau, "device": value(device),
             "objective": value(objective), "meta_objective": value(meta_objective),
             "selection_candidates": selection_candidates, "selection_horizon": selection_horizon}
    given = {k: v for k, v in given.items() if v is not None}
    rank = int(os.environ.get("RANK", "0"))
    set_torch_threads()
    bar = task = None

    def progress(step: int, total: int, row: dict[str, float]) -> None:
        nonlocal bar, task
        if rank != 0:
            return
        if bar is None:  # created at the first step, so an early error stays a single line
            err_console.print(f"train-rater: dataset={cfg.dataset} out={out} steps={total} U={cfg.inner_steps} "
                              f"P={cfg.population} meta-grad={cfg.meta_grad} seed={cfg.seed} device={cfg.device} "
                              f"threads={torch.get_num_threads()}{_objectives(cfg)}", highlight=False,
                              soft_wrap=True)
            bar = progress_bar()
            bar.start()
            task = bar.add_task("meta steps", total=total, completed=step - 1, status="")
        if "outer_loss_learned" in row:  # the logged comparison; other steps keep the last one shown
            spread = (f" w_std {row['weight_std']:.2f}" if "weight_std" in row else
                      f" entropy {row['choice_entropy']:.2f}" if "choice_entropy" in row else "")
            bar.update(task, status=f"uniform-learned {row['outer_loss_uniform'] - row['outer_loss_learned']:+.2e}"
                                    f"{spread}")
        elif "grad_norm_corr" in row:
            bar.update(task, status=f"log-grad-norm mse {row['grad_norm_mse']:.3f} corr {row['grad_norm_corr']:+.2f}")
        elif "val_loss" in row:
            bar.update(task, status=f"denoiser val loss {row['val_loss']:.4f}")
        bar.update(task, completed=step)

    try:
        saved = None if overwrite else saved_config(out)
        cfg = TrainConfig.from_dict({**(asdict(saved) if saved is not None else {}), **given})
        summary = run(cfg, out, progress=progress, existing="overwrite" if overwrite else
                      ("resume" if resume else "check"), log_with=value(log_with))
    except (ValueError, OSError, RuntimeError) as exc:
        fail(f"train-rater: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    except KeyboardInterrupt:
        fail("train-rater: interrupted (re-run the same command to resume from the last checkpoint)", code=130)
    finally:
        if bar is not None:
            bar.stop()
        cleanup_distributed()
    if rank != 0:
        return
    if as_json:
        emit_json(summary)
        return
    table("train-rater", ["field", "value"], [(k, v) for k, v in summary.items()])


def _objectives(cfg) -> str:
    """The objectives on the start line, only where they are not the defaults (so a default run's line is as
    it always was)."""
    parts = []
    if cfg.objective != "eps":
        parts.append(f" objective={cfg.objective}")
    if cfg.meta_objective != "soft-weights":
        parts.append(f" meta-objective={cfg.meta_objective}")
        if cfg.meta_objective == "through-selection":
            parts.append(f" K={cfg.selection_candidates} H={cfg.selection_horizon}")
        if cfg.meta_objective == "through-assignment":
            parts.append(f" H={cfg.selection_horizon}")
        if cfg.meta_objective == "denoiser-error":
            parts.append(" (the rater is a denoiser trained on Gaussian noise; U, P and meta-grad unused)")
    return "".join(parts)


def register(app: typer.Typer) -> None:
    app.command("train-rater")(train_rater)
