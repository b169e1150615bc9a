"""The few-step part of the efficacy report: per-NFE tables, paired tests with a Holm correction, the goal
on the declared primary metric, and the plot of quality against NFE.

The primary metric is declared before any run: `frechet@4` (Fréchet distance to the held-out split of samples
drawn with 4 evaluations of the objective's deterministic sampler). Every other difference is one of a family
of paired tests — every method other than uniform, against uniform and against the best OT peer, on every
quality metric (val_loss, test_loss, frechet@N, swd@N, straightness@N) — and is marked only if it survives a
Holm correction over that whole family (family-wise error 0.05). Each test is a two-sided paired t-test over
seeds. `memorisation` is shown but not tested: it has no better direction.

The goal for a rater method: lower primary metric than uniform *and* than the best OT peer (the `ot…` method
with the lowest mean primary metric), both Holm-significant, with at least 5 paired seeds, while at the
reference NFE its frechet is not higher than uniform's beyond two standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from noiserater.trainer.bench.train import BASELINE, BenchRuns
from noiserater.trainer.stage2.sources import is_rater_method
from noiserater.trainer.stage2.sweep import PRIMARY, SWEEP_METRICS
from noiserater.trainer.stage2.training import steps_to_reach

ALPHA = 0.05
MIN_GOAL_SEEDS = 5
UNTESTED = ("memorisation",)


def is_ot_peer(method: str) -> bool:
    return method == "ot" or method.startswith("ot-")


def sweep_metrics(metrics: dict[str, float]) -> list[str]:
    return [name for name in metrics if "@" in name or name in UNTESTED]


def tested_metrics(report: dict[str, Any]) -> list[str]:
    names = report[BASELINE].keys()
    return [m for m in names if m in ("val_loss", "test_loss") or ("@" in m and m.split("@")[0] in SWEEP_METRICS)]


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired a - b over seeds: mean, standard error, two-sided paired t-test p-value."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    if n < 2:
        p = float("nan")
    elif se == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean / se), df=n - 1))
    return {"mean": mean, "se": se, "p": p, "diffs": [float(x) for x in d]}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN stays NaN and does not count towards the family size)."""
    order = [i for i in np.argsort(p_values) if not math.isnan(p_values[i])]
    m = len(order)
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def best_ot_peer(report: dict[str, Any], methods: Sequence[str]) -> str | None:
    peers = [m for m in methods if is_ot_peer(m) and report[m].get(PRIMARY, {}).get("mean") is not None]
    return min(peers, key=lambda m: report[m][PRIMARY]["mean"]) if peers else None


def comparisons(report: dict[str, Any], methods: Sequence[str]) -> tuple[list[dict[str, Any]], str | None]:
    """Every paired test of the family, Holm-adjusted together; and the best OT peer's name."""
    best_ot = best_ot_peer(report, methods)
    metrics = tested_metrics(report)
    family = []
    for against in (BASELINE, best_ot):
        if against is None:
            continue
        for method in methods:
            if method in (BASELINE, against):
                continue
            for metric in metrics:
                test = paired_test(report[method][metric]["seeds"], report[against][metric]["seeds"])
                family.append({"method": method, "against": against, "metric": metric, **test})
    for row, adjusted in zip(family, holm([row["p"] for row in family]), strict=True):
        row["p_holm"] = adjusted
        significant = not math.isnan(adjusted) and adjusted < ALPHA
        row["verdict"] = ("better" if row["mean"] < 0 else "worse") if significant else "not significant"
    return family, best_ot


def _find(family: list[dict[str, Any]], method: str, against: str | None, metric: str) -> dict[str, Any] | None:
    for row in family:
        if row["method"] == method and row["against"] == against and row["metric"] == metric:
            return row
    return None


def goal(bench: BenchRuns, report: dict[str, Any], family: list[dict[str, Any]], best_ot: str | None,
         reference_nfe: int) -> dict[str, Any]:
    """Per rater method: met / not met / not measured, with the evidence, and how many steps uniform needed
    to reach the method's primary value (from uniform's primary-metric curve, same seed)."""
    out: dict[str, Any] = {}
    seeds = len(bench.seeds)
    ref_metric = f"frechet@{reference_nfe}"
    for method in bench.methods:
        if not is_rater_method(method):
            continue
        vs_uniform = _find(family, method, BASELINE, PRIMARY)
        vs_ot = _find(family, method, best_ot, PRIMARY) if best_ot else None
        at_ref = _find(family, method, BASELINE, ref_metric)
        missing = []
        if seeds < MIN_GOAL_SEEDS:
            missing.append(f"{MIN_GOAL_SEEDS} paired seeds (ran {seeds})")
        if vs_uniform is None:
            missing.append(f"{PRIMARY} (no few-step sweep)")
        if best_ot is None:
            missing.append("an OT peer (none among the methods)")
        parts = {
            "beats_uniform": None if vs_uniform is None else vs_uniform["verdict"] == "better",
            "beats_best_ot": None if vs_ot is None else vs_ot["verdict"] == "better",
            "no_worse_at_reference": None if at_ref is None else not (at_ref["mean"] > 2 * at_ref["se"]),
        }
        met = False if False in parts.values() else (None if missing or None in parts.values() else True)
        uniform_steps = []
        targets = report[method].get(PRIMARY, {}).get("seeds") or []
        for result, target in zip(bench.runs[BASELINE], targets, strict=False):
            reached = steps_to_reach(result.curve_steps, result.curve_primary, target) if result.curve_primary else None
            uniform_steps.append(reached)
        out[method] = {"met": met, "missing": missing, **parts,
                       "uniform_steps_to_reach_primary": uniform_steps, "budget": bench.steps}
    return out


def markdown(report: dict[str, Any], family: list[dict[str, Any]], best_ot: str | None,
             goals: dict[str, Any], methods: Sequence[str], nfes: Sequence[int], reference_nfe: int) -> list[str]:
    def fmt(x: float | None, digits: int = 4) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "—"
        return f"{x:.{digits}g}"

    def se_of(values: Sequence[float]) -> float:
        v = [x for x in values if x is not None]
        return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")

    lines = ["", f"## Sample quality against NFE (primary metric, declared in advance: `{PRIMARY}`)", "",
             "Mean ± standard error over seeds. Marks on the paired difference against uniform: **better** / "
             "**worse** = significant after the Holm correction over every method × metric × comparison "
             f"(family of {len(family)} paired t-tests, α = {ALPHA}); unmarked = not significant.", ""]
    for metric in SWEEP_METRICS:
        cols = [*nfes, reference_nfe] if metric != "straightness" else list(nfes)
        names = [f"{metric}@{n}" for n in cols if f"{metric}@{n}" in report[BASELINE]]
        if not names:
            continue
        lines += [f"### {metric}" + (" (distance to the reference-NFE sample from the same start; lower is "
                                      "straighter)" if metric == "straightness" else " (against the held-out split)"),
                  "", "| method | " + " | ".join(n.split("@")[1] + " NFE" for n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for m in methods:
            cells = []
            for n in names:
                s = report[m][n]
                row = _find(family, m, BASELINE, n)
                mark = f" **{row['verdict']}**" if row and row["verdict"] != "not significant" else ""
                cells.append(f"{fmt(s['mean'])} ± {fmt(se_of(s['seeds']), 2)}{mark}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if "memorisation" in report[BASELINE]:
        lines += ["`memorisation` (reference-NFE samples' mean distance to the nearest training item over the "
                  "held-out items'; below 1 = closer to training data than unseen data is): "
                  + ", ".join(f"{m} {fmt(report[m]['memorisation']['mean'], 3)}" for m in methods) + ".", ""]
    for against in (BASELINE, best_ot):
        if against is None:
            continue
        rows = [r for r in family if r["against"] == against and r["metric"] == PRIMARY]
        lines += [f"### Paired differences on `{PRIMARY}` against {against}"
                  + (" (the best OT peer)" if against == best_ot else ""), "",
                  "| method | mean ± SE | p | p (Holm) | verdict |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['mean']:+.4g} ± {fmt(r['se'], 2)} | {fmt(r['p'], 3)} | "
                         f"{fmt(r['p_holm'], 3)} | {r['verdict']} |")
        lines.append("")
    survivors = [r for r in family if r["verdict"] != "not significant"]
    lines += ["### Every difference that survives Holm", ""]
    if survivors:
        lines += [f"- {r['method']} vs {r['against']}, {r['metric']}: {r['mean']:+.4g} ± {fmt(r['se'], 2)} "
                  f"(p Holm {fmt(r['p_holm'], 3)}): **{r['verdict']}**" for r in survivors]
    else:
        lines.append("- none")
    lines += ["", "### The goal", "",
              f"A rater method meets it when its `{PRIMARY}` is lower than uniform's and the best OT peer's "
              f"({best_ot or 'none ran'}), both Holm-significant over at least {MIN_GOAL_SEEDS} paired seeds, and "
              f"its frechet@{reference_nfe} is not higher than uniform's beyond two standard errors.", ""]
    if not goals:
        lines.append("- no rater method ran")
    for m, g in goals.items():
        status = {True: "met", False: "not met", None: "not measured"}[g["met"]]
        detail = ", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'no' if v is False else '—'}"
                           for k, v in g.items() if k in ("beats_uniform", "beats_best_ot", "no_worse_at_reference"))
        steps = g["uniform_steps_to_reach_primary"]
        reached = [s for s in steps if s is not None]
        lines.append(f"- {m}: **{status}** ({detail})" + (f"; missing: {'; '.join(g['missing'])}" if g["missing"]
                                                           else "")
                     + f"; uniform reached its {PRIMARY} within the {g['budget']}-step budget on {len(reached)}/"
                     f"{len(steps)} seeds" + (f" (mean step {np.mean(reached):.0f})" if reached else ""))
    return lines


def plot_quality_vs_nfe(report: dict[str, Any], methods: Sequence[str], nfes: Sequence[int], reference_nfe: int,
                        path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [*nfes, reference_nfe]
    for m in methods:
        for ax, metric, cols in ((axes[0], "frechet", xs), (axes[1], "straightness", list(nfes))):
            names = [f"{metric}@{n}" for n in cols]
            if not all(n in report[m] for n in names):
                continue
            values = np.asarray([report[m][n]["seeds"] for n in names], dtype=float)
            mean = values.mean(1)
            se = values.std(1, ddof=1) / math.sqrt(values.shape[1]) if values.shape[1] > 1 else np.zeros_like(mean)
            line = ax.plot(cols, mean, marker="o", ms=3, label=m, lw=1.8 if m == BASELINE else 1.0)[0]
            ax.fill_between(cols, mean - se, mean + se, color=line.get_color(), alpha=0.15)
    for ax, label in zip(axes, ("Fréchet to held-out (lower is better)", "distance to reference sample"),
                         strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("function evaluations (NFE)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
