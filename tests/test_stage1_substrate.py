"""The diffusion substrate: schedules, per-sample loss, sampling, datasets and denoisers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noiserater.trainer.substrate.data import load_dataset
from noiserater.trainer.substrate.denoisers import build_denoiser
from noiserater.trainer.substrate.diffusion import NoiseSchedule, ddpm_sample, per_sample_loss


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_is_variance_preserving_and_monotone(kind):
    s = NoiseSchedule(200, kind)
    abar = s.alphas_cumprod
    assert abar.dtype == torch.float32 and abar.shape == (200,)
    assert (abar[1:] < abar[:-1]).all() and 0 < abar[-1] < 0.05 and abar[0] > 0.98
    x0 = torch.zeros(4, 3)
    eps = torch.ones(4, 3)
    t = torch.tensor([0, 50, 100, 199])
    xt = s.add_noise(x0, eps, t)
    assert torch.allclose(xt[:, 0], (1 - abar[t]).sqrt())
    assert torch.allclose(s.snr(t), abar[t] / (1 - abar[t]))
    ts = s.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert ts.dtype == torch.long and ts.min() >= 0 and ts.max() < 200


def test_per_sample_loss_and_sampling_shapes():
    s = NoiseSchedule(50)
    for shape in [(2,), (64,), (1, 8, 8)]:
        net = build_denoiser(shape, num_timesteps=50)
        x0 = torch.randn(5, *shape)
        loss = per_sample_loss(net, s, x0, s.sample_timesteps(5), torch.randn_like(x0))
        assert loss.shape == (5,) and torch.isfinite(loss).all()
        out = ddpm_sample(net, s, (3, *shape), generator=torch.Generator().manual_seed(0), steps=10)
        assert out.shape == (3, *shape) and torch.isfinite(out).all()


def test_unet_double_backward():
    s = NoiseSchedule(50)
    net = build_denoiser((1, 8, 8), num_timesteps=50, channels=8)
    x0 = torch.randn(4, 1, 8, 8)
    loss = per_sample_loss(net, s, x0, s.sample_timesteps(4), torch.randn_like(x0)).mean()
    grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), list(net.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in second)


def test_datasets(tmp_path):
    d = load_dataset("digits")
    assert d.data_shape == (64,) and d.train.min() >= -1 and d.train.max() <= 1
    assert len(d.train) + len(d.val) + len(d.test) == 1797 and set(d.labels) == {"train", "val", "test"}
    assert torch.equal(load_dataset("digits").val, d.val)  # fixed split
    assert load_dataset("digits-image").data_shape == (1, 8, 8)
    assert load_dataset("moons").data_shape == (2,)
    np.save(tmp_path / "arr.npy", np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32))
    assert load_dataset(str(tmp_path / "arr.npy")).data_shape == (4,)
    with pytest.raises(ValueError):
        load_dataset(str(tmp_path / "missing.npy"))


def test_user_arrays_and_image_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((40, 2, 4, 4)).astype(np.float32), y=np.arange(40))
    d = load_dataset(str(tmp_path / "data.npz"))
    assert d.data_shape == (2, 4, 4) and len(d.train) + len(d.val) + len(d.test) == 40 and "train" in d.labels
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(folder / f"{i}.png")
    d = load_dataset(str(folder))
    assert d.data_shape == (1, 6, 6) and d.train.min() >= -1 and d.train.max() <= 1
    Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).save(folder / "odd.png")
    with pytest.raises(ValueError, match="size"):
        load_dataset(str(folder))
    np.save(tmp_path / "bad.npy", np.array([[np.nan, 1.0], [0.0, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="NaN"):
        load_dataset(str(tmp_path / "bad.npy"))
