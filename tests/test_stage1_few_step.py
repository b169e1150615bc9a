"""Raters for the few-step regime: the through-selection meta-objective (its gradient reaches the rater, its
inner steps are Adam's, its choice is hard) and the grad-norm rater (exact per-sample gradient norms, a
regression that falls), each in a tiny stage-1 run that exports."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from support import tiny_stage1

from noiserater.trainer.stage1.export import export_rater
from noiserater.trainer.stage1.grad_norm import grad_norm_regression, log_target, per_sample_grad_norms
from noiserater.trainer.stage1.rater import build_rater, load_rater
from noiserater.trainer.stage1.through_selection import (
    AdamState,
    assign_noise,
    select_noise,
    sinkhorn,
    through_selection_gradient,
)
from noiserater.trainer.stage1.train import TrainConfig, read_metrics, train_rater
from noiserater.trainer.substrate.data import load_dataset
from noiserater.trainer.substrate.denoisers import build_denoiser
from noiserater.trainer.substrate.diffusion import make_schedule, per_sample_loss

TINY = tiny_stage1(batch_size=16)
pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(objective="eps", shape=(64,), seed=0):
    torch.manual_seed(seed)
    model = build_denoiser(shape, "auto", num_timesteps=100, **({"hidden": 32, "depth": 1} if len(shape) == 1
                                                                 else {"channels": 8}))
    rater = build_rater("mlp" if len(shape) == 1 else "conv", shape, 100)
    return model, rater, make_schedule(100, "linear", objective)


def _grouped(b, k, shape, gen):
    """b pairs repeated over k candidates, as MetaTrainer._batch(..., b * k, k) lays them out."""
    x0 = (torch.rand((b, *shape), generator=gen) * 2 - 1).repeat_interleave(k, 0)
    t = torch.randint(0, 100, (b,), generator=gen).repeat_interleave(k)
    return x0, t, torch.randn((b * k, *shape), generator=gen)


@pytest.mark.parametrize("objective", ["eps", "flow"])
def test_the_through_selection_gradient_reaches_the_rater(objective):
    model, rater, schedule = _setup(objective)
    gen = torch.Generator().manual_seed(1)
    k = 4
    batches = [_grouped(8, k, (64,), gen) for _ in range(3)]
    val = (torch.rand(16, 64) * 2 - 1, torch.randint(0, 100, (16,)), torch.randn(16, 64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    named = dict(model.named_parameters())
    adam = AdamState.read(opt, named)
    params = {n: p.detach() for n, p in named.items()}
    result = through_selection_gradient(model, schedule, params, adam, rater, batches, val, k, tau=1.0, generator=gen)
    grads = [p.grad for p in rater.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.norm()) for g in grads) > 0
    assert math.isfinite(result.outer_loss) and 0 < result.entropy <= 1
    assert adam.step == 0 and result.adam.step == 3  # the caller's state is left alone


def test_the_selection_is_hard_forward_and_follows_the_scores():
    _, rater, _ = _setup()
    gen = torch.Generator().manual_seed(2)
    k = 5
    batch = _grouped(6, k, (64,), gen)
    (x0, t, chosen), scores = select_noise(rater, batch, k, 1e-4, gen)  # tau -> 0: the argmax
    cands = batch[2].view(6, k, 64)
    best = scores.argmax(dim=1)
    assert torch.equal(chosen.detach(), cands[torch.arange(6), best])  # exactly one candidate, no blend
    assert torch.equal(x0, batch[0][::k]) and torch.equal(t, batch[1][::k])


def test_the_assignment_permutes_the_batchs_noises_and_its_gradient_reaches_the_rater():
    model, rater, schedule = _setup("flow")
    gen = torch.Generator().manual_seed(6)
    batch = _grouped(12, 1, (64,), gen)
    (x0, t, assigned), scores = assign_noise(rater, batch, 1.0, gen)
    assert scores.shape == (12, 12)
    matches = (assigned.detach()[:, None, :] == batch[2][None, :, :]).all(dim=2)  # [sample, noise]
    assert torch.equal(matches.sum(dim=0), torch.ones(12, dtype=torch.long))  # each noise used exactly once
    assert torch.equal(matches.sum(dim=1), torch.ones(12, dtype=torch.long))
    plan = sinkhorn(torch.randn(12, 12, generator=gen))
    assert torch.allclose(plan.sum(dim=0), torch.ones(12), atol=1e-5)
    assert torch.allclose(plan.sum(dim=1), torch.ones(12), atol=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    named = dict(model.named_parameters())
    val = (torch.rand(16, 64) * 2 - 1, torch.randint(0, 100, (16,)), torch.randn(16, 64))
    through_selection_gradient(model, schedule, {n: p.detach() for n, p in named.items()}, AdamState.read(opt, named),
                               rater, [batch, _grouped(12, 1, (64,), gen)], val, 1, 1.0, gen, assign=True)
    grads = [p.grad for p in rater.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.norm()) for g in grads) > 0


def test_the_differentiable_steps_are_torch_adams_steps():
    model, _, schedule = _setup()
    twin, _, _ = _setup()
    opt, twin_opt = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, twin))
    gen = torch.Generator().manual_seed(3)
    named = dict(model.named_parameters())
    for step in range(3):  # from an empty state, then a state the writes left behind
        x0, t, eps = _grouped(8, 1, (64,), gen)
        adam = AdamState.read(opt, named)
        theta = {n: p.detach().requires_grad_(True) for n, p in named.items()}
        loss = per_sample_loss(lambda x, tt, th=theta: torch.func.functional_call(model, th, (x, tt)), schedule,
                               x0, t, eps).mean()
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True))
        new = adam.step_(theta, grads)
        adam.write(opt, named, new)
        twin_opt.zero_grad()
        per_sample_loss(twin, schedule, x0, t, eps).mean().backward()
        twin_opt.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), (step, name)


@pytest.mark.parametrize("shape", [(64,), (1, 8, 8)])
def test_per_sample_grad_norms_are_exact(shape):
    model, _, schedule = _setup("flow", shape)
    gen = torch.Generator().manual_seed(4)
    x0, t, eps = _grouped(5, 1, shape, gen)
    norms, mean = per_sample_grad_norms(model, schedule, dict(model.named_parameters()), (x0, t, eps), chunk=2)
    expected = []
    for i in range(5):
        model.zero_grad()
        per_sample_loss(model, schedule, x0[i:i + 1], t[i:i + 1], eps[i:i + 1]).sum().backward()
        expected.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    assert torch.allclose(norms, torch.stack(expected), rtol=1e-4)
    model.zero_grad()
    per_sample_loss(model, schedule, x0, t, eps).mean().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(mean[name], p.grad, atol=1e-6), name


def test_the_grad_norm_regression_falls_on_a_toy():
    """On a fixed set of moons triples and a fixed denoiser, the rater fits the log gradient norms."""
    torch.manual_seed(0)
    data = load_dataset("moons").train
    model = build_denoiser(data.shape[1:], "auto", num_timesteps=100, hidden=32, depth=1)
    rater = build_rater("mlp", data.shape[1:], 100, hidden=32)
    schedule = make_schedule(100, "linear", "eps")
    opt = torch.optim.Adam(rater.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    params = {n: p.detach() for n, p in model.named_parameters()}
    x0 = data[torch.randint(0, len(data), (64,), generator=gen)]
    batch = (x0, torch.randint(0, 100, (64,), generator=gen), torch.randn(x0.shape, generator=gen))
    mse, corr = [], []
    for _ in range(100):
        opt.zero_grad()
        step = grad_norm_regression(model, schedule, params, rater, batch)
        opt.step()
        mse.append(step.mse)
        corr.append(step.corr)
    assert mse[-1] < 0.25 * mse[0] and corr[-1] > 0.8, (mse[0], mse[-1], corr[-1])
    norms, _ = per_sample_grad_norms(model, schedule, params, batch)
    assert mse[-1] < 0.25 * float(log_target(norms).var())  # well below what a constant score can do


@pytest.mark.parametrize("meta_objective, extra, logged", [
    ("through-selection", {"selection_candidates": 3, "selection_horizon": 2, "objective": "flow"},
     ("outer_loss_learned", "outer_loss_uniform", "choice_entropy", "inner_loss")),
    ("through-assignment", {"selection_horizon": 2},
     ("outer_loss_learned", "outer_loss_uniform", "choice_entropy", "inner_loss")),
    ("grad-norm", {}, ("grad_norm_mse", "grad_norm_corr", "inner_loss")),
    ("denoiser-error", {"objective": "flow"}, ("inner_loss", "val_loss")),
])
def test_a_tiny_run_of_each_exports(tmp_path, meta_objective, extra, logged):
    cfg = TrainConfig(dataset="digits", steps=2, meta_objective=meta_objective, **extra, **TINY)
    summary = train_rater(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for key in (*logged, "rater_grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[-1]["rater_grad_norm"] > 0
    assert (tmp_path / "run" / "curves.png").is_file() and summary["last_quarter_points"] >= 1
    rater, info = load_rater(tmp_path / "run")
    assert info["meta_objective"] == meta_objective
    report = export_rater(rater, tmp_path / "rater.onnx", objective=info["objective"],
                          meta_objective=info["meta_objective"])
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "rater.onnx")).metadata_props}
    assert metadata["noiserater.meta_objective"] == meta_objective
    assert metadata["noiserater.objective"] == extra.get("objective", "eps")
    assert report.max_abs_diff <= 1e-4


def test_the_meta_objective_options_are_checked():
    with pytest.raises(ValueError, match="--meta-objective must be one of soft-weights, through-selection, "
                                         "through-assignment, grad-norm, denoiser-error"):
        TrainConfig(meta_objective="maml").validate()
    with pytest.raises(ValueError, match="trains a rater of its own kind, not 'conv'"):
        TrainConfig(meta_objective="denoiser-error", rater="conv").validate()
    with pytest.raises(ValueError, match="selection_candidates must be >= 2"):
        TrainConfig(meta_objective="through-selection", selection_candidates=1).validate()


def test_a_through_selection_run_resumes_exactly(tmp_path):
    """The inner models' parameters and Adam moments written back by the differentiable steps, and the Gumbel
    draws from the run's generator, are all in the checkpoint."""
    settings = {**TINY, "meta_objective": "through-selection", "selection_candidates": 3, "selection_horizon": 2}
    train_rater(TrainConfig(dataset="moons", steps=3, **settings), tmp_path / "straight")
    train_rater(TrainConfig(dataset="moons", steps=3, **settings), tmp_path / "resumed", stop_after=2)
    train_rater(TrainConfig(dataset="moons", steps=3, **settings), tmp_path / "resumed")
    straight, _ = load_rater(tmp_path / "straight")
    resumed, _ = load_rater(tmp_path / "resumed")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("objective", ["eps", "flow"])
def test_the_denoiser_error_rater_trains_its_denoiser_and_scores_minus_its_loss(tmp_path, objective):
    """Its denoiser learns (held-out loss falls), and the exported rater's score is minus that denoiser's loss
    under the objective it was trained for, so its argmax is the candidate the denoiser explains best."""
    settings = {**TINY, "log_every": 10, "batch_size": 64}
    train_rater(TrainConfig(dataset="moons", steps=150, meta_objective="denoiser-error", objective=objective,
                            **settings), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["val_loss"] < 0.8 * rows[0]["val_loss"]
    rater, info = load_rater(tmp_path / "run")
    assert info["kind"] == "denoiser-error" and info["rater_kwargs"]["objective"] == objective
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand((40, 2), generator=gen) * 2 - 1
    t = torch.randint(0, 100, (40,), generator=gen)
    eps = torch.randn((40, 2), generator=gen)
    schedule = make_schedule(100, "linear", objective)
    with torch.no_grad():
        expected = -per_sample_loss(rater.denoiser, schedule, x0, t, eps)
        assert torch.allclose(rater(x0, t, eps), expected)
    report = export_rater(rater, tmp_path / "rater.onnx", objective=objective, meta_objective="denoiser-error")
    assert report.max_abs_diff <= 1e-4
