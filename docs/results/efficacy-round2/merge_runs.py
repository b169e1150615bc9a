"""Write one report from the runs that `nrctl bench train` logged (OUT/runs.jsonl, a line per finished run) in
one or more benchmark folders of the same dataset, objective and budget, as if one invocation had run them.

OUT gets the report files and runs.jsonl, the runs it kept (OUT may be one of the inputs). Used when a
bench was stopped before its end (the study's were, to fit the machine's time): only the seeds
that every method finished are kept, so the comparison stays paired. Runs are paired by seed exactly as in one
invocation (per seed, the same init, batches and timesteps); a folder's uniform runs must agree with another's
in every non-timing value (to float rounding), else the join is refused.

    python docs/results/efficacy-round2/merge_runs.py OUT IN1 [IN2 ...] --plugin docs/results/efficacy-round2/raters.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

from noiserater.trainer.bench.train import BASELINE, BenchRuns
from noiserater.trainer.bench.train_report import variance_ceiling, write_report
from noiserater.trainer.stage2.sources import load_plugin
from noiserater.trainer.stage2.training import EvalContext, Stage2Config, Stage2Result
from noiserater.trainer.substrate.data import load_dataset

TIMING = ("ms_per_step", "selection_ms_per_step")


def _values(result: dict) -> list:
    metrics = {k: v for k, v in result["metrics"].items() if k not in TIMING}
    return [*sorted(metrics.items()), *enumerate(result["curve_val_loss"])]


def same_run(a: dict, b: dict) -> bool:
    """The same training, up to float rounding: runs in worker processes and in one process differ in the
    last digits (relative 1e-6 here), so values must agree to a relative 1e-4."""
    def close(x: float | None, y: float | None) -> bool:
        if x is None or y is None:
            return x is y
        return math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-9)

    va, vb = _values(a), _values(b)
    return [k for k, _ in va] == [k for k, _ in vb] and all(close(x, y) for (_, x), (_, y) in zip(va, vb, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--plugin", action="append", default=[])
    parser.add_argument("--command", default="", help="The commands that made the inputs, for the report.")
    parser.add_argument("--dataset", default="digits", help="The dataset the runs trained on (default digits).")
    parser.add_argument("--methods", default="", help="Report only these methods (default: every logged one).")
    parser.add_argument("--variance", type=Path, help="A nrctl bench variance result to quote (its folder).")
    parser.add_argument("--rater", default="", help="The rater(s) the rater methods used, for the report.")
    args = parser.parse_args()
    for plugin in args.plugin:
        load_plugin(plugin)
    records = [json.loads(line) for d in args.inputs for line in (d / "runs.jsonl").read_text().splitlines()
               if line.strip()]
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")} | {BASELINE}
        records = [r for r in records if r["method"] in keep]
    if not records:
        sys.exit("no finished runs")
    by_method: dict[str, dict[int, dict]] = {}
    for r in records:
        seen = by_method.setdefault(r["method"], {}).get(r["seed"])
        if seen is not None and not same_run(seen, r):
            sys.exit(f"{r['method']} seed {r['seed']} differs between the folders: not the same setup")
        by_method[r["method"]][r["seed"]] = r
    if BASELINE not in by_method:
        sys.exit("uniform did not finish any seed")
    seeds = sorted(set.intersection(*(set(s) for s in by_method.values())))
    if not seeds:
        sys.exit("no seed finished for every method")
    defaults = asdict(Stage2Config())  # a setting added after a run was logged had its default value then

    def settings(r: dict) -> dict:
        return {k: v for k, v in {**defaults, **r["config"]}.items() if k != "k"}

    config = {**defaults, **records[0]["config"]}
    for r in records:
        if settings(r) != settings(records[0]):
            sys.exit(f"{r['method']} seed {r['seed']} ran with other settings")
    methods = [BASELINE, *dict.fromkeys(r["method"] for r in records if r["method"] != BASELINE)]
    runs = {m: [Stage2Result(**by_method[m][s]) for s in seeds] for m in methods}
    cfg = Stage2Config(**config)
    data = load_dataset(args.dataset)
    bench = BenchRuns(data, methods, seeds, cfg.steps, cfg, args.rater or None, EvalContext.build(data, cfg), runs,
                      0.0)
    dropped = sorted({s for per in by_method.values() for s in per} - set(seeds))
    note = f" (seeds {dropped} left out: not finished by every method)" if dropped else ""
    write_report(bench, args.out, command=args.command + note,
                 variance=variance_ceiling(args.variance) if args.variance else None)
    (args.out / "runs.jsonl").write_text("".join(json.dumps(by_method[m][s]) + "\n" for m in methods for s in seeds))
    print(f"{args.out}: {len(methods)} methods x seeds {seeds}{note}")


if __name__ == "__main__":
    main()
