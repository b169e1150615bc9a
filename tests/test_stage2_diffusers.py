"""The README's diffusers example (examples/diffusers_loop.py) runs a couple of steps when diffusers is installed."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "diffusers_loop.py"


def test_diffusers_loop_trains_on_selected_noise(tmp_path):
    import torch

    from noiserater.client.selector import NoiseSelector
    from noiserater.trainer.stage1.export import export_rater
    from noiserater.trainer.stage1.rater import build_rater

    torch.manual_seed(0)
    onnx = tmp_path / "digits-image.onnx"
    export_rater(build_rater("conv", (1, 8, 8), 1000), onnx, dataset="digits-image", schedule="linear")
    spec = importlib.util.spec_from_file_location("diffusers_loop", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    selector = NoiseSelector.local(onnx, num_candidates=4, rule="argmax")
    losses = example.train(selector, steps=2, batch_size=8, log_every=1)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert selector.counters["selections"] == 2
