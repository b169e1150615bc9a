"""Scoring candidate noises with an exported rater: the ONNX signature, request validation, the
expansion of K candidates into (x0, t, eps) triples and the choice of indices from their scores.

The server (behind its batcher) and the in-process `NoiseSelector.local` both go through these
functions, which is what makes local and remote selections identical.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from noiserater.core import selection

# The rater's ONNX signature: score = r(x0, t, eps).
INPUT_X0, INPUT_T, INPUT_EPS, OUTPUT_SCORE = "x0", "t", "eps", "score"
INPUT_NAMES = (INPUT_X0, INPUT_T, INPUT_EPS)

# Metadata keys the exporter writes into the ONNX file (values are strings; JSON where structured).
META_DATA_SHAPE = "noiserater.data_shape"  # JSON list, e.g. [64] or [1, 8, 8]
META_NUM_TIMESTEPS = "noiserater.num_timesteps"
META_SCHEDULE = "noiserater.schedule"
META_DATASET = "noiserater.dataset"
META_PROVENANCE = "noiserater.provenance"  # JSON object
META_EXPORTED_AT = "noiserater.exported_at"
META_FORMAT = "noiserater.format"
FORMAT_VERSION = "1"

RULE_TOP_K, RULE_SAMPLE, RULE_ASSIGN = selection.RULES


class ScoringError(ValueError):
    """A request that cannot be scored; the message starts with the offending field."""


@dataclass(frozen=True)
class RaterInfo:
    """What a rater file says about itself."""

    data_shape: tuple[int, ...]
    num_timesteps: int
    dataset: str = ""
    schedule: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> RaterInfo:
        try:
            data_shape = tuple(int(d) for d in json.loads(metadata[META_DATA_SHAPE]))
            num_timesteps = int(metadata[META_NUM_TIMESTEPS])
        except (KeyError, ValueError, TypeError) as exc:
            raise ScoringError(
                f"model: ONNX metadata lacks a valid {META_DATA_SHAPE} / {META_NUM_TIMESTEPS} ({exc}); "
                "export the rater with `nrctl export`"
            ) from None
        return cls(
            data_shape=data_shape,
            num_timesteps=num_timesteps,
            dataset=metadata.get(META_DATASET, ""),
            schedule=metadata.get(META_SCHEDULE, ""),
            metadata=dict(metadata),
        )


def _check_finite(name: str, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ScoringError(f"{name}: contains NaN or Inf")


def validate_triples(info: RaterInfo, x0: np.ndarray, t: np.ndarray, eps: np.ndarray) -> None:
    """Shapes, dtypes, finiteness and timestep range of a Score request."""
    if x0.ndim < 1 or tuple(x0.shape[1:]) != info.data_shape:
        raise ScoringError(f"x0: shape {list(x0.shape)} does not match [N, *{list(info.data_shape)}]")
    if eps.shape != x0.shape:
        raise ScoringError(f"eps: shape {list(eps.shape)} differs from x0's {list(x0.shape)}")
    _validate_common(info, x0, t)
    _check_finite("eps", eps)


def validate_selection(info: RaterInfo, x0: np.ndarray, t: np.ndarray, candidates: np.ndarray, k: int,
                       rule: str, temperature: float = 1.0) -> None:
    """Everything a SelectNoise request must satisfy before it is scored."""
    if x0.ndim < 1 or tuple(x0.shape[1:]) != info.data_shape:
        raise ScoringError(f"x0: shape {list(x0.shape)} does not match [B, *{list(info.data_shape)}]")
    batch = x0.shape[0]
    if candidates.ndim != x0.ndim + 1 or candidates.shape[0] != batch or candidates.shape[2:] != x0.shape[1:]:
        raise ScoringError(
            f"candidates: shape {list(candidates.shape)} does not match [B={batch}, K, *{list(info.data_shape)}]"
        )
    num_candidates = candidates.shape[1]
    try:
        selection.check_k(k, num_candidates)
    except selection.SelectionError as exc:
        raise ScoringError(str(exc)) from None
    if rule == RULE_ASSIGN and (num_candidates != 1 or k != 1):
        raise ScoringError(f"candidates: rule 'assign' needs K=1 and k=1 (got K={num_candidates}, k={k})")
    if rule not in selection.RULES:
        raise ScoringError(f"rule: unknown rule {rule!r} (one of {', '.join(selection.RULES)})")
    if rule == RULE_SAMPLE and not temperature > 0:
        raise ScoringError(f"temperature: must be > 0 for rule 'sample', got {temperature}")
    _validate_common(info, x0, t)
    _check_finite("candidates", candidates)


def _validate_common(info: RaterInfo, x0: np.ndarray, t: np.ndarray) -> None:
    if x0.dtype.kind != "f":
        raise ScoringError(f"x0: dtype {x0.dtype} is not a float type")
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ScoringError(f"t: shape {list(t.shape)} does not match [B={x0.shape[0]}]")
    if t.dtype.kind not in "iu":
        raise ScoringError(f"t: dtype {t.dtype} is not an integer type")
    if t.size and (t.min() < 0 or t.max() >= info.num_timesteps):
        raise ScoringError(f"t: timesteps must lie in [0, {info.num_timesteps}), got [{t.min()}, {t.max()}]")
    _check_finite("x0", x0)


def expand_candidates(x0: np.ndarray, t: np.ndarray, candidates: np.ndarray, rule: str = RULE_TOP_K):
    """The (x0, t, eps) triples to score for a selection, as float32 / int64 arrays.

    top_k and sample: every sample against its own K candidates -> B*K triples, row-major in (b, k).
    assign: every sample against every sample's single candidate -> B*B triples, row-major in (i, j).
    """
    batch = x0.shape[0]
    x0 = np.asarray(x0, dtype=np.float32)
    t = np.asarray(t, dtype=np.int64)
    if rule == RULE_ASSIGN:
        pool = np.asarray(candidates[:, 0], dtype=np.float32)
        return (np.repeat(x0, batch, axis=0), np.repeat(t, batch), np.tile(pool, (batch,) + (1,) * (pool.ndim - 1)))
    num_candidates = candidates.shape[1]
    eps = np.asarray(candidates, dtype=np.float32).reshape((batch * num_candidates,) + x0.shape[1:])
    return np.repeat(x0, num_candidates, axis=0), np.repeat(t, num_candidates), eps


def choose(flat_scores: np.ndarray, batch: int, num_candidates: int, k: int, rule: str = RULE_TOP_K,
           temperature: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of `expand_candidates`' triples -> (indices int64 [B, k], chosen scores float32 [B, k])."""
    if rule == RULE_ASSIGN:
        matrix = flat_scores.reshape(batch, batch)
        indices = selection.assign(matrix)[:, None]
        return indices, np.take_along_axis(matrix, indices, axis=1).astype(np.float32)
    scores = flat_scores.reshape(batch, num_candidates)
    if rule == RULE_SAMPLE:
        indices = selection.sample(scores, k, temperature, seed)
    else:
        indices = selection.top_k(scores, k)
    return indices, np.take_along_axis(scores, indices, axis=1).astype(np.float32)


def num_triples(batch: int, num_candidates: int, rule: str) -> int:
    return batch * batch if rule == RULE_ASSIGN else batch * num_candidates


def default_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for `device` (auto: CUDA when this onnxruntime has it)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError("device 'cuda' requested but onnxruntime has no CUDAExecutionProvider")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class RaterSession:
    """An onnxruntime session over an exported rater: validated signature, metadata, `score()`."""

    def __init__(self, model: bytes | str | Path, device: str = "auto", intra_op_threads: int = 0,
                 graph_optimization: str = "all"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        options.log_severity_level = 3
        source = str(model) if isinstance(model, Path) else model
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=default_providers(device))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ScoringError(f"model: onnxruntime cannot load it: {str(exc).splitlines()[0]}") from None
        names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if sorted(names) != sorted(INPUT_NAMES) or outputs != [OUTPUT_SCORE]:
            raise ScoringError(
                f"model: signature inputs {names} -> outputs {outputs}; a rater needs inputs "
                f"{list(INPUT_NAMES)} -> output ['{OUTPUT_SCORE}']"
            )
        self.info = RaterInfo.from_metadata(dict(self.session.get_modelmeta().custom_metadata_map))
        self.provider = self.session.get_providers()[0]

    def score(self, x0: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """float32 scores [N] of N triples."""
        feeds: dict[str, Any] = {
            INPUT_X0: np.ascontiguousarray(x0, dtype=np.float32),
            INPUT_T: np.ascontiguousarray(t, dtype=np.int64),
            INPUT_EPS: np.ascontiguousarray(eps, dtype=np.float32),
        }
        (out,) = self.session.run([OUTPUT_SCORE], feeds)
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def warm_up(self, batch: int = 4) -> None:
        """One run on zeros, so the first request does not pay for lazy initialisation."""
        shape = (batch,) + self.info.data_shape
        scores = self.score(np.zeros(shape, np.float32), np.zeros(batch, np.int64), np.zeros(shape, np.float32))
        if scores.shape != (batch,) or not np.isfinite(scores).all():
            raise ScoringError(f"model: warm-up produced scores of shape {list(scores.shape)} or non-finite values")

    def select(self, x0: np.ndarray, t: np.ndarray, candidates: np.ndarray, k: int, rule: str = RULE_TOP_K,
               temperature: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Validate, score and choose in one call (the in-process path)."""
        validate_selection(self.info, x0, t, candidates, k, rule, temperature)
        flat = self.score(*expand_candidates(x0, t, candidates, rule))
        return choose(flat, x0.shape[0], candidates.shape[1], k, rule, temperature, seed)


def data_size(info: RaterInfo) -> int:
    return math.prod(info.data_shape)
