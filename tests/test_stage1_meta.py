"""Stage 1's meta-gradient: the fast (directional-derivative) route agrees with the exact unrolled one,
and the soft weights have mean 1 and a bounded spread."""

from __future__ import annotations

import pytest
import torch

from noiserater.trainer.stage1.meta import entropy_gap, meta_gradient, soft_weights, weight_stats
from noiserater.trainer.stage1.rater import build_rater
from noiserater.trainer.substrate.denoisers import build_denoiser
from noiserater.trainer.substrate.diffusion import NoiseSchedule


def _rater_grad(route, model, schedule, params, precond, rater, batches, val_batch, **kw) -> torch.Tensor:
    rater.zero_grad(set_to_none=True)
    meta_gradient(route, model, schedule, params, precond, 0.05, rater, batches, val_batch, **kw)
    return torch.cat([p.grad.flatten() for p in rater.parameters()])


def _setup(shape, dtype, denoiser_kw, unroll, batch=16):
    torch.manual_seed(0)
    schedule = NoiseSchedule(100)
    model = build_denoiser(shape, num_timesteps=100, **denoiser_kw).to(dtype)
    rater = build_rater("conv" if len(shape) == 3 else "mlp", shape, 100, **({} if len(shape) == 3 else
                                                                               {"hidden": 32})).to(dtype)
    gen = torch.Generator().manual_seed(1)

    def draw(b):
        x0 = torch.rand(b, *shape, generator=gen, dtype=dtype) * 2 - 1
        return x0, schedule.sample_timesteps(b, generator=gen), torch.randn(b, *shape, generator=gen, dtype=dtype)

    params = {k: v.detach() for k, v in model.named_parameters()}
    precond = {k: torch.rand(v.shape, generator=gen, dtype=dtype) + 0.5 for k, v in params.items()}
    return schedule, model, rater, params, precond, [draw(batch) for _ in range(unroll)], draw(2 * batch)


@pytest.mark.parametrize(("shape", "denoiser_kw", "unroll"), [
    ((16,), {"hidden": 32, "depth": 2}, 1),
    ((16,), {"hidden": 32, "depth": 2}, 2),
    ((1, 8, 8), {"channels": 8}, 1),
])
def test_fast_route_matches_exact_unrolled_route(shape, denoiser_kw, unroll):
    schedule, model, rater, params, precond, batches, val = _setup(shape, torch.float64, denoiser_kw, unroll)
    exact = _rater_grad("exact", model, schedule, params, precond, rater, batches, val)
    fast = _rater_grad("fast", model, schedule, params, precond, rater, batches, val, fd_eps=1e-6)
    assert exact.norm() > 0
    assert float((fast - exact).norm() / exact.norm()) <= 1e-3


def test_fast_route_matches_in_float32_with_default_step():
    schedule, model, rater, params, precond, batches, val = _setup((64,), torch.float32, {"hidden": 64}, 1, 64)
    exact = _rater_grad("exact", model, schedule, params, precond, rater, batches, val)
    fast = _rater_grad("fast", model, schedule, params, precond, rater, batches, val)
    assert float((fast - exact).norm() / exact.norm()) <= 1e-3


def test_entropy_penalty_reaches_the_rater_in_both_routes():
    schedule, model, rater, params, precond, batches, val = _setup((16,), torch.float64, {"hidden": 32}, 1)
    plain = _rater_grad("fast", model, schedule, params, precond, rater, batches, val, fd_eps=1e-6)
    for route in ("exact", "fast"):
        penalised = _rater_grad(route, model, schedule, params, precond, rater, batches, val, entropy_coef=1.0,
                                fd_eps=1e-6)
        assert not torch.allclose(plain, penalised)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3, 1e8])
def test_soft_weights_have_mean_one_and_bounded_spread(scale):
    scores = torch.randn(256, generator=torch.Generator().manual_seed(0)) * scale
    w = soft_weights(scores, tau=1.0)
    assert torch.isfinite(w).all() and (w > 0).all()
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-5)
    stats = weight_stats(w)
    assert 0 <= stats["weight_std"] < 5 and stats["weight_max"] < 30  # standardisation stops collapse
    assert 0 < stats["weight_ess"] <= 1
    if scale <= 1e-4:
        assert stats["weight_std"] < 1e-3  # a rater that barely separates gives almost uniform weights


def test_entropy_gap_is_zero_for_uniform_and_log_b_for_one_hot():
    assert float(entropy_gap(torch.ones(8))) == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.zeros(8)
    one_hot[3] = 8.0
    assert float(entropy_gap(one_hot)) == pytest.approx(torch.log(torch.tensor(8.0)).item(), abs=1e-5)
