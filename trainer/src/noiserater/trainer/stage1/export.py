"""Export a rater to ONNX with NoiseRater's metadata, and check parity with torch."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from noiserater.core import scoring

PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 7, 64)


@dataclass
class ExportReport:
    path: str
    max_abs_diff: float
    parity_batches: tuple[int, ...]
    metadata: dict[str, str]
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "max_abs_diff": self.max_abs_diff,
            "parity_batches": list(self.parity_batches),
            "parity_tolerance": PARITY_TOLERANCE,
            "size_bytes": self.size_bytes,
            "metadata": self.metadata,
        }


class ParityError(RuntimeError):
    pass


def _example_inputs(rater: nn.Module, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *rater.data_shape)
    x0 = torch.rand(shape, generator=gen) * 2 - 1
    t = torch.randint(0, rater.num_timesteps, (batch,), generator=gen)
    eps = torch.randn(shape, generator=gen)
    return x0, t, eps


def export_rater(rater: nn.Module, out_path: str | Path, *, dataset: str = "", schedule: str = "",
                 provenance: dict[str, Any] | None = None, opset: int = 18, objective: str = "eps",
                 meta_objective: str = "") -> ExportReport:
    """Write `rater` to `out_path` as ONNX (dynamic batch axis, metadata) and verify it against torch.

    The metadata names the `objective` the rater was trained for (`noiserater.objective`, "eps" or "flow")
    and what its timestep means under it (`noiserater.time_convention`, `scoring.TIME_CONVENTIONS`), and,
    when given, how stage 1 trained it (`noiserater.meta_objective`). Raises ParityError when onnxruntime
    and torch differ by more than PARITY_TOLERANCE.
    """
    import onnx

    if objective not in scoring.OBJECTIVES:
        raise ValueError(f"objective: {objective!r} is not one of {', '.join(scoring.OBJECTIVES)}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rater = rater.eval()
    example = _example_inputs(rater, 2, seed=0)
    batch = torch.export.Dim("batch")
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    # The exporter's own chatter (optional torchvision ops, pytree deprecations) says nothing about this model.
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_logger.setLevel(logging.ERROR)
        try:
            raw = Path(tmp) / "rater.onnx"
            torch.onnx.export(
                rater,
                example,
                str(raw),
                input_names=list(scoring.INPUT_NAMES),
                output_names=[scoring.OUTPUT_SCORE],
                dynamic_shapes=tuple({0: batch} for _ in scoring.INPUT_NAMES),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        finally:
            onnx_logger.setLevel(level)
        model = onnx.load(str(raw))
    metadata = {
        scoring.META_FORMAT: scoring.FORMAT_VERSION,
        scoring.META_DATA_SHAPE: json.dumps(list(rater.data_shape)),
        scoring.META_NUM_TIMESTEPS: str(rater.num_timesteps),
        scoring.META_DATASET: dataset,
        scoring.META_SCHEDULE: schedule,
        scoring.META_OBJECTIVE: objective,
        scoring.META_TIME_CONVENTION: scoring.TIME_CONVENTIONS[objective],
        scoring.META_PROVENANCE: json.dumps(provenance or {}, sort_keys=True),
        scoring.META_EXPORTED_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if meta_objective:
        metadata[scoring.META_META_OBJECTIVE] = meta_objective
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    max_diff = check_parity(rater, out_path)
    return ExportReport(str(out_path), max_diff, PARITY_BATCHES, metadata, out_path.stat().st_size)


def check_parity(rater: nn.Module, onnx_path: str | Path) -> float:
    """Max |torch - onnxruntime| over random inputs at several batch sizes; raises above tolerance."""
    session = scoring.RaterSession(Path(onnx_path), device="cpu")
    worst = 0.0
    for i, batch in enumerate(PARITY_BATCHES):
        x0, t, eps = _example_inputs(rater, batch, seed=100 + i)
        with torch.no_grad():
            expected = rater(x0, t, eps).numpy()
        got = session.score(x0.numpy(), t.numpy(), eps.numpy())
        worst = max(worst, float(np.max(np.abs(expected - got))))
    if not worst <= PARITY_TOLERANCE:
        raise ParityError(f"ONNX and torch scores differ by {worst:.3g} (> {PARITY_TOLERANCE})")
    return worst
