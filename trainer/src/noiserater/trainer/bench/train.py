"""The efficacy benchmark (`nrctl bench train`): methods x seeds through `train_stage2`, paired by seed.

Writes into the output folder:
- `report.json`: method -> metric -> {"mean", "std", "seeds": [per-seed values in seed order]} (exactly that);
- `details.json`: the command, the setup, the metric references (classifier accuracy, floors), the paired
  differences against uniform (and of the methods that need a rater against immiscible-knn) and every run's
  curve;
- `report.md`: the same for people, with mean ± std tables and paired differences with standard errors;
- `curves.png`: held-out loss (Gaussian noise, fixed seeds) against training step, mean ± std over seeds.

"Beats" means: the paired mean difference is below zero by more than two standard errors of that mean
(lower is better for every quality metric here).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noiserater.client.sources import names
from noiserater.trainer.stage2.sources import Stage2Error, needs_rater
from noiserater.trainer.stage2.training import (
    EvalContext,
    Stage2Config,
    Stage2Result,
    steps_to_reach,
    train_stage2,
)
from noiserater.trainer.substrate.data import DataSplits

QUALITY_METRICS = ("val_loss", "test_loss", "frechet", "swd")  # lower is better; paired against uniform
COST_METRICS = ("ms_per_step", "selection_ms_per_step")
NOISE_METRICS = ("noise_sq_norm_per_dim", "noise_cosine_with_x0", "train_loss_selected")
STEP_METRIC = "steps_to_uniform_final"
BASELINE = "uniform"
KNN = "immiscible-knn"


_WORKER: dict[str, Any] = {}


def _init_worker(data: DataSplits, cfg: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    config = Stage2Config(**cfg)
    _WORKER.update(data=data, cfg=config, context=EvalContext.build(data, config))


def _worker_run(method: str, steps: int, seed: int, rater: str | None) -> Stage2Result:
    return train_stage2(_WORKER["data"], method, steps, seed, rater=rater, config=_WORKER["cfg"],
                        context=_WORKER["context"])


def parse_methods(text: str | Sequence[str]) -> list[str]:
    methods = [m.strip() for m in text.split(",")] if isinstance(text, str) else list(text)
    methods = [m for m in methods if m]
    known = names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise Stage2Error(f"methods: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    if not methods:
        raise Stage2Error("methods: none given")
    if len(set(methods)) != len(methods):
        raise Stage2Error("methods: listed twice")
    return methods


def require_rater(methods: Sequence[str], rater: Any) -> None:
    need = [m for m in methods if needs_rater(m)]
    if need and rater is None:
        raise Stage2Error(f"{', '.join(need)}: selecting with a rater needs --rater RUN_DIR|MODEL.onnx")


def rater_schedule(rater_onnx: str | Path) -> tuple[int, str]:
    """(num_timesteps, schedule kind or "") the exported rater was trained with, from its ONNX metadata."""
    from noiserater.core.scoring import RaterSession

    info = RaterSession(Path(rater_onnx), device="cpu").info
    return info.num_timesteps, info.schedule


def check_rater_matches(rater_onnx: str | Path, data: DataSplits, cfg: Stage2Config) -> None:
    from noiserater.core.scoring import RaterSession

    info = RaterSession(Path(rater_onnx), device="cpu").info
    if tuple(info.data_shape) != tuple(data.data_shape):
        raise Stage2Error(f"rater: data shape {list(info.data_shape)} does not match the dataset's "
                          f"{list(data.data_shape)}")
    if info.num_timesteps != cfg.num_timesteps:
        raise Stage2Error(f"rater: trained for T={info.num_timesteps} timesteps, the run uses T={cfg.num_timesteps}")


def summarise(values: Sequence[float | None]) -> dict[str, Any]:
    """{mean, std, seeds}; None entries (e.g. a target never reached) are kept in `seeds` and left out of
    mean/std, which are then over the reached seeds only."""
    present = [float(v) for v in values if v is not None]
    mean = float(np.mean(present)) if present else None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else (0.0 if present else None)
    return {"mean": mean, "std": std, "seeds": [None if v is None else float(v) for v in values]}


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired difference a - b over seeds: mean, its standard error, and whether a is lower beyond 2 SE."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {
        "mean": mean,
        "se": se,
        "diffs": [float(x) for x in d],
        "lower_beyond_2se": bool(len(d) > 1 and mean < -2 * se),
        "higher_beyond_2se": bool(len(d) > 1 and mean > 2 * se),
    }


def run_bench(data: DataSplits, methods: Sequence[str], seeds: Sequence[int], steps: int, out_dir: str | Path, *,
              rater_onnx: str | Path | None = None, config: Stage2Config | None = None,
              command: str = "", progress: Callable[[int], None] | None = None,
              on_run: Callable[[Stage2Result], None] | None = None, jobs: int = 1) -> dict[str, Any]:
    """Train every method for every seed with the same budget; write the report files; return details.
    `jobs` > 1 runs that many trainings at once in worker processes (each with this process's torch threads)."""
    methods = parse_methods(list(methods))
    if BASELINE not in methods:
        methods = [BASELINE, *methods]  # every comparison is paired against uniform
    require_rater(methods, rater_onnx)
    cfg = Stage2Config(**{**asdict(config or Stage2Config()), "steps": int(steps)})
    if rater_onnx is not None:
        check_rater_matches(rater_onnx, data, cfg)
    seeds = list(seeds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    context = EvalContext.build(data, cfg)
    runs: dict[str, list[Stage2Result]] = {m: [] for m in methods}
    started = time.time()
    jobs_list = [(method, seed) for seed in seeds for method in methods]
    if jobs <= 1:
        for method, seed in jobs_list:
            result = train_stage2(data, method, steps, seed, rater=rater_onnx,
                                  config=cfg, context=context, progress=progress)
            runs[method].append(result)
            if on_run is not None:
                on_run(result)
    else:  # independent runs in worker processes; results are the same as in one process, in seed order
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        done: dict[tuple[str, int], Stage2Result] = {}
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker,
                                 initargs=(data, asdict(cfg), torch.get_num_threads())) as pool:
            futures = {pool.submit(_worker_run, method, steps, seed,
                                   None if rater_onnx is None else str(rater_onnx)): (method, seed)
                       for method, seed in jobs_list}
            for future in as_completed(futures):
                result = future.result()
                done[futures[future]] = result
                if progress is not None:
                    progress(int(steps))
                if on_run is not None:
                    on_run(result)
        for method, seed in jobs_list:
            runs[method].append(done[(method, seed)])

    metric_names = [m for m in (*QUALITY_METRICS, *COST_METRICS, *NOISE_METRICS) if m in runs[BASELINE][0].metrics]
    report: dict[str, dict[str, Any]] = {}
    for method in methods:
        report[method] = {name: summarise([r.metrics[name] for r in runs[method]]) for name in metric_names}
        targets = [r.metrics["val_loss"] for r in runs[BASELINE]]
        report[method][STEP_METRIC] = summarise([
            steps_to_reach(r.curve_steps, r.curve_val_loss, target) for r, target in zip(runs[method], targets,
                                                                                         strict=True)
        ])

    quality = [m for m in QUALITY_METRICS if m in metric_names]
    vs_uniform = {
        method: {name: paired(report[method][name]["seeds"], report[BASELINE][name]["seeds"]) for name in quality}
        for method in methods if method != BASELINE
    }
    vs_knn = {}
    if KNN in methods:
        vs_knn = {
            method: {name: paired(report[method][name]["seeds"], report[KNN][name]["seeds"]) for name in quality}
            for method in methods if needs_rater(method)
        }
    goal = {
        method: bool(vs_uniform[method]["val_loss"]["lower_beyond_2se"]
                     and "frechet" in vs_uniform[method] and vs_uniform[method]["frechet"]["lower_beyond_2se"]
                     and method in vs_knn and vs_knn[method]["frechet"]["lower_beyond_2se"])
        for method in methods if needs_rater(method)
    }
    q = context.quality
    details: dict[str, Any] = {
        "command": command,
        "dataset": data.name,
        "data_shape": list(data.data_shape),
        "split_sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "methods": methods,
        "seeds": seeds,
        "steps": int(steps),
        "rater": str(rater_onnx) if rater_onnx is not None else None,
        "config": asdict(cfg),
        "references": {
            "feature_kind": q.feature_kind if q else None,
            "classifier_test_accuracy": q.classifier.test_accuracy if q and q.classifier else None,
            "frechet_floor_heldout_vs_train": q.floor_frechet if q else None,
            "swd_floor_heldout_vs_train": q.floor_swd if q else None,
            "heldout_count": q.heldout_count if q else None,
        },
        "paired_vs_uniform": vs_uniform,
        "paired_vs_immiscible_knn": vs_knn,
        "goal_met": goal,
        "runs": [r.to_dict() for m in methods for r in runs[m]],
        "wall_seconds": time.time() - started,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report, details))
    plot_curves(runs, out / "curves.png", title=f"{data.name}: held-out loss under Gaussian noise")
    return {"report": report, "details": details}


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def render_markdown(report: dict[str, Any], details: dict[str, Any]) -> str:
    methods = details["methods"]
    cfg = details["config"]
    refs = details["references"]
    lines = [
        f"# Stage-2 efficacy on `{details['dataset']}`",
        "",
        f"Made by: `{details['command']}`" if details["command"] else "",
        "",
        f"- Data: `{details['dataset']}` {details['data_shape']}, splits {details['split_sizes']}; "
        f"seeds {details['seeds']} (paired: per seed every method shares the model init, minibatches and "
        "timesteps; only the noise or the loss weighting differs).",
        f"- Budget: {details['steps']} steps, batch {cfg['batch_size']}, Adam lr {cfg['lr']} with cosine decay to "
        f"{cfg['lr_final_fraction']}x, grad clip {cfg['grad_clip']}; denoiser `{cfg['denoiser']}`, "
        f"{cfg['schedule']} schedule, T={cfg['num_timesteps']}.",
        f"- Rater: `{details['rater']}`; K={cfg['k']} candidates (also for immiscible-knn), "
        f"sample temperature {cfg['temperature']}, kanneal reaches K=1 at {cfg['kanneal_end']} of the run.",
        f"- val_loss / test_loss: eps-MSE on the held-out split with *Gaussian* noise, {cfg['eval_repeats']} fixed "
        "(t, eps) draws per item, the same draws for every method.",
    ]
    if refs["feature_kind"]:
        acc = refs["classifier_test_accuracy"]
        lines.append(
            f"- frechet: Fréchet distance of {refs['heldout_count']} DDPM samples ("
            + (f"{cfg['sample_steps']} respaced steps" if cfg.get("sample_steps") else "all T steps")
            + ", clipped to the data "
            "range) to the training split in " + f"{refs['feature_kind']} features"
            + (f" (in-project MLP classifier, test accuracy {acc:.3f})" if acc is not None else "")
            + "; floor (held-out real data vs training data, same count) "
            f"{_fmt(refs['frechet_floor_heldout_vs_train'])}."
            f" swd: sliced Wasserstein-2 in data space; floor {_fmt(refs['swd_floor_heldout_vs_train'])}."
        )
    lines.append(f"- Wall time of the whole benchmark: {details['wall_seconds']:.0f} s "
                 f"({details['machine']['threads']} torch threads).")
    lines += ["", "## Mean ± std over seeds", ""]
    cols = [c for c in (*QUALITY_METRICS, STEP_METRIC, *COST_METRICS, *NOISE_METRICS) if c in report[methods[0]]]
    lines.append("| method | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for m in methods:
        cells = []
        for c in cols:
            s = report[m][c]
            cell = f"{_fmt(s['mean'])} ± {_fmt(s['std'], 2)}"
            if c == STEP_METRIC:
                reached = sum(v is not None for v in s["seeds"])
                cell = f"{_fmt(s['mean'])} ({reached}/{len(s['seeds'])} reached)"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"`{STEP_METRIC}`: first evaluated step at which the method's held-out loss is at or below "
              "uniform's final held-out loss (same seed); mean over the seeds that reached it.", ""]

    def paired_table(title: str, table: dict[str, Any], against: str) -> None:
        if not table:
            return
        lines.extend(["", f"## {title}", "",
                      f"Paired difference (method − {against}) per seed; mean ± standard error of the mean. "
                      "Negative is better. **better** / **worse**: beyond two standard errors.", ""])
        names = list(next(iter(table.values())).keys())
        lines.append("| method | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for m, per in table.items():
            cells = []
            for n in names:
                p = per[n]
                verdict = " **better**" if p["lower_beyond_2se"] else (" **worse**" if p["higher_beyond_2se"] else "")
                cells.append(f"{p['mean']:+.4g} ± {_fmt(p['se'], 2)}{verdict}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")

    paired_table("Paired differences against uniform", details["paired_vs_uniform"], BASELINE)
    paired_table("Rater methods against immiscible-knn (same K)", details["paired_vs_immiscible_knn"], KNN)
    if details["goal_met"]:
        lines += ["", "## The goal", "",
                  "A rater method meets the goal when it beats uniform on val_loss and frechet and beats "
                  "immiscible-knn on frechet, each beyond two standard errors.", ""]
        for m, ok in details["goal_met"].items():
            lines.append(f"- {m}: {'met' if ok else 'not met'}")
    lines += ["", "![held-out loss curves](curves.png)", ""]
    return "\n".join(lines)


def rerender(out_dir: str | Path) -> None:
    """Rewrite report.md from report.json and details.json (no training)."""
    out = Path(out_dir)
    report = json.loads((out / "report.json").read_text())
    details = json.loads((out / "details.json").read_text())
    (out / "report.md").write_text(render_markdown(report, details))


def plot_curves(runs: dict[str, list[Stage2Result]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, results in runs.items():
        steps = np.asarray(results[0].curve_steps)
        values = np.asarray([r.curve_val_loss for r in results])
        mean = values.mean(0)
        std = values.std(0, ddof=1) if len(results) > 1 else np.zeros_like(mean)
        for ax in axes:
            line = ax.plot(steps, mean, label=method, lw=1.5 if method == BASELINE else 1.0)[0]
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    half = len(steps) // 2
    tail = np.concatenate([np.asarray([r.curve_val_loss for r in rs])[:, half:].ravel() for rs in runs.values()])
    axes[1].set_xlim(steps[half], steps[-1])
    axes[1].set_ylim(float(tail.min()) * 0.995, float(np.percentile(tail, 95)) * 1.005)
    axes[0].set_yscale("log")
    for ax, sub in zip(axes, ("all steps (log)", "second half"), strict=True):
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out eps-MSE, Gaussian noise")
        ax.set_title(sub)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
