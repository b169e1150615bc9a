"""The selection pipeline, written once: a `SelectionPlan` turns a batch and its candidate noises into the
(x0, t, eps) triples to score, and the triples' scores into the chosen indices.

The in-process selector, the rater server and stage 2 all run the same plan, so for the same scores and
seed they choose the same candidates, bit for bit:

    plan = SelectionPlan(num_candidates=8, keep=1, rule=Rule.TOP_K)
    plan.validate(info, x0, t, candidates)
    scores = session.score(*plan.triples(x0, t, candidates))
    indices, chosen_scores = plan.choose(scores, seed=0)

Vocabulary: K (`num_candidates`) is the number of candidates drawn per sample, `keep` the number of them
returned per sample (the wire's `keep`; a training job keeps 1).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from noiserater.core.scoring import RaterInfo, ScoringError, check_finite, check_float, validate_common
from noiserater.core.text import clip


class SelectionError(ScoringError):
    """Invalid selection arguments; the message starts with the offending field."""


class Rule(enum.Enum):
    """How candidate scores become choices. One enum from the client's argument to the wire and back."""

    TOP_K = "top_k"  # the `keep` best candidates of each sample, best first ("argmax" when keep is 1)
    SAMPLE = "sample"  # `keep` candidates drawn without replacement from softmax(score / temperature)
    ASSIGN = "assign"  # batch-level permutation of the batch's own noises maximising the summed score

    @classmethod
    def parse(cls, value: Rule | str) -> Rule:
        """A Rule from itself or its name; "argmax" is accepted for top_k (it is top_k with keep 1)."""
        if isinstance(value, Rule):
            return value
        name = str(value).lower()
        if name == "argmax":
            return cls.TOP_K
        try:
            return cls(name)
        except ValueError:
            raise SelectionError(f"rule: unknown rule {clip(value)} (one of argmax, "
                                 f"{', '.join(r.value for r in cls)})") from None

    @classmethod
    def from_proto(cls, number: int) -> Rule:
        """The wire's SelectionRule number (0, unspecified, means top_k)."""
        from noiserater.core.v1 import rater_service_pb2 as pb

        if number == pb.SELECTION_RULE_UNSPECIFIED:
            return cls.TOP_K
        try:
            return cls(pb.SelectionRule.Name(number).removeprefix("SELECTION_RULE_").lower())
        except ValueError:
            raise SelectionError(f"rule: unknown selection rule {number}") from None

    def to_proto(self) -> int:
        from noiserater.core.v1 import rater_service_pb2 as pb

        return pb.SelectionRule.Value(f"SELECTION_RULE_{self.value.upper()}")


def check_keep(keep: int, num_candidates: int) -> None:
    if num_candidates < 1:
        raise SelectionError(f"candidates: K must be at least 1, got K={num_candidates}")
    if keep < 1:
        raise SelectionError(f"keep: must be at least 1, got keep={keep}")
    if keep > num_candidates:
        raise SelectionError(f"keep: keep={keep} is larger than the number of candidates K={num_candidates}")


def top_k(scores: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` best candidates per row of `scores` [B, K], best first; ties go to the lower index."""
    check_keep(keep, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.ascontiguousarray(order[:, :keep]).astype(np.int64)


def sample(scores: np.ndarray, keep: int, temperature: float, seed: int) -> np.ndarray:
    """`keep` candidates per row drawn without replacement from softmax(scores / temperature).

    Gumbel-top-k: adding Gumbel noise to the logits and keeping the top `keep` is an exact draw without
    replacement. The draw depends only on (scores, temperature, seed).
    """
    check_keep(keep, scores.shape[1])
    if not temperature > 0:
        raise SelectionError(f"temperature: must be > 0 for rule 'sample', got {temperature}")
    gumbel = np.random.default_rng(seed).gumbel(size=scores.shape)
    return top_k(scores.astype(np.float64) / temperature + gumbel, keep)


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


@dataclass(frozen=True)
class SelectionPlan:
    """What one selection asks for: K candidates per sample, how many to keep, the rule and its temperature.

    Construction checks the plan on its own (SelectionError naming the field); `validate` checks a batch
    against it and the rater's metadata. For `Rule.ASSIGN` K and keep are both 1: each sample brings one
    Gaussian noise and the rule permutes them over the batch.
    """

    num_candidates: int
    keep: int = 1
    rule: Rule = Rule.TOP_K
    temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", Rule.parse(self.rule))
        object.__setattr__(self, "temperature", float(self.temperature))
        check_keep(self.keep, self.num_candidates)
        if self.rule is Rule.ASSIGN and (self.num_candidates != 1 or self.keep != 1):
            raise SelectionError(
                f"candidates: rule 'assign' needs K=1 and keep=1 (got K={self.num_candidates}, keep={self.keep})")
        if self.rule is Rule.SAMPLE and not self.temperature > 0:
            raise SelectionError(f"temperature: must be > 0 for rule 'sample', got {self.temperature}")

    @classmethod
    def for_candidates(cls, candidates: np.ndarray, keep: int, rule: Rule | str, temperature: float) -> SelectionPlan:
        """The plan of a request whose candidates tensor is [B, K, ...] (K read from its shape)."""
        if candidates.ndim < 2:
            raise SelectionError(f"candidates: shape {list(candidates.shape)} is not [B, K, ...]")
        return cls(int(candidates.shape[1]), keep, Rule.parse(rule), temperature)

    def num_triples(self, batch: int) -> int:
        """How many (x0, t, eps) triples the rater scores for a batch of `batch` samples."""
        return batch * batch if self.rule is Rule.ASSIGN else batch * self.num_candidates

    def validate(self, info: RaterInfo, x0: np.ndarray, t: np.ndarray, candidates: np.ndarray) -> None:
        """Everything a batch must satisfy before it is scored under this plan."""
        if x0.ndim < 1 or tuple(x0.shape[1:]) != info.data_shape:
            raise ScoringError(f"x0: shape {list(x0.shape)} does not match [B, *{list(info.data_shape)}]")
        batch = x0.shape[0]
        if batch == 0:
            raise ScoringError("x0: the batch is empty (B=0)")
        expected = (batch, self.num_candidates, *x0.shape[1:])
        if candidates.shape != expected:
            raise ScoringError(f"candidates: shape {list(candidates.shape)} does not match "
                               f"[B={batch}, K={self.num_candidates}, *{list(info.data_shape)}]")
        validate_common(info, x0, t)
        check_float("candidates", candidates)
        check_finite("candidates", candidates)

    def triples(self, x0: np.ndarray, t: np.ndarray, candidates: np.ndarray):
        """The (x0, t, eps) triples to score, as float32 / int64 arrays.

        top_k and sample: every sample against its own K candidates -> B*K triples, row-major in (b, k).
        assign: every sample against every sample's single candidate -> B*B triples, row-major in (i, j).
        """
        batch = x0.shape[0]
        x0 = np.asarray(x0, dtype=np.float32)
        t = np.asarray(t, dtype=np.int64)
        if self.rule is Rule.ASSIGN:
            pool = np.asarray(candidates[:, 0], dtype=np.float32)
            return np.repeat(x0, batch, axis=0), np.repeat(t, batch), np.tile(pool, (batch,) + (1,) * (pool.ndim - 1))
        eps = np.asarray(candidates, dtype=np.float32).reshape((batch * self.num_candidates,) + x0.shape[1:])
        return np.repeat(x0, self.num_candidates, axis=0), np.repeat(t, self.num_candidates), eps

    def score_matrix(self, flat_scores: np.ndarray) -> np.ndarray:
        """The triples' scores as [B, K] (top_k, sample) or [B, B] (assign)."""
        flat = np.asarray(flat_scores).reshape(-1)
        columns = self.num_candidates
        if self.rule is Rule.ASSIGN:
            columns = int(round(flat.size ** 0.5))
        if columns == 0 or flat.size % columns or (self.rule is Rule.ASSIGN and columns * columns != flat.size):
            raise SelectionError(f"scores: {flat.size} scores do not fit the plan ({self.rule.value}, "
                                 f"K={self.num_candidates})")
        return flat.reshape(-1, columns)

    def choose(self, flat_scores: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Scores of `triples` -> (indices int64 [B, keep], chosen scores float32 [B, keep]).

        For assign, indices[b, 0] is the sample whose noise sample b takes."""
        scores = self.score_matrix(flat_scores)
        if self.rule is Rule.ASSIGN:
            indices = assign(scores)[:, None]
        elif self.rule is Rule.SAMPLE:
            indices = sample(scores, self.keep, self.temperature, seed)
        else:
            indices = top_k(scores, self.keep)
        return indices, np.take_along_axis(scores, indices, axis=1).astype(np.float32)

    def log_probs(self, flat_scores: np.ndarray) -> np.ndarray:
        """float64 [B, K]: log softmax(score / temperature) over each sample's candidates, the law `sample`
        draws its first choice from (importance weights of the chosen candidate are 1 / (K p))."""
        if self.rule is Rule.ASSIGN:
            raise SelectionError("rule: assign has no per-sample candidate law")
        logits = self.score_matrix(flat_scores).astype(np.float64) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    def select(self, score: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], info: RaterInfo,
               x0: np.ndarray, t: np.ndarray, candidates: np.ndarray,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Validate, score with `score(x0, t, eps) -> [N]` and choose, in one call (the in-process path)."""
        self.validate(info, x0, t, candidates)
        return self.choose(score(*self.triples(x0, t, candidates)), seed)
