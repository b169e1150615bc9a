"""Raters of both kinds (vector MLP, image conv net) export to ONNX with parity and load where the server
loads them (noiserater.core.scoring.RaterSession)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from noiserater.core import scoring
from noiserater.trainer.stage1.export import export_rater
from noiserater.trainer.stage1.rater import RATER_FILE, build_rater, load_rater, save_rater


@pytest.mark.parametrize(("kind", "shape", "kw"), [("mlp", (64,), {"hidden": 32}), ("conv", (1, 8, 8), {"channels": 8}),
                                                  ("conv", (3, 12, 12), {})])
def test_export_has_parity_and_loads_in_the_server_session(tmp_path: Path, kind, shape, kw):
    torch.manual_seed(0)
    rater = build_rater(kind, shape, 1000, **kw)
    save_rater(tmp_path / RATER_FILE, rater, kind, dataset="digits", schedule="linear", rater_kwargs=kw,
               provenance={"steps": 7})
    loaded, info = load_rater(tmp_path / RATER_FILE)  # the path `nrctl export RUN_DIR` takes
    report = export_rater(loaded, tmp_path / "model.onnx", dataset=info["dataset"], schedule=info["schedule"],
                          provenance=info["provenance"])
    assert report.max_abs_diff <= 1e-4
    session = scoring.RaterSession(tmp_path / "model.onnx", device="cpu")
    assert session.info.data_shape == shape and session.info.num_timesteps == 1000
    assert json.loads(session.info.metadata[scoring.META_PROVENANCE]) == {"steps": 7}
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(5, *shape, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (5,), generator=gen)
    eps = torch.randn(5, *shape, generator=gen)
    with torch.no_grad():
        expected = loaded(x0, t, eps).numpy()
    np.testing.assert_allclose(session.score(x0.numpy(), t.numpy(), eps.numpy()), expected, atol=1e-4)


def test_image_rater_is_cheap_next_to_the_unet():
    from noiserater.trainer.substrate.denoisers import build_denoiser

    rater = build_rater("conv", (1, 8, 8), 1000)
    unet = build_denoiser((1, 8, 8), "unet", num_timesteps=1000)
    assert sum(p.numel() for p in rater.parameters()) < sum(p.numel() for p in unet.parameters()) / 5
