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


def test_pretrained_folder_round_trips_and_bad_paths_are_one_line(tmp_path: Path):
    """save_pretrained writes model.safetensors + config.json (no pickle); load_rater reads that folder, a
    rater.pt or a run folder holding either, and says in one line when a path holds no rater."""
    from safetensors.torch import load_file

    from noiserater.trainer.stage1.rater import (
        PRETRAINED_CONFIG_FILE,
        PRETRAINED_DIR,
        WEIGHTS_FILE,
        RaterLoadError,
        save_pretrained,
    )

    torch.manual_seed(0)
    rater = build_rater("conv", (1, 8, 8), 100, channels=8)
    run = tmp_path / "run"
    run.mkdir()
    folder = save_pretrained(run / PRETRAINED_DIR, rater, "conv", dataset="digits-image", schedule="linear",
                             rater_kwargs={"channels": 8}, provenance={"steps": 3})
    config = json.loads((folder / PRETRAINED_CONFIG_FILE).read_text())
    assert config["model_type"] == "noiserater-rater" and config["data_shape"] == [1, 8, 8]
    assert set(load_file(str(folder / WEIGHTS_FILE))) == set(rater.state_dict())
    for path in (folder, run, folder / WEIGHTS_FILE):
        loaded, info = load_rater(path)
        assert info["provenance"] == {"steps": 3} and info["kind"] == "conv"
        for key, value in rater.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key

    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    save_pretrained(broken, rater, "conv", rater_kwargs={"channels": 16})  # config says other widths
    cases = [(tmp_path / "missing", "no such file or folder"),
             (tmp_path / "model.onnx", "an exported ONNX model, not a trained rater"),
             (tmp_path / "junk.pt", r"not a rater checkpoint \(torch cannot read it: UnpicklingError\)"),
             (tmp_path / "other.pt", "a torch file, but not a rater checkpoint"),
             (empty, "no trained rater here"),
             (broken, "the weights do not fit the rater it describes")]
    for path, message in cases:
        with pytest.raises(RaterLoadError, match=message) as caught:
            load_rater(path)
        assert len(str(caught.value).splitlines()) == 1 and "weights_only" not in str(caught.value)
