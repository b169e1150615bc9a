"""Scoring with an exported rater: the ONNX signature and metadata keys, the checks every scored batch
passes, and `RaterSession`, onnxruntime over one rater file. How candidates become triples and scores
become choices is `noiserater.core.selection.SelectionPlan`."""

from __future__ import annotations

import functools
import json
import logging
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
META_OBJECTIVE = "noiserater.objective"  # what the rater's denoisers predicted: "eps" or "flow"
META_TIME_CONVENTION = "noiserater.time_convention"  # what the integer t means for that objective
META_META_OBJECTIVE = "noiserater.meta_objective"  # how stage 1 trained the rater (what its score means)
FORMAT_VERSION = "1"

# The objectives a rater can be trained for, each with the meaning of its timestep t in [0, T). A rater file
# without META_OBJECTIVE predates the flow objective and was trained for "eps".
OBJECTIVE_EPS, OBJECTIVE_FLOW = "eps", "flow"
OBJECTIVES = (OBJECTIVE_EPS, OBJECTIVE_FLOW)
DEFAULT_OBJECTIVE = OBJECTIVE_EPS
TIME_CONVENTIONS = {
    OBJECTIVE_EPS: "vp-ddpm: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in [0, T), eps predicted",
    OBJECTIVE_FLOW: "linear: s = (t + 1) / T, x_t = (1 - s) x0 + s eps, t in [0, T), v = eps - x0 predicted",
}


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
    objective: str = DEFAULT_OBJECTIVE  # "eps" or "flow" (see TIME_CONVENTIONS); "eps" for older files

    @property
    def time_convention(self) -> str:
        """What t means: the file's META_TIME_CONVENTION, else the one of its objective."""
        return self.metadata.get(META_TIME_CONVENTION) or TIME_CONVENTIONS.get(self.objective, "")

    @property
    def meta_objective(self) -> str:
        """How stage 1 trained the rater ("" when the file does not say: the soft-weights objective)."""
        return self.metadata.get(META_META_OBJECTIVE, "")

    def reported_metadata(self) -> dict[str, str]:
        """The file's metadata with the objective and its time convention always present (an older file
        that names neither is reported as the eps rater it is)."""
        return {**self.metadata, META_OBJECTIVE: self.objective, META_TIME_CONVENTION: self.time_convention}

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
            objective=metadata.get(META_OBJECTIVE) or DEFAULT_OBJECTIVE,
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


CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"
ORT_DEFAULT_LOG_SEVERITY = 2  # onnxruntime's own default (warning); it has no getter to read it back

log = logging.getLogger("noiserater.core.scoring")


class DeviceUnavailableError(ScoringError):
    """device='cuda' was asked for and onnxruntime cannot run on a GPU in this process."""


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pb_field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: an int as a varint, a str or bytes as a length-delimited field."""
    if isinstance(value, int):
        return _pb_varint(number << 3) + _pb_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _pb_varint(number << 3 | 2) + _pb_varint(len(data)) + data


def _identity_model() -> bytes:
    """The smallest ONNX model, y = Identity(x) on a float [1], encoded by hand (core does not need `onnx`)."""
    def value_info(name: str) -> bytes:  # ValueInfoProto{name, type: TypeProto{tensor_type{FLOAT, shape [1]}}}
        shape = _pb_field(1, _pb_field(1, 1))
        return _pb_field(1, name) + _pb_field(2, _pb_field(1, _pb_field(1, 1) + _pb_field(2, shape)))

    node = _pb_field(1, "x") + _pb_field(2, "y") + _pb_field(4, "Identity")
    graph = _pb_field(1, node) + _pb_field(2, "cuda-probe") + _pb_field(11, value_info("x")) + \
        _pb_field(12, value_info("y"))
    return _pb_field(1, 8) + _pb_field(7, graph) + _pb_field(8, _pb_field(1, "") + _pb_field(2, 13))


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """None when onnxruntime can run on a GPU in this process, else why not (one line).

    Asked once per process: a one-op session with the CUDA provider is created and run with onnxruntime's
    logging silenced, because a build that lists CUDAExecutionProvider but cannot load its libraries (no GPU,
    no CUDA/cuDNN of the right version) prints a red error block for every session that asks for it.
    """
    import onnxruntime as ort

    if CUDA_PROVIDER not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider"
    options = ort.SessionOptions()
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(_identity_model(), sess_options=options,
                                       providers=[CUDA_PROVIDER, CPU_PROVIDER])
        if session.get_providers()[0] != CUDA_PROVIDER:
            return "onnxruntime could not load its CUDA provider (no GPU, or CUDA/cuDNN libraries missing)"
        session.run(None, {"x": np.ones(1, np.float32)})
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"onnxruntime's CUDA provider failed a test run ({first})"
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_LOG_SEVERITY)
    return None


@functools.cache
def _log_auto_on_cpu(reason: str) -> None:
    log.info("device auto: onnxruntime runs on CPU: %s", reason)


def default_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for `device`: cpu; cuda (DeviceUnavailableError when onnxruntime cannot
    use a GPU here); auto (CUDA when it can, else CPU, said once per process in an info log line)."""
    if device == "cpu":
        return [CPU_PROVIDER]
    if device not in ("auto", "cuda"):
        raise ScoringError(f"device: {device!r} is not one of auto, cpu, cuda")
    reason = cuda_unavailable_reason()
    if reason is None:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "cuda":
        raise DeviceUnavailableError(f"device: 'cuda' was asked for, but {reason}; use device 'cpu' or 'auto'")
    _log_auto_on_cpu(reason)
    return [CPU_PROVIDER]


class RaterSession:
    """An onnxruntime session over an exported rater: validated signature, metadata, `score()`.

    `device`: "cpu", "cuda" (DeviceUnavailableError when no GPU can be used) or "auto" (see
    `default_providers`); `provider` is the execution provider the session runs on. `allow_spinning`: whether
    onnxruntime's intra-op threads (when there are several) spin on a core between runs, waiting for the next
    one (onnxruntime's default; lower latency for a server) or sleep (better next to other work, such as the
    training step of the process that selects). Neither changes a score.
    """

    def __init__(self, model: bytes | str | Path, device: str = "auto", intra_op_threads: int = 0,
                 graph_optimization: str = "all", allow_spinning: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        if not allow_spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        options.log_severity_level = 3
        source = str(model) if isinstance(model, Path) else model
        providers = default_providers(device)
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=providers)
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
        if device == "cuda" and self.provider != CUDA_PROVIDER:
            raise DeviceUnavailableError(f"device: 'cuda' was asked for, but onnxruntime runs this model on "
                                         f"{self.provider}")

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
