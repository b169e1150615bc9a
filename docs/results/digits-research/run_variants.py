"""Stage-2 research variants on digits: every variant trained with the bench's harness (`train_stage2`),
paired by seed against uniform at the same step budget. Appends one JSON line per run to results.jsonl
(so a partial sweep keeps what it measured); `summarise` turns them into the README table.

    python docs/results/digits-research/run_variants.py run --steps 1500 --seeds 3 --rater R.onnx --only NAME,...
    python docs/results/digits-research/run_variants.py summarise
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from noiserater.trainer.stage2 import variants
from noiserater.trainer.stage2.training import EvalContext, Stage2Config, train_stage2
from noiserater.trainer.substrate.data import load_dataset

HERE = Path(__file__).parent
RESULTS = HERE / "results.jsonl"
T_BUCKETS = 5

# name -> (method, config overrides, wrappers: [(builder in noiserater.trainer.stage2.variants, its arguments)],
#          rater key or None, what it tests)
VARIANTS: dict[str, tuple[str, dict, list[tuple[str, dict]], str | None, str]] = {
    "uniform": ("uniform", {}, [], None, "baseline"),
    "argmax-k8": ("rater-argmax", {"k": 8}, [], "default", "the first attempt: top-1 of K=8"),
    "argmax-k2": ("rater-argmax", {"k": 2}, [], "default", "milder selection: top-1 of K=2"),
    "sample-k8-t1": ("rater-sample", {"k": 8, "temperature": 1.0}, [], "default",
                     "softmax(s/1) over K=8: resampling at the stage-1 temperature (tau=1)"),
    "sample-k8-t4": ("rater-sample", {"k": 8, "temperature": 4.0}, [], "default", "softmax(s/4): milder still"),
    "assign": ("rater-assign", {}, [], "default", "batch assignment: noise multiset exactly Gaussian"),
    "kanneal-0.5": ("rater-kanneal", {"k": 8, "kanneal_end": 0.5}, [], "default", "K 8->1 over the first half"),
    "kanneal-0.2": ("rater-kanneal", {"k": 8, "kanneal_end": 0.2}, [], "default", "K 8->1 over the first fifth"),
    "argmax-early20": ("rater-argmax", {"k": 8}, [("windowed", {"stop": 0.2})], "default",
                       "top-1 of 8 only in the first 20% of steps, Gaussian after"),
    "argmax-late20": ("rater-argmax", {"k": 8}, [("windowed", {"start": 0.8})], "default",
                      "top-1 of 8 only in the last 20% of steps"),
    "immiscible-knn-k8": ("immiscible-knn", {"k": 8}, [], None, "peer: nearest of K=8"),
    "immiscible": ("immiscible", {}, [], None, "peer: batch assignment on L2"),
    "min-snr": ("min-snr", {}, [], None, "peer: Min-SNR-5 loss weighting"),
    "argmax-k8-symm": ("rater-argmax", {"k": 8}, [("symmetrised", {})], "default",
                       "top-1 of 8, then a random sign per sample (removes the selection's mean shift)"),
    "sample-k8-t1-symm": ("rater-sample", {"k": 8, "temperature": 1.0}, [("symmetrised", {})], "default",
                          "softmax(s/1) over K=8, random sign"),
    "argmax-k8-tmin200": ("rater-argmax", {"k": 8}, [("t_threshold", {"t_min": 200})], "default",
                          "top-1 of 8 only where t >= 200 (Gaussian at low t, where argmax hurt most)"),
    "sample-k8-t1-tmin200": ("rater-sample", {"k": 8, "temperature": 1.0}, [("t_threshold", {"t_min": 200})],
                             "default", "softmax(s/1) over 8 only where t >= 200"),
    "sample-k8-t1-is": ("rater-sample", {"k": 8, "temperature": 1.0}, [("importance_weighted", {})], "default",
                        "softmax(s/1) over 8 with loss weight 1/(K p): unbiased (importance sampling)"),
    "kanneal-0.5-symm": ("rater-kanneal", {"k": 8, "kanneal_end": 0.5}, [("symmetrised", {})], "default",
                         "K 8->1 over the first half, random sign"),
    "argmax-k8-u3": ("rater-argmax", {"k": 8}, [], "u3", "rater meta-learned with U=3 unrolled steps"),
    "sample-k8-t1-u3": ("rater-sample", {"k": 8, "temperature": 1.0}, [], "u3", "U=3 rater, softmax tau=1"),
    "assign-u3": ("rater-assign", {}, [], "u3", "U=3 rater, batch assignment"),
    "argmax-k8-random": ("rater-argmax", {"k": 8}, [], "random",
                         "control: an untrained rater of the same architecture (torch.manual_seed(0))"),
    "sample-k8-t1-random": ("rater-sample", {"k": 8, "temperature": 1.0}, [], "random",
                            "control: untrained rater, tau=1"),
    "argmax-k8-g8": ("rater-argmax", {"k": 8}, [], "g8",
                     "rater meta-learned with weights softmaxed within groups of 8 noises per (x0, t)"),
    "sample-k8-t1-g8": ("rater-sample", {"k": 8, "temperature": 1.0}, [], "g8", "grouped rater, softmax tau=1"),
    "kanneal-0.5-g8": ("rater-kanneal", {"k": 8, "kanneal_end": 0.5}, [], "g8", "grouped rater, K 8->1 over half"),
}


def build_wrappers(specs: list[tuple[str, dict]]) -> list[variants.Wrap]:
    return [getattr(variants, builder)(**arguments) for builder, arguments in specs]


def per_bucket(ctx: EvalContext, model) -> list[float]:
    losses = ctx.val.per_sample(model)
    edges = torch.linspace(0, ctx.schedule.num_timesteps, T_BUCKETS + 1)
    return [float(losses[(ctx.val.t >= lo) & (ctx.val.t < hi)].mean()) for lo, hi in zip(edges[:-1], edges[1:],
                                                                                            strict=True)]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    data = load_dataset("digits")
    raters = dict(kv.split("=", 1) for kv in args.rater)
    base = Stage2Config(steps=args.steps, sample_steps=args.sample_steps)
    ctx = EvalContext.build(data, base)
    names = args.only.split(",") if args.only else list(VARIANTS)
    done = set()
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["variant"], r["steps"], r["seed"]))
    for name in names:  # variant-major: each variant finishes its seeds before the next starts
        for seed in range(args.seeds):
            if (name, args.steps, seed) in done:
                continue
            method, overrides, wrapper_specs, rater_key, _ = VARIANTS[name]
            if rater_key is not None and rater_key not in raters:
                print(f"skip {name}: no rater {rater_key!r}")
                continue
            cfg = Stage2Config(**{**base.__dict__, **overrides})
            started = time.time()
            result = train_stage2(data, method, args.steps, seed, rater=raters.get(rater_key) if rater_key else None,
                                  config=cfg, context=ctx, wrappers=build_wrappers(wrapper_specs), keep_model=True)
            row = {"variant": name, "method": method, "overrides": overrides, "wrappers": wrapper_specs,
                   "rater": raters.get(rater_key),
                   "steps": args.steps, "seed": seed, "metrics": result.metrics,
                   "val_by_t_bucket": per_bucket(ctx, result.denoiser),
                   "curve_steps": result.curve_steps, "curve_val_loss": result.curve_val_loss,
                   "wall_s": time.time() - started}
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} seed {seed}: val {result.metrics['val_loss']:.4f} frechet "
                  f"{result.metrics.get('frechet', float('nan')):.2f} ({row['wall_s']:.0f}s)", flush=True)


BENCH = HERE.parent / "bench-digits" / "details.json"
BENCH_NAMES = {"uniform": "uniform", "rater-argmax": "argmax-k8", "rater-sample": "sample-k8-t1",
               "rater-assign": "assign", "rater-kanneal": "kanneal-0.5", "immiscible": "immiscible",
               "immiscible-knn": "immiscible-knn-k8", "min-snr": "min-snr"}


def bench_rows() -> list[dict]:
    """The committed bench's runs as variant rows (same harness, seeds and settings: the bench's uniform is
    the research variants' paired baseline at that step budget)."""
    if not BENCH.exists():
        return []
    details = json.loads(BENCH.read_text())
    return [{"variant": BENCH_NAMES[r["method"]], "steps": r["steps"], "seed": r["seed"], "metrics": r["metrics"],
             "val_by_t_bucket": None, "source": "bench"} for r in details["runs"] if r["method"] in BENCH_NAMES]


def summarise(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    seen = {(r["variant"], r["steps"], r["seed"]) for r in rows}
    rows += [r for r in bench_rows() if (r["variant"], r["steps"], r["seed"]) not in seen]
    by: dict[tuple[str, int], dict[int, dict]] = {}
    for r in rows:
        by.setdefault((r["variant"], r["steps"]), {})[r["seed"]] = r
    metrics = ("val_loss", "frechet", "swd")
    lines = ["| variant | steps | seeds | what it tests | " + " | ".join(f"Δ{m} vs uniform" for m in metrics)
             + " | ‖eps‖²/d | cos(eps,x0) | Δval by t-bucket (low t → high t) |",
             "|---" * (7 + len(metrics)) + "|"]
    for (name, steps), seeds in sorted(by.items(), key=lambda kv: (kv[0][1], list(VARIANTS).index(kv[0][0]))):
        if name == "uniform":
            continue
        base = by.get(("uniform", steps), {})
        common = sorted(set(seeds) & set(base))
        if not common:
            continue
        cells = []
        for m in metrics:
            d = np.array([seeds[s]["metrics"][m] - base[s]["metrics"][m] for s in common])
            se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            verdict = " **better**" if d.mean() < -2 * se else (" **worse**" if d.mean() > 2 * se else "")
            cells.append(f"{d.mean():+.4f} ± {se:.4f}{verdict}" if m != "frechet" else
                         f"{d.mean():+.2f} ± {se:.2f}{verdict}")
        norm = np.mean([seeds[s]["metrics"]["noise_sq_norm_per_dim"] for s in common])
        cos = np.mean([seeds[s]["metrics"]["noise_cosine_with_x0"] for s in common])
        if all(seeds[s].get("val_by_t_bucket") and base[s].get("val_by_t_bucket") for s in common):
            buckets = np.mean([np.array(seeds[s]["val_by_t_bucket"]) - np.array(base[s]["val_by_t_bucket"])
                               for s in common], axis=0)
            bucket_text = " ".join(f"{b:+.4f}" for b in buckets)
        else:
            bucket_text = "—"
        source = " (bench)" if all(seeds[s].get("source") == "bench" for s in common) else ""
        lines.append(f"| {name}{source} | {steps} | {len(common)} | {VARIANTS[name][-1]} | " + " | ".join(cells)
                     + f" | {norm:.3f} | {cos:+.3f} | {bucket_text} |")
    uni = {(r["steps"], r["seed"]): r for r in rows if r["variant"] == "uniform"}
    lines.append("")
    lines.append("Uniform's absolute values: " + "; ".join(
        f"{steps} steps: val {np.mean([r['metrics']['val_loss'] for (s, _), r in uni.items() if s == steps]):.4f}, "
        f"frechet {np.mean([r['metrics']['frechet'] for (s, _), r in uni.items() if s == steps]):.2f}"
        for steps in sorted({s for s, _ in uni})))
    text = "\n".join(lines) + "\n"
    (HERE / "variants_table.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--rater", action="append", default=[], help="key=path.onnx (keys: default, u3, g8, random)")
    p.add_argument("--only", default="")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the rows are appended to")
    sub.add_parser("summarise")
    args = parser.parse_args()
    run(args) if args.cmd == "run" else summarise(args)


if __name__ == "__main__":
    main()
