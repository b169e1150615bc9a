"""Stage 1's grad-norm objective: a rater that predicts the log of the per-sample gradient norm.

The target of a triple (x0, t, eps) is log ||d l(theta; x0, t, eps) / d theta||, the norm of the per-sample
gradient of the current inner model's denoising loss over all its parameters (exact, by
`torch.func.vmap(grad)` in chunks), and the rater is fitted by least squares on it, across the population of
inner models at every phase of their training. So exp(score) estimates the gradient norm.

What it is for: stage 2's importance-weighted rule draws one of K candidates with probability
p_k = softmax(score / temperature)_k and weights its loss by 1 / (K p_k), which keeps the gradient an
unbiased estimate of the mean over the K candidates whatever p is. Its variance, (1/K^2) sum_k ||g_k||^2 / p_k
minus a constant, is smallest at p_k proportional to ||g_k||; with score = log ||g|| that is exactly
softmax(score / 1): use this rater with temperature 1. (Least squares in log space fits the geometric mean of
the norm over the population, which is what the softmax of log-scores turns into a proportional proposal.)

The inner models train on plain Gaussian noise with Adam, the step reusing the mean of the per-sample
gradients computed for the targets (no extra backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from noiserater.trainer.stage1.meta import Batch, Params
from noiserater.trainer.substrate.diffusion import Schedule, per_sample_loss

GRAD_CHUNK = 32  # samples per vmap chunk: bounds the per-sample gradients held at once


def per_sample_grad_norms(model: nn.Module, schedule: Schedule, params: Params, batch: Batch,
                          chunk: int = GRAD_CHUNK) -> tuple[torch.Tensor, Params]:
    """([B] norms of the per-sample loss gradients, the mean gradient over the batch), at `params`."""
    x0, t, eps = batch
    params = {k: v.detach() for k, v in params.items()}

    def loss_one(p: Params, x: torch.Tensor, tt: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        fn = lambda x_t, ts: functional_call(model, p, (x_t, ts))  # noqa: E731
        return per_sample_loss(fn, schedule, x[None], tt[None], e[None])[0]

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))
    norms = []
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, x0.shape[0], chunk):
        sl = slice(start, start + chunk)
        grads = per_sample(params, x0[sl], t[sl], eps[sl])
        sq = sum(g.flatten(1).pow(2).sum(dim=1) for g in grads.values())
        norms.append(sq.sqrt())
        for k, g in grads.items():
            total[k] += g.sum(dim=0)
    return torch.cat(norms), {k: v / x0.shape[0] for k, v in total.items()}


def log_target(norms: torch.Tensor) -> torch.Tensor:
    """The regression target: log of the gradient norm (floored, so a zero gradient stays finite)."""
    return norms.clamp_min(1e-12).log()


@dataclass
class GradNormStep:
    mse: float  # mean squared error of the scores against the log norms (before this step's update)
    corr: float  # Pearson correlation of scores and log norms
    inner_loss: float  # mean denoising loss of the batch at theta
    mean_grad: Params  # for the inner model's Adam step


def grad_norm_regression(model: nn.Module, schedule: Schedule, params: Params, rater: nn.Module, batch: Batch,
                         grad_scale: float = 1.0) -> GradNormStep:
    """Accumulate grad_scale * d mean((r(x0, t, eps) - log ||g||)^2) / dphi into the rater's .grad."""
    norms, mean_grad = per_sample_grad_norms(model, schedule, params, batch)
    target = log_target(norms)
    scores = rater(*batch)
    mse = (scores - target).pow(2).mean()
    rater_params = [p for p in rater.parameters() if p.requires_grad]
    grads = torch.autograd.grad(mse * grad_scale, rater_params, allow_unused=True)
    for p, g in zip(rater_params, grads, strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    s, y = scores.detach().double(), target.double()
    s, y = s - s.mean(), y - y.mean()
    corr = float((s * y).sum() / (s.norm() * y.norm()).clamp_min(1e-30))
    with torch.no_grad():
        x0, t, eps = batch
        inner = float(per_sample_loss(lambda x_t, ts: functional_call(model, params, (x_t, ts)), schedule, x0, t,
                                      eps).mean())
    return GradNormStep(float(mse.detach()), corr, inner, mean_grad)
