"""Selection rules: candidate scores -> chosen indices. Server and in-process selector both call these,
so a remote and a local selection over the same scores are identical.

All functions take numpy arrays of scores and return int64 indices.
"""

from __future__ import annotations

import numpy as np

RULES = ("top_k", "sample", "assign")


class SelectionError(ValueError):
    """Invalid selection arguments; the message names the field."""


def check_k(k: int, num_candidates: int) -> None:
    if num_candidates < 1:
        raise SelectionError(f"candidates: K must be at least 1, got K={num_candidates}")
    if k < 1:
        raise SelectionError(f"k: must be at least 1, got k={k}")
    if k > num_candidates:
        raise SelectionError(f"k: k={k} is larger than the number of candidates K={num_candidates}")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best candidates per row of `scores` [B, K], best first; ties go to the lower index."""
    check_k(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.ascontiguousarray(order[:, :k]).astype(np.int64)


def sample(scores: np.ndarray, k: int, temperature: float, seed: int) -> np.ndarray:
    """k candidates per row drawn without replacement from softmax(scores / temperature).

    Gumbel-top-k: adding Gumbel noise to the logits and keeping the top k is an exact draw without
    replacement. The draw depends only on (scores, temperature, seed).
    """
    check_k(k, scores.shape[1])
    if not temperature > 0:
        raise SelectionError(f"temperature: must be > 0 for rule 'sample', got {temperature}")
    gumbel = np.random.default_rng(seed).gumbel(size=scores.shape)
    return top_k(scores.astype(np.float64) / temperature + gumbel, k)


def assign(score_matrix: np.ndarray) -> np.ndarray:
    """Batch-level assignment on a [B, B] score matrix (row i = sample i, column j = noise j).

    Returns perm [B]: sample i takes noise perm[i]; perm is a permutation maximising the summed score,
    so the multiset of noises is unchanged.
    """
    from scipy.optimize import linear_sum_assignment

    if score_matrix.ndim != 2 or score_matrix.shape[0] != score_matrix.shape[1]:
        raise SelectionError(f"assign needs a square score matrix, got shape {list(score_matrix.shape)}")
    rows, cols = linear_sum_assignment(score_matrix, maximize=True)
    perm = np.empty(score_matrix.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def gather(candidates: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """candidates [B, K, ...], indices [B, k] -> [B, k, ...]."""
    b = np.arange(candidates.shape[0])[:, None]
    return candidates[b, indices]
