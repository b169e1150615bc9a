"""The efficacy benchmark (`nrctl bench train`), reporting half: from the runs of `bench.train.run_bench`,
writes into the output folder

- `report.json`: method -> metric -> {"mean", "std", "seeds": [per-seed values in seed order]} (exactly that);
- `details.json`: the command, the setup, the metric references (classifier accuracy, floors), the paired
  differences against uniform (and of the methods that need a rater against immiscible-knn) and every run's
  curve;
- `report.md`: the same for people, with mean ± std tables and paired differences with standard errors;
- `curves.png`: held-out loss (Gaussian noise, fixed seeds) against training step, mean ± std over seeds;
- with a few-step sweep (`Stage2Config.nfe`), the metrics `METRIC@NFE` in report.json, whose top level also
  says `"primary": "frechet@4"`, `"objective"` and `"reference_nfe"`; the Holm-corrected tests, the best OT peer
  and the goal on the primary metric in details.json (`sweep`) and report.md (`bench.sweep_report`); and
  `quality_vs_nfe.png`.

"Beats" means: the paired mean difference is below zero by more than two standard errors of that mean
(lower is better for every quality metric here). With one seed there is no standard error: the report shows
the values without error bars, and a goal that needs one is "not measured", as is a goal whose metric was
not measured (frechet under --no-quality) or whose reference method did not run.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noiserater.trainer.bench import sweep_report
from noiserater.trainer.bench.train import BASELINE, BenchRuns
from noiserater.trainer.stage2.sources import is_rater_method
from noiserater.trainer.stage2.training import Stage2Result, steps_to_reach

QUALITY_METRICS = ("val_loss", "test_loss", "frechet", "swd")  # lower is better; paired against uniform
COST_METRICS = ("ms_per_step", "selection_ms_per_step")
NOISE_METRICS = ("noise_sq_norm_per_dim", "noise_cosine_with_x0", "train_loss_selected")
STEP_METRIC = "steps_to_uniform_final"
KNN = "immiscible-knn"


def write_report(bench: BenchRuns, out_dir: str | Path, command: str = "",
                 variance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write report.json, details.json, report.md and curves.png into `out_dir`; return both dicts. `variance`
    (a `nrctl bench variance` result, `variance_ceiling` reads one) adds the variance ceiling to both."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(bench)
    details = build_details(bench, report, command)
    if variance is not None:
        details["variance_ceiling"] = ceiling_summary(variance, bench.data.name, bench.config.objective)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report, details))
    plot_curves(bench.runs, out / "curves.png", title=f"{bench.data.name}: held-out loss under Gaussian noise")
    if "sweep" in details:
        cfg = bench.config
        sweep_report.plot_quality_vs_nfe(report, bench.methods, sorted(cfg.nfe), cfg.reference_nfe,
                                         out / "quality_vs_nfe.png",
                                         title=f"{bench.data.name}, {cfg.objective} objective, {bench.steps} steps")
    return {"report": report, "details": details}


def variance_ceiling(path: str | Path) -> dict[str, Any]:
    """A `nrctl bench variance` result: its variance.json, or the --out folder that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / "variance.json"
    try:
        result = json.loads(path.read_text())
        if not isinstance(result["gradient"]["is_noise"]["ratio"], float) or "objective" not in result["model"]:
            raise ValueError("no ceiling ratio or objective")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--variance: {path} is not a nrctl bench variance result ({type(exc).__name__})") from None
    return result


def ceiling_summary(variance: dict[str, Any], dataset: str, objective: str) -> dict[str, Any]:
    """The figures of a variance measurement a report quotes; refused when it measured another dataset or
    objective than the bench's."""
    model, g = variance["model"], variance["gradient"]
    measured_on = model.get("measured_on", model.get("dataset"))
    if measured_on != dataset or model["objective"] != objective:
        raise ValueError(f"--variance: measured on {measured_on} with the {model['objective']} objective, the "
                         f"bench is {dataset} with {objective}")
    return {"ceiling_ratio": g["is_noise"]["ratio"], "ceiling_se": g.get("se", {}).get("ratio"),
            "ceiling_ratio_k": {k: v["ratio"] for k, v in g["is_noise_k"].items()},
            "eps_removed_ratio": g["eps_removed"]["ratio"], "fractions": g["fractions"],
            "model": {k: model.get(k) for k in ("denoiser", "steps", "seed", "val_loss")},
            "command": variance.get("command", "")}


def build_report(bench: BenchRuns) -> dict[str, dict[str, Any]]:
    """method -> metric -> summarise(per-seed values), plus the steps to reach uniform's final held-out loss."""
    runs = bench.runs
    metric_names = [m for m in (*QUALITY_METRICS, *COST_METRICS, *NOISE_METRICS) if m in runs[BASELINE][0].metrics]
    targets = [r.metrics["val_loss"] for r in runs[BASELINE]]
    metric_names += sweep_report.sweep_metrics(runs[BASELINE][0].metrics)
    report: dict[str, Any] = {}
    for method in bench.methods:
        report[method] = {name: summarise([r.metrics[name] for r in runs[method]]) for name in metric_names}
        report[method][STEP_METRIC] = summarise([
            steps_to_reach(r.curve_steps, r.curve_val_loss, target)
            for r, target in zip(runs[method], targets, strict=True)
        ])
    if bench.config.nfe:
        report.update(primary=sweep_report.PRIMARY, objective=bench.config.objective,
                      reference_nfe=bench.config.reference_nfe)
    return report


def method_report(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """report.json without its top-level settings (primary, objective, reference_nfe): method -> metric."""
    return {k: v for k, v in report.items() if isinstance(v, dict)}


def _paired_against(report: dict[str, Any], methods: Sequence[str], against: str) -> dict[str, Any]:
    quality = [m for m in QUALITY_METRICS if m in report[against]]
    return {method: {name: paired(report[method][name]["seeds"], report[against][name]["seeds"]) for name in quality}
            for method in methods}


def build_details(bench: BenchRuns, report: dict[str, Any], command: str = "") -> dict[str, Any]:
    methods, data, q = bench.methods, bench.data, bench.context.quality
    raters = [m for m in methods if is_rater_method(m)]
    vs_uniform = _paired_against(report, [m for m in methods if m != BASELINE], BASELINE)
    vs_knn = _paired_against(report, raters, KNN) if KNN in methods else {}
    goal = {method: goal_status(vs_uniform[method], vs_knn.get(method), len(bench.seeds)) for method in raters}
    sweep: dict[str, Any] = {}
    if bench.config.nfe:
        family, best_ot = sweep_report.comparisons(report, methods)
        goals = sweep_report.goal(bench, report, family, best_ot, bench.config.reference_nfe)
        goal = {m: (g["met"], g["missing"]) for m, g in goals.items()}
        sweep = {"sweep": {"primary": sweep_report.PRIMARY, "objective": bench.config.objective,
                           "nfe": sorted(bench.config.nfe), "reference_nfe": bench.config.reference_nfe,
                           "sampler": bench.config.sampler or "deterministic (ddim for eps, euler for flow)",
                           "starting_noises": bench.config.sweep_count, "best_ot_peer": best_ot,
                           "holm_family_size": len(family), "tests": family, "goal": goals,
                           "frechet_floor_train_vs_heldout": q.floor_frechet_heldout if q else None,
                           "swd_floor_train_vs_heldout": q.floor_swd_heldout if q else None}}
    return {
        "command": command,
        "dataset": data.name,
        "data_shape": list(data.data_shape),
        "split_sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "methods": methods,
        "seeds": bench.seeds,
        "steps": bench.steps,
        "rater": bench.rater,
        "config": asdict(bench.config),
        "references": {
            "feature_kind": q.feature_kind if q else None,
            "classifier_test_accuracy": q.classifier.test_accuracy if q and q.classifier else None,
            "frechet_floor_heldout_vs_train": q.floor_frechet if q else None,
            "swd_floor_heldout_vs_train": q.floor_swd if q else None,
            "heldout_count": q.heldout_count if q else None,
        },
        "paired_vs_uniform": vs_uniform,
        "paired_vs_immiscible_knn": vs_knn,
        "goal_met": {method: met for method, (met, _) in goal.items()},
        "goal_not_measured": {method: missing for method, (_, missing) in goal.items() if missing},
        "runs": [r.to_dict() for m in methods for r in bench.runs[m]],
        "wall_seconds": bench.wall_seconds,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        **sweep,
    }


def goal_status(vs_uniform: dict[str, Any], vs_knn: dict[str, Any] | None,
                seeds: int) -> tuple[bool | None, list[str]]:
    """(met, what was not measured) of the goal: beat uniform on val_loss and frechet and immiscible-knn on
    frechet, each beyond two standard errors. met is None when no measured part fails but a part could not
    be measured (False as soon as a measured part fails)."""
    missing = []
    if seeds < 2:
        missing.append("a standard error (needs at least 2 seeds)")
    if "frechet" not in vs_uniform:
        missing.append("frechet (sampling was skipped: --no-quality)")
    if vs_knn is None:
        missing.append(f"the comparison with {KNN} (not among the methods)")
    parts = [vs_uniform["val_loss"], vs_uniform.get("frechet"), (vs_knn or {}).get("frechet")]
    results = [None if part is None or seeds < 2 else bool(part["lower_beyond_2se"]) for part in parts]
    met = False if False in results else (None if None in results else True)
    return met, missing if met is None else []


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
        f"{cfg.get('objective', 'eps')} objective, {cfg['schedule']} schedule, T={cfg['num_timesteps']}.",
        f"- Rater: `{details['rater']}`; K={cfg['k']} candidates (also for immiscible-knn), "
        f"sample temperature {cfg['temperature']}, kanneal reaches K=1 at {cfg['kanneal_end']} of the run.",
        *([f"- Coupling knobs: ot-sinkhorn regularisation {cfg.get('ot_reg')} x the batch's mean squared distance; "
           f"ot-subbatch sub-batches of {cfg.get('ot_subbatch') or 'the whole batch'}."]
          if {"ot-sinkhorn", "ot-subbatch"} & set(methods) else []),
        f"- val_loss / test_loss: {'velocity' if cfg.get('objective') == 'flow' else 'eps'}-MSE on the held-out "
        f"split with *Gaussian* noise, {cfg['eval_repeats']} fixed "
        "(t, eps) draws per item, the same draws for every method.",
    ]
    if refs["feature_kind"] and "frechet" in report[methods[0]]:
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
                 f"({details['machine']['threads']} torch threads)." if details["wall_seconds"] else
                 "- Wall time: not recorded (the report was written from logged runs); per-run cost: "
                 "`ms_per_step`.")
    one_seed = len(details["seeds"]) < 2
    lines += ["", "## Values (one seed: no error bars)" if one_seed else "## Mean ± std over seeds", ""]
    cols = [c for c in (*QUALITY_METRICS, STEP_METRIC, *COST_METRICS, *NOISE_METRICS) if c in report[methods[0]]]
    lines.append("| method | " + " | ".join(cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for m in methods:
        cells = []
        for c in cols:
            s = report[m][c]
            cell = _fmt(s["mean"]) if one_seed else f"{_fmt(s['mean'])} ± {_fmt(s['std'], 2)}"
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
                      f"Difference (method − {against}) with one seed: no standard error, so no verdict. "
                      "Negative is better." if one_seed else
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
                cells.append(f"{p['mean']:+.4g}" if one_seed else f"{p['mean']:+.4g} ± {_fmt(p['se'], 2)}{verdict}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")

    paired_table("Paired differences against uniform", details["paired_vs_uniform"], BASELINE)
    paired_table("Rater methods against immiscible-knn (same K)", details["paired_vs_immiscible_knn"], KNN)
    sweep = details.get("sweep")
    if sweep:
        cfg_nfe = sweep["nfe"]
        lines += sweep_report.markdown(report, sweep["tests"], sweep["best_ot_peer"], sweep["goal"], methods,
                                       cfg_nfe, sweep["reference_nfe"])
        lines += ["", f"Few-step sweep: {sweep['starting_noises']} starting noises, the same for every method and "
                  f"seed; sampler {sweep['sampler']}; Fréchet floor (training split vs held-out split) "
                  f"{_fmt(sweep['frechet_floor_train_vs_heldout'])}, swd floor "
                  f"{_fmt(sweep['swd_floor_train_vs_heldout'])}.", "", "![quality against NFE](quality_vs_nfe.png)"]
    elif details["goal_met"]:
        lines += ["", "## The goal", "",
                  "A rater method meets the goal when it beats uniform on val_loss and frechet and beats "
                  "immiscible-knn on frechet, each beyond two standard errors.", ""]
        not_measured = details.get("goal_not_measured", {})
        for m, ok in details["goal_met"].items():
            if ok is None:
                lines.append(f"- {m}: not measured (missing: {'; '.join(not_measured.get(m, []))})")
            else:
                lines.append(f"- {m}: {'met' if ok else 'not met'}")
    ceiling = details.get("variance_ceiling")
    if ceiling:
        f = ceiling["fractions"]
        ks = ", ".join(f"K = {k}: {v:.3f}x" for k, v in sorted(ceiling["ceiling_ratio_k"].items(),
                                                                 key=lambda kv: int(kv[0])))
        lines += ["", "## Where the ceiling is (gradient variance)", "",
                  f"Of the per-sample gradient variance of a uniform-noise {ceiling['model']['denoiser']} denoiser "
                  f"({ceiling['model']['steps']} steps), t accounts for {100 * f['t']:.0f} %, x0 for "
                  f"{100 * f['x0']:.0f} % and the noise given (x0, t) for {100 * f['eps']:.0f} %. Any unbiased "
                  f"choice of noise could lower it at most **{ceiling['ceiling_ratio']:.3f}x** ({ks}); removing "
                  f"the noise part entirely, {ceiling['eps_removed_ratio']:.3f}x.",
                  *(["", f"Measured by: `{ceiling['command']}`"] if ceiling["command"] else [])]
    lines += ["", "![held-out loss curves](curves.png)", ""]
    return "\n".join(lines)


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
