"""What does the rater's argmax actually select? Correlates the rater's scores with simple properties of
the candidate noise, and compares the selected noise with Gaussian noise, per timestep range.

    python docs/results/digits-research/analyse_rater.py RATER.onnx [more.onnx ...] > analysis.md

Scores come from the exported rater through `RaterSession` (the serving path); choices through the shared
selection functions.
"""

from __future__ import annotations

import sys

import numpy as np

from noiserater.core import scoring, selection
from noiserater.trainer.substrate.data import load_dataset

K, BATCHES, B = 8, 8, 128


def analyse(path: str) -> list[str]:
    session = scoring.RaterSession(path, device="cpu", intra_op_threads=1)
    data = load_dataset("digits").train.numpy()
    rng = np.random.default_rng(0)
    rows = {"score_corr": [], "sel": [], "t": [], "eps": []}
    for _ in range(BATCHES):
        x0 = data[rng.integers(0, len(data), B)]
        t = rng.integers(0, session.info.num_timesteps, B)
        cand = rng.standard_normal((B, K, x0.shape[1])).astype(np.float32)
        scores = session.score(*selection.SelectionPlan(K).triples(x0, t, cand)).reshape(B, K)
        norm = (cand ** 2).mean(-1)
        dot = (cand * x0[:, None]).sum(-1) / (np.linalg.norm(x0, axis=1)[:, None] * np.linalg.norm(cand, axis=-1))
        # within-sample (centred over the K candidates) correlations: what the argmax actually ranks by
        sc = scores - scores.mean(1, keepdims=True)
        rows["score_corr"].append([np.corrcoef(sc.ravel(), (f - f.mean(1, keepdims=True)).ravel())[0, 1]
                                   for f in (norm, dot)])
        idx = selection.top_k(scores, 1)[:, 0]
        rows["sel"].append(np.stack([norm[np.arange(B), idx], dot[np.arange(B), idx],
                                     scores.std(1)], 1))
        rows["t"].append(t)
        rows["eps"].append(cand[np.arange(B), idx])
    corr = np.mean(rows["score_corr"], 0)
    sel = np.concatenate(rows["sel"])
    t = np.concatenate(rows["t"])
    eps = np.concatenate(rows["eps"])
    # a systematic offset: the RMS over dimensions of the selected noise's mean (Gaussian: about 1/sqrt(N))
    offset = float(np.sqrt((eps.mean(0) ** 2).mean()))
    cov_eig = np.linalg.eigvalsh(np.cov(eps, rowvar=False))
    dim = eps.shape[1]
    out = [f"### `{path}`", "",
           f"- Within-sample correlation of the score with ||eps||²/d: {corr[0]:+.3f}; with cos(eps, x0): "
           f"{corr[1]:+.3f}.",
           f"- Argmax of K={K}: selected ||eps||²/d {sel[:, 0].mean():.3f} (Gaussian: 1.000), cos(eps, x0) "
           f"{sel[:, 1].mean():+.3f} (Gaussian: 0), score spread over the K (std) {sel[:, 2].mean():.3f}.",
           f"- Selected noise as a distribution over {len(eps)} draws: RMS of its mean {offset:.3f} (Gaussian: "
           f"{1 / np.sqrt(len(eps)):.3f}); covariance eigenvalues {cov_eig.min():.2f}..{cov_eig.max():.2f} "
           f"(Gaussian: 1, with this many draws about {(1 - np.sqrt(dim / len(eps))) ** 2:.2f}.."
           f"{(1 + np.sqrt(dim / len(eps))) ** 2:.2f}, Marchenko-Pastur).",
           "", "| t range | selected ‖eps‖²/d | selected cos(eps,x0) | score std over K |", "|---|---|---|---|"]
    edges = np.linspace(0, session.info.num_timesteps, 6).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (t >= lo) & (t < hi)
        out.append(f"| {lo}–{hi} | {sel[m, 0].mean():.3f} | {sel[m, 1].mean():+.3f} | {sel[m, 2].mean():.3f} |")
    return out + [""]


def random_rater(path: str) -> str:
    """The same rater architecture, untrained (torch.manual_seed(0)): the reference for what argmax does
    with scores that carry no meta-learned information at all."""
    import torch

    from noiserater.trainer.stage1.export import export_rater
    from noiserater.trainer.stage1.rater import build_rater

    torch.manual_seed(0)
    export_rater(build_rater("mlp", (64,), 1000), path, dataset="digits", schedule="linear")
    return path


if __name__ == "__main__":
    import tempfile

    lines = []
    for p in sys.argv[1:]:
        lines += analyse(p)
    with tempfile.TemporaryDirectory() as tmp:
        lines += analyse(random_rater(f"{tmp}/untrained-random-rater.onnx"))
    print("\n".join(lines))
