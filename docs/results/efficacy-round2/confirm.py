"""The confirmatory replication declared in this folder's README: one paired t-test of `frechet@4`,
`rater-de-argmax` against `ot`, over the seeds given (the new ones only), from a bench's runs.jsonl. Writes
confirm.json next to the report and prints it; uniform's paired figure is reported but is not part of the test.

    python docs/results/efficacy-round2/confirm.py runs/digits-flow-confirm/runs.jsonl --seeds 5-9 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from noiserater.trainer.bench.sweep_report import paired_test

METRIC, METHOD, AGAINST, ALPHA = "frechet@4", "rater-de-argmax", "ot", 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--seeds", required=True, help="FIRST-LAST, inclusive")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    first, last = (int(x) for x in args.seeds.split("-"))
    seeds = list(range(first, last + 1))
    values: dict[str, dict[int, float]] = {}
    for line in args.runs.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            values.setdefault(r["method"], {})[r["seed"]] = r["metrics"][METRIC]
    missing = [(m, s) for m in (METHOD, AGAINST, "uniform") for s in seeds if s not in values.get(m, {})]
    if missing:
        sys.exit(f"not finished: {missing}")
    per = {m: [values[m][s] for s in seeds] for m in (METHOD, AGAINST, "uniform")}
    test = paired_test(per[METHOD], per[AGAINST])
    result = {"metric": METRIC, "method": METHOD, "against": AGAINST, "seeds": seeds, "alpha": ALPHA,
              "values": per, "test": test, "confirmed": test["p"] < ALPHA and test["mean"] < 0,
              "vs_uniform_not_tested": paired_test(per[METHOD], per["uniform"])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "confirm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
