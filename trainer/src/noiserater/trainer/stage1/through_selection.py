"""Stage 1's through-selection objective: meta-learn the rater through the selection it will make in stage 2.

Per training pair (x0_i, t_i) the rater scores K candidate noises; a straight-through Gumbel-softmax picks
one: the forward pass uses the hard choice k* = argmax_k (z_ik / tau + g_ik) (g Gumbel), i.e. a draw from
softmax(z / tau), exactly stage 2's rule "sample" at temperature tau (argmax as tau -> 0), while the backward
pass takes the gradient of the soft relaxation y = softmax(z / tau + g). The inner model then takes H real
Adam steps on the selected noise,

    theta_{h+1} = Adam(theta_h, grad_theta mean_i l(theta_h; x0_i, t_i, sum_k y_ik eps_ik)),

differentiably (`torch.func.functional_call`, `create_graph=True`): Adam's moments enter each step with
their current values, but only the current gradient's share of the first moment (and the gradient itself,
through the parameters of every later step) is differentiated; the second moment is held fixed within a
step. The values are those of `torch.optim.Adam`, so the steps *are* the inner model's training: theta_H
and the moments are written back, and the next meta step starts from there (a horizon truncated at H).
The outer loss is the plain denoising loss on a batch of the val split with Gaussian noise at theta_H; its
gradient reaches the rater through the relaxed choices of all H steps.

The assignment variant (`assign=True`, meta-objective "through-assignment") differentiates through stage 2's
rule "assign" instead: the B samples of a batch and the batch's B Gaussian noises are scored against each
other (z_ij = r(x0_i, t_i, eps_j), B^2 triples); the forward pass is the permutation that maximises
sum_i (z_i,pi(i) / tau + g_i,pi(i)) (the Hungarian method on Gumbel-perturbed scores, so the noises stay
exactly the batch's: both marginals are kept), the backward pass the gradient of the doubly stochastic
Sinkhorn plan of z / tau + g (`SINKHORN_ITERS` row and column normalisations in log space; Gumbel-Sinkhorn).
Stage 2's rule "assign" is its unperturbed limit.

Logged at evaluated steps: `outer_loss_learned` (that outer loss) against `outer_loss_uniform`, the same H
Adam steps from the same state on the same pairs with the first (a plain Gaussian) candidate instead of the
selected one (for assignment: each sample's own noise); and `choice_entropy`, the mean entropy of
softmax(z / tau) over each row's K candidates (B noises for assignment) divided by its log (1: the rater
cannot tell the candidates apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from noiserater.trainer.stage1.meta import Batch, Params, _grad, _leaf, losses_at
from noiserater.trainer.substrate.diffusion import Schedule

SINKHORN_ITERS = 20


@dataclass
class AdamState:
    """One inner model's Adam state as plain tensors: first and second moments and the step count."""

    m: Params
    v: Params
    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float

    @classmethod
    def read(cls, optimizer: torch.optim.Adam, named: dict[str, nn.Parameter]) -> AdamState:
        group = optimizer.param_groups[0]
        if group.get("weight_decay", 0) or group.get("amsgrad", False) or group.get("maximize", False):
            raise ValueError("through-selection steps follow plain Adam (no weight decay, amsgrad or maximize)")
        m, v, step = {}, {}, 0
        for name, p in named.items():
            state = optimizer.state.get(p, {})
            m[name] = state["exp_avg"].detach().clone() if "exp_avg" in state else torch.zeros_like(p)
            v[name] = state["exp_avg_sq"].detach().clone() if "exp_avg_sq" in state else torch.zeros_like(p)
            step = int(state["step"]) if "step" in state else 0
        beta1, beta2 = group["betas"]
        return cls(m, v, step, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]))

    def write(self, optimizer: torch.optim.Adam, named: dict[str, nn.Parameter], theta: Params) -> None:
        """Set the model's parameters to `theta` and its optimiser's state to these moments."""
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(theta[name])
                state = optimizer.state[p]
                state["step"] = torch.tensor(float(self.step))
                state["exp_avg"] = self.m[name].detach().clone()
                state["exp_avg_sq"] = self.v[name].detach().clone()

    def step_(self, theta: Params, grads: Params) -> Params:
        """One Adam step from `theta` with `grads` (which may carry a graph); updates the moments in place
        (detached) and returns the new parameters (differentiable through `grads` and `theta`)."""
        self.step += 1
        bc1 = 1 - self.beta1**self.step
        bc2 = 1 - self.beta2**self.step
        out: Params = {}
        for k, g in grads.items():
            gd = g.detach()
            m_graph = self.beta1 * self.m[k] + (1 - self.beta1) * g  # the value of the new m, with g's graph
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * gd
            self.v[k] = self.beta2 * self.v[k] + (1 - self.beta2) * gd * gd
            denom = (self.v[k] / bc2).sqrt() + self.eps
            out[k] = theta[k] - self.lr * (m_graph / bc1) / denom
        return out

    def copy(self) -> AdamState:
        return AdamState({k: v.clone() for k, v in self.m.items()}, {k: v.clone() for k, v in self.v.items()},
                         self.step, self.lr, self.beta1, self.beta2, self.eps)


def straight_through_choice(scores: torch.Tensor, tau: float, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
    """[B, K] one-hot rows (the forward value) whose gradient is that of softmax(scores / tau + Gumbel): the
    hard row is a draw from softmax(scores / tau)."""
    u = torch.rand(scores.shape, generator=generator, device=generator.device if generator is not None else "cpu")
    gumbel = -torch.log(-torch.log(u.to(scores.device, scores.dtype).clamp(1e-10, 1 - 1e-7)))
    soft = torch.softmax(scores / tau + gumbel, dim=1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=1), scores.shape[1]).to(soft.dtype)
    return hard - soft.detach() + soft


def sinkhorn(log_alpha: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """The doubly stochastic matrix of `iters` alternating row and column normalisations of exp(log_alpha)."""
    for _ in range(iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=0, keepdim=True)
    return log_alpha.exp()


def straight_through_assignment(scores: torch.Tensor, tau: float, generator: torch.Generator | None = None
                                ) -> torch.Tensor:
    """[B, B] permutation matrix (row i takes noise j where it is 1; the forward value) maximising the
    Gumbel-perturbed summed score, whose gradient is that of the Sinkhorn plan of scores / tau + Gumbel."""
    from scipy.optimize import linear_sum_assignment

    u = torch.rand(scores.shape, generator=generator, device=generator.device if generator is not None else "cpu")
    perturbed = scores / tau - torch.log(-torch.log(u.to(scores.device, scores.dtype).clamp(1e-10, 1 - 1e-7)))
    soft = sinkhorn(perturbed)
    rows, cols = linear_sum_assignment(perturbed.detach().cpu().double().numpy(), maximize=True)
    hard = torch.zeros_like(soft)
    hard[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
    return hard - soft.detach() + soft


def choice_entropy(scores: torch.Tensor, tau: float) -> float:
    """Mean entropy of softmax(scores / tau) over each row, divided by log K."""
    p = torch.softmax(scores.detach() / tau, dim=1)
    return float(-(p * p.clamp_min(1e-30).log()).sum(dim=1).mean() / math.log(scores.shape[1]))


@dataclass
class SelectionResult:
    outer_loss: float  # val loss after the H selected steps
    inner_loss: float  # mean train loss of the first step (selected noise), at theta_0
    theta: Params  # theta_H, detached
    adam: AdamState  # the moments after the H steps
    entropy: float
    scores: list[torch.Tensor]  # detached [B, K] per step


def assign_noise(rater: nn.Module, batch: Batch, tau: float, generator: torch.Generator | None
                 ) -> tuple[Batch, torch.Tensor]:
    """From a batch of B rows (B pairs with one Gaussian noise each): the B pairs with the batch's noises
    permuted over them by the straight-through assignment, and the [B, B] scores (row i = sample i)."""
    x0, t, eps = batch
    b = x0.shape[0]
    scores = rater(x0.repeat_interleave(b, 0), t.repeat_interleave(b), eps.repeat(b, *([1] * (eps.dim() - 1))))
    scores = scores.view(b, b)
    y = straight_through_assignment(scores, tau, generator)
    return (x0, t, (y @ eps.flatten(1)).view_as(eps)), scores


def select_noise(rater: nn.Module, batch: Batch, k: int, tau: float, generator: torch.Generator | None
                 ) -> tuple[Batch, torch.Tensor]:
    """From a batch of B*K rows (B pairs, each repeated over K candidates, `MetaTrainer._batch` with
    group K): the B pairs with their straight-through selected noise, and the [B, K] scores."""
    x0, t, eps = batch
    scores = rater(x0, t, eps).view(-1, k)
    y = straight_through_choice(scores, tau, generator)
    cands = eps.view(scores.shape[0], k, *eps.shape[1:])
    chosen = (y.view(*y.shape, *([1] * (eps.dim() - 1))) * cands).sum(dim=1)
    return (x0[::k], t[::k], chosen), scores


def through_selection_gradient(model: nn.Module, schedule: Schedule, params: Params, adam: AdamState,
                               rater: nn.Module, batches: list[Batch], val_batch: Batch, k: int, tau: float,
                               generator: torch.Generator | None = None, grad_scale: float = 1.0,
                               assign: bool = False) -> SelectionResult:
    """Accumulate grad_scale * dL_val(theta_H)/dphi into the rater's .grad: H = len(batches) differentiable
    Adam steps of `model` from `params` (state `adam`, not modified) on the noise the rater selects (with
    `assign`: the batch's noises as the rater assigns them; batches of B rows and k = 1)."""
    theta = _leaf(params)
    state = adam.copy()
    inner = 0.0
    all_scores = []
    entropy = 0.0
    for h, batch in enumerate(batches):
        selected, scores = (assign_noise(rater, batch, tau, generator) if assign
                            else select_noise(rater, batch, k, tau, generator))
        all_scores.append(scores.detach())
        entropy += choice_entropy(scores, tau) / len(batches)
        losses = losses_at(model, schedule, theta, selected)
        if h == 0:
            inner = float(losses.detach().mean())
        grads = _grad(losses.mean(), theta, create_graph=True)
        theta = state.step_(theta, grads)
    outer = losses_at(model, schedule, theta, val_batch).mean()
    rater_params = [p for p in rater.parameters() if p.requires_grad]
    rgrads = torch.autograd.grad(outer * grad_scale, rater_params, allow_unused=True)
    for p, g in zip(rater_params, rgrads, strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return SelectionResult(float(outer.detach()), inner, {n: v.detach() for n, v in theta.items()}, state, entropy,
                           all_scores)


def uniform_outer_loss(model: nn.Module, schedule: Schedule, params: Params, adam: AdamState,
                       batches: list[Batch], val_batch: Batch, k: int) -> float:
    """The val loss after the same H Adam steps on the same pairs with each pair's first candidate (plain
    Gaussian noise) instead of the selected one."""
    theta = {n: v.detach() for n, v in params.items()}
    state = adam.copy()
    for x0, t, eps in batches:
        leaf = _leaf(theta)
        grads = _grad(losses_at(model, schedule, leaf, (x0[::k], t[::k], eps[::k])).mean(), leaf)
        theta = {n: v.detach() for n, v in state.step_(leaf, grads).items()}
    with torch.no_grad():
        return float(losses_at(model, schedule, theta, val_batch).mean())
