"""nrctl train-rater: stage 1, meta-learning a noise rater on a dataset (resumes from RUN_DIR's checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from noiserater.cli.output import console, emit_json, fail, set_torch_threads, table


def train_rater(
    dataset: str = typer.Option("digits", "--dataset", help="Built-in name (digits, digits-image) or a "
                                                            ".npy/.npz file or an image folder."),
    out: Path = typer.Option(..., "--out", "-o", help="RUN_DIR: rater.pt, checkpoint, config, metrics, plot. "
                                                      "An existing RUN_DIR is resumed."),
    steps: int = typer.Option(None, "--steps", help="Meta steps in total (default from the config: 600)."),
    inner_steps: int = typer.Option(None, "--inner-steps", help="U: unrolled virtual SGD steps (default 1)."),
    population: int = typer.Option(None, "--population", help="P: inner models per process (default 4)."),
    meta_grad: str = typer.Option(None, "--meta-grad", help="exact (unrolled, torch.func) or fast "
                                                          "(directional derivatives; default)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default 0)."),
    candidate_group: int = typer.Option(None, "--candidate-group", help="G: noises per (x0, t) in a train batch, "
                                        "weights softmaxed within each group (default 1: over the batch)."),
    tau: float = typer.Option(None, "--tau", help="Softmax temperature of the soft weights (default 1)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (no progress bar)."),
) -> None:
    """Meta-learn a noise rater: soft weights on the denoising loss, tuned so held-out loss falls faster."""
    import torch
    from tqdm import tqdm

    from noiserater.trainer.stage1.train import TrainConfig, cleanup_distributed
    from noiserater.trainer.stage1.train import train_rater as run

    overrides = {"steps": steps, "inner_steps": inner_steps, "population": population, "meta_grad": meta_grad,
                 "seed": seed, "candidate_group": candidate_group, "tau": tau}
    cfg = TrainConfig(dataset=dataset, device=device, **{k: v for k, v in overrides.items() if v is not None})
    rank = int(os.environ.get("RANK", "0"))
    set_torch_threads()
    bar = None

    def progress(step: int, total: int, row: dict[str, float]) -> None:
        nonlocal bar
        if as_json:
            return
        if bar is None:  # created at the first step, so an early error stays a single line
            console.print(f"train-rater: dataset={cfg.dataset} out={out} steps={total} U={cfg.inner_steps} "
                          f"P={cfg.population} meta-grad={cfg.meta_grad} seed={cfg.seed} device={cfg.device} "
                          f"threads={torch.get_num_threads()}", highlight=False, soft_wrap=True)
            bar = tqdm(total=total, initial=step - 1, desc="meta steps", unit="step", dynamic_ncols=True)
        bar.n = step
        post = {"outer": f"{row['outer_loss']:.4f}", "inner": f"{row['inner_loss']:.4f}"}
        if "outer_loss_learned" in row:
            post["uniform-learned"] = f"{row['outer_loss_uniform'] - row['outer_loss_learned']:+.2e}"
            post["w_std"] = f"{row['weight_std']:.2f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    try:
        summary = run(cfg, out, progress=progress)
    except (ValueError, OSError, RuntimeError) as exc:
        fail(f"train-rater: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    except KeyboardInterrupt:
        fail("train-rater: interrupted (re-run the same command to resume from the last checkpoint)", code=130)
    finally:
        if bar is not None:
            bar.close()
        cleanup_distributed()
    if rank != 0:
        return
    if as_json:
        emit_json(summary)
        return
    table("train-rater", ["field", "value"], [(k, v) for k, v in summary.items()])


def register(app: typer.Typer) -> None:
    app.command("train-rater")(train_rater)
