"""When in training does a method lead or lag uniform? Paired Δ held-out loss (method − uniform, Gaussian noise,
fixed seeds) at points along the committed bench's curves (docs/results/bench-digits/details.json).

    python docs/results/digits-research/when_selection_matters.py > docs/results/digits-research/when.md
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

DETAILS = Path(__file__).parent.parent / "bench-digits" / "details.json"


def main() -> None:
    details = json.loads(DETAILS.read_text())
    runs: dict[str, dict[int, dict]] = {}
    for r in details["runs"]:
        runs.setdefault(r["method"], {})[r["seed"]] = r
    steps = runs["uniform"][0]["curve_steps"]
    marks = [s for s in (100, 200, 300, 500, 1000, 1500, 2000) if s in steps]
    print("| method | " + " | ".join(f"step {s}" for s in marks) + " |")
    print("|---" * (len(marks) + 1) + "|")
    for method, seeds in runs.items():
        if method == "uniform":
            continue
        cells = []
        for s in marks:
            i = steps.index(s)
            d = np.array([seeds[k]["curve_val_loss"][i] - runs["uniform"][k]["curve_val_loss"][i] for k in seeds])
            se = d.std(ddof=1) / math.sqrt(len(d))
            mark = " ▼" if d.mean() < -2 * se else (" ▲" if d.mean() > 2 * se else "")
            cells.append(f"{d.mean():+.4f} ± {se:.4f}{mark}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    u = [np.mean([runs["uniform"][k]["curve_val_loss"][steps.index(s)] for k in runs["uniform"]]) for s in marks]
    print("| uniform (absolute) | " + " | ".join(f"{v:.4f}" for v in u) + " |")
    print("\n▼ lower (better) than uniform beyond two standard errors; ▲ higher (worse).")


if __name__ == "__main__":
    main()
