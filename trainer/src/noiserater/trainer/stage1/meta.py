"""Stage 1's bilevel objective: soft weights from the rater, a virtual inner update, and its meta-gradient.

For a batch (x0_i, t_i, eps_i) the rater's scores become weights w = B * softmax(z / tau) (mean 1), where z
are the scores standardised over the batch (divided by max(std, 1), so the rater can stay near-uniform but
never sharpen past what tau allows). The virtual update is U steps of preconditioned SGD

    theta_{u+1} = theta_u - alpha * P * grad_theta mean_i(w_ui * l_ui(theta_u))

with P a fixed diagonal preconditioner (the inner model's Adam second moment, detached: we never
differentiate through Adam's state). The outer loss is the plain denoising loss on a held-out batch with
Gaussian noise at theta_U; the rater follows dL_val/dphi = sum_ui dL_val/dw_ui * dw_ui/dphi.

Two routes give dL_val/dw:
- exact: the unrolled update through `torch.func.functional_call` with `create_graph=True`;
- fast: reverse mode by hand without second derivatives. With v_U = grad L_val(theta_U) and
  d_u = P * v_{u+1}: dL_val/dw_ui = -(alpha/B) <d_u, grad l_ui(theta_u)>, a directional derivative taken by a
  central finite difference (two extra forward passes); for U > 1 the vector is carried back with
  v_u = v_{u+1} - alpha * H_u d_u, the Hessian-vector product taken by a finite difference of gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from noiserater.trainer.substrate.diffusion import Schedule, per_sample_loss

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x0, t, eps

META_GRAD_ROUTES = ("exact", "fast")


def soft_weights(scores: torch.Tensor, tau: float = 1.0, group: int = 1) -> torch.Tensor:
    """w = B * softmax(z / tau), z = standardised scores (std floored at 1). Mean exactly 1, all positive.

    group > 1: the batch is B/group runs of `group` consecutive rows that share (x0, t) and differ only in
    eps (candidate groups); the softmax runs within each group (w = group * softmax over the group), so the
    weights only redistribute between noises of one (x0, t) -- the decision hard selection makes in stage 2
    -- and cannot become a timestep or data weighting.
    """
    if group <= 1:
        centred = scores - scores.mean()
        scale = centred.pow(2).mean().add(1e-12).sqrt().clamp(min=1.0)
        return scores.numel() * torch.softmax(centred / scale / tau, dim=0)
    grouped = scores.reshape(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    scale = centred.pow(2).mean().add(1e-12).sqrt().clamp(min=1.0)
    return (group * torch.softmax(centred / scale / tau, dim=1)).reshape(scores.shape)


def weight_stats(w: torch.Tensor) -> dict[str, float]:
    """Spread of a weight vector with mean 1: std, max, min and the effective sample fraction 1/mean(w^2)."""
    w = w.detach().double()
    return {
        "weight_std": float(w.std(unbiased=False)),
        "weight_max": float(w.max()),
        "weight_min": float(w.min()),
        "weight_ess": float(w.mean() ** 2 / w.pow(2).mean()),
    }


def entropy_gap(w: torch.Tensor) -> torch.Tensor:
    """log B - H(w / B): zero for uniform weights, log B when all weight sits on one sample."""
    p = w / w.numel()
    return math.log(w.numel()) + (p * p.clamp_min(1e-30).log()).sum()


def losses_at(model: nn.Module, schedule: Schedule, params: Params, batch: Batch) -> torch.Tensor:
    """Per-sample denoising losses [B] of `model` evaluated with `params`."""
    x0, t, eps = batch
    return per_sample_loss(lambda x_t, tt: functional_call(model, params, (x_t, tt)), schedule, x0, t, eps)


def _axpy(a: float, x: Params, y: Params) -> Params:
    return {k: y[k] + a * x[k] for k in y}


def _dot(x: Params, y: Params) -> torch.Tensor:
    return sum((x[k] * y[k]).sum() for k in x)


def _norm(x: Params) -> torch.Tensor:
    return _dot(x, x).sqrt()


def _grad(loss: torch.Tensor, params: Params, create_graph: bool = False) -> Params:
    keys = list(params)
    grads = torch.autograd.grad(loss, [params[k] for k in keys], create_graph=create_graph)
    return dict(zip(keys, grads, strict=True))


def _leaf(params: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


@dataclass
class VirtualStep:
    """Everything one inner model contributes to a meta step."""

    outer_loss: float  # L_val(theta_U) with the learned weights
    grad_theta0: Params  # grad of the weighted loss at theta_0 on batch 0 (reused for the real Adam step)
    weights: list[torch.Tensor]  # detached weights per unrolled step
    inner_loss: float  # unweighted mean loss on batch 0 at theta_0


def meta_gradient(
    route: str,
    model: nn.Module,
    schedule: Schedule,
    params: Params,
    precond: Params,
    alpha: float,
    rater: nn.Module,
    batches: list[Batch],
    val_batch: Batch,
    tau: float = 1.0,
    entropy_coef: float = 0.0,
    fd_eps: float = 1e-3,
    grad_scale: float = 1.0,
    group: int = 1,
) -> VirtualStep:
    """Accumulate grad_scale * dL_val(theta_U(phi))/dphi (+ the entropy penalty's gradient) into the rater's
    .grad, for one inner model with parameters `params` and one train batch per unrolled step."""
    if route not in META_GRAD_ROUTES:
        raise ValueError(f"unknown meta-gradient route {route!r} (one of {', '.join(META_GRAD_ROUTES)})")
    weights = [soft_weights(rater(*b), tau, group) for b in batches]
    penalty = entropy_coef * sum(entropy_gap(w) for w in weights) / len(weights)
    run = _exact if route == "exact" else _fast
    outer, dw, g0, inner = run(model, schedule, params, precond, alpha, weights, batches, val_batch, fd_eps)
    rater_params = [p for p in rater.parameters() if p.requires_grad]
    if dw is None:  # exact: `outer` still carries the graph to phi
        surrogate = outer + penalty
    else:
        surrogate = sum((d * w).sum() for d, w in zip(dw, weights, strict=True)) + penalty
    grads = torch.autograd.grad(surrogate * grad_scale, rater_params, allow_unused=True)
    for p, g in zip(rater_params, grads, strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return VirtualStep(float(outer.detach()), g0, [w.detach() for w in weights], inner)


def _exact(model, schedule, params, precond, alpha, weights, batches, val_batch, fd_eps):
    theta = _leaf(params)
    g0: Params = {}
    inner = 0.0
    for u, (w, batch) in enumerate(zip(weights, batches, strict=True)):
        losses = losses_at(model, schedule, theta, batch)
        grads = _grad((w * losses).mean(), theta, create_graph=True)
        if u == 0:
            g0 = {k: g.detach() for k, g in grads.items()}
            inner = float(losses.detach().mean())
        theta = {k: theta[k] - alpha * precond[k] * grads[k] for k in theta}
    outer = losses_at(model, schedule, theta, val_batch).mean()
    return outer, None, g0, inner


def _fast(model, schedule, params, precond, alpha, weights, batches, val_batch, fd_eps):
    ws = [w.detach() for w in weights]
    thetas = [{k: v.detach() for k, v in params.items()}]
    g0: Params = {}
    inner = 0.0
    for u, (w, batch) in enumerate(zip(ws, batches, strict=True)):
        theta = _leaf(thetas[-1])
        losses = losses_at(model, schedule, theta, batch)
        grads = _grad((w * losses).mean(), theta)
        if u == 0:
            g0, inner = grads, float(losses.detach().mean())
        thetas.append({k: thetas[-1][k] - alpha * precond[k] * grads[k] for k in grads})
    theta_u = _leaf(thetas[-1])
    outer = losses_at(model, schedule, theta_u, val_batch).mean()
    v = _grad(outer, theta_u)
    dws: list[torch.Tensor] = [torch.zeros_like(w) for w in ws]
    for u in reversed(range(len(batches))):
        d = {k: precond[k] * v[k] for k in v}
        d_norm = float(_norm(d))
        if d_norm == 0.0:
            break
        theta = thetas[u]
        h = fd_eps * max(1.0, float(_norm(theta))) / d_norm
        need_hvp = u > 0
        plus, minus = _leaf(_axpy(h, d, theta)), _leaf(_axpy(-h, d, theta))
        with torch.set_grad_enabled(need_hvp):
            l_plus = losses_at(model, schedule, plus, batches[u])
            l_minus = losses_at(model, schedule, minus, batches[u])
        directional = (l_plus.detach() - l_minus.detach()) / (2 * h)  # <grad l_i(theta_u), d>
        dws[u] = -(alpha / ws[u].numel()) * directional
        if need_hvp:
            gp = _grad((ws[u] * l_plus).mean(), plus)
            gm = _grad((ws[u] * l_minus).mean(), minus)
            v = {k: v[k] - alpha * (gp[k] - gm[k]) / (2 * h) for k in v}
    return outer, dws, g0, inner


def virtual_step_losses(model: nn.Module, schedule: Schedule, params: Params, precond: Params, alpha: float,
                        batch: Batch, val_batch: Batch, weights: torch.Tensor) -> tuple[float, float]:
    """Held-out loss after one virtual step from `params` on `batch` with the given weights and with w = 1
    (same step size, same batches): (outer_loss_learned, outer_loss_uniform)."""
    out = []
    for w in (weights.detach(), torch.ones_like(weights)):
        theta = _leaf(params)
        grads = _grad((w * losses_at(model, schedule, theta, batch)).mean(), theta)
        stepped = {k: theta[k].detach() - alpha * precond[k] * grads[k] for k in grads}
        with torch.no_grad():
            out.append(float(losses_at(model, schedule, stepped, val_batch).mean()))
    return out[0], out[1]


def adam_preconditioner(optimizer: torch.optim.Adam, params: Params, named: Callable[[], dict[str, nn.Parameter]]
                        ) -> Params:
    """P = 1 / (sqrt(v_hat) + eps) from an Adam optimiser's current state (ones where it has none yet)."""
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    out: Params = {}
    for name, p in named().items():
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            out[name] = torch.ones_like(params[name])
            continue
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2**step)
        out[name] = 1.0 / (v_hat.sqrt() + eps)
    return out
