"""Scoring with an exported rater: the ONNX signature and metadata keys, the checks every scored batch
passes, and `RaterSession`, onnxruntime over one rater file. How candidates become triples and scores
become choices is `noiserater.core.selection.SelectionPlan`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


def check_finite(name: str, array: np.ndarray) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ScoringError(f"{name}: contains NaN or Inf")


def validate_triples(info: RaterInfo, x0: np.ndarray, t: np.ndarray, eps: np.ndarray) -> None:
    """Shapes, dtypes, finiteness and timestep range of a Score request."""
    if x0.ndim < 1 or tuple(x0.shape[1:]) != info.data_shape:
        raise ScoringError(f"x0: shape {list(x0.shape)} does not match [N, *{list(info.data_shape)}]")
    if eps.shape != x0.shape:
        raise ScoringError(f"eps: shape {list(eps.shape)} differs from x0's {list(x0.shape)}")
    validate_common(info, x0, t)
    check_float("eps", eps)
    check_finite("eps", eps)


def check_float(name: str, array: np.ndarray) -> None:
    """Data tensors (x0, eps, candidates) are float32 or float16: an integer one is a client mistake."""
    if array.dtype.kind != "f":
        raise ScoringError(f"{name}: dtype {array.dtype} is not a float type (float32 or float16)")


def validate_common(info: RaterInfo, x0: np.ndarray, t: np.ndarray) -> None:
    """dtype, finiteness and timestep range of x0 and t, shared by scoring and selection."""
    check_float("x0", x0)
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ScoringError(f"t: shape {list(t.shape)} does not match [B={x0.shape[0]}]")
    if t.dtype.kind not in "iu":
        raise ScoringError(f"t: dtype {t.dtype} is not an integer type")
    if t.size and (t.min() < 0 or t.max() >= info.num_timesteps):
        raise ScoringError(f"t: timesteps must lie in [0, {info.num_timesteps}), got [{t.min()}, {t.max()}]")
    check_finite("x0", x0)


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
