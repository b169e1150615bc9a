"""The peers: the baselines a rater has to beat, as functions on tensors (`noiserater.client.sources` wraps
each as a noise source).

- `uniform`: plain Gaussian noise, eps ~ N(0, I) (the baseline).
- `immiscible`: Immiscible Diffusion (Li et al., 2024): draw B Gaussian noises for the batch and assign them
  to the B samples by a linear assignment that minimises the summed squared L2 distance ||x0_i - eps_j||^2
  (scipy `linear_sum_assignment`). The multiset of noises is unchanged; only the pairing moves.
- `immiscible-knn`: the per-sample variant: draw K Gaussian candidates per sample and keep the nearest to
  x0 (the same K as the rater, so the comparison isolates *what* is selected, not how many are drawn).
- `min-snr`: Min-SNR-gamma loss weighting (Hang et al., 2023) on plain Gaussian noise; for eps-prediction
  the per-sample weight is min(snr(t), gamma) / snr(t), gamma = 5.

Couplings from outside packages and the model-aligned rules (each keeps the harness's x0, every sample
once, in order; what each keeps of the noise is said per function):

- `ot`: exact minibatch optimal transport from POT (`ot.emd`, squared-Euclidean cost, uniform weights), whose
  plan is a permutation: the same coupling as `immiscible`, from another solver.
- `ot-sinkhorn`: entropic OT (POT's `ot.sinkhorn`, regularisation relative to the mean cost), the pairing
  drawn from the plan without replacement (`draw_pairing`); from exact OT (reg 0) to independent (reg -> inf).
- `ot-subbatch`: exact OT within consecutive sub-batches; from independent (size 1) to `ot` (the whole batch).
- `ot-torchcfm`: the exact plan of torchcfm's `ExactOptimalTransportConditionalFlowMatcher` (its
  `OTPlanSampler(method="exact").get_map`), each x0 drawing its noise from the plan.
- `model-aligned`: per sample, the one of K Gaussian candidates on which the current denoiser's loss is lowest.
- `model-aligned-assign`: B Gaussian noises assigned over the batch by the permutation minimising the summed
  per-pair loss of the current denoiser.

POT and torchcfm are optional: they are imported only inside these functions.

Selection rules go through `noiserater.core.selection`, the same functions the rater path uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from noiserater.core import selection

MIN_SNR_GAMMA = 5.0


def gaussian(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """eps ~ N(0, I), same shape/device/dtype as x0, from `generator`."""
    return torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)


def squared_distances(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[B, B] matrix of ||x0_i - noise_j||^2 over the flattened data dimensions."""
    return torch.cdist(x0.flatten(1).double(), noise.flatten(1).double()).pow(2)


def immiscible_permutation(x0: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """perm [B]: sample i takes noise perm[i], minimising the summed squared distance (a permutation)."""
    cost = squared_distances(x0, noise).cpu().numpy()
    return selection.assign(-cost)


def immiscible(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """B Gaussian noises, permuted over the batch by the distance-minimising assignment."""
    noise = gaussian(x0, generator)
    perm = torch.from_numpy(immiscible_permutation(x0, noise)).to(noise.device)
    return noise[perm]


def nearest_candidate(x0: torch.Tensor, candidates: torch.Tensor) -> np.ndarray:
    """indices [B]: per sample, the candidate (of candidates [B, K, ...]) nearest to x0 in L2."""
    diff = candidates.flatten(2).double() - x0.flatten(1).double()[:, None, :]
    distances = diff.pow(2).sum(-1).cpu().numpy()  # [B, K]
    return selection.top_k(-distances, 1)[:, 0]


def immiscible_knn(x0: torch.Tensor, generator: torch.Generator, k: int) -> torch.Tensor:
    """Nearest of K Gaussian candidates per sample."""
    shape = (x0.shape[0], k, *x0.shape[1:])
    candidates = torch.randn(shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)
    idx = torch.from_numpy(nearest_candidate(x0, candidates)).to(x0.device)
    return candidates[torch.arange(x0.shape[0], device=x0.device), idx]


def min_snr_weights(snr: torch.Tensor, gamma: float = MIN_SNR_GAMMA, objective: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma weights: min(snr, gamma) / snr for an eps-prediction loss, and min(snr, gamma) / (snr + 1)
    for a velocity loss (the v-prediction form; 0 at pure noise, where snr is 0)."""
    if objective == "flow":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x0, t, eps) -> [B] per-sample losses of the current denoiser (no gradient needed)."""

OT_MAX_ITERATIONS = 10_000_000  # the network simplex's budget: enough for batches of thousands


def _uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def plan_permutation(plan: np.ndarray) -> np.ndarray:
    """perm [B]: the permutation a [B, B] transport plan with uniform marginals puts its mass on (an exact
    solver's plan is one; for a plan with ties spread over several, the permutation of largest mass)."""
    perm = plan.argmax(1)
    if len(np.unique(perm)) == len(perm):
        return perm.astype(np.int64)
    return selection.assign(plan)


def ot_permutation(x0: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
    """perm [B]: exact minibatch OT between x0 and noise by POT's `ot.emd` on the squared-Euclidean cost."""
    import ot

    cost = squared_distances(x0, noise).cpu().numpy()
    n = cost.shape[0]
    return plan_permutation(ot.emd(_uniform(n), _uniform(n), cost, numItermax=OT_MAX_ITERATIONS))


def ot_exact(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """B Gaussian noises, permuted over the batch by POT's exact OT plan (keeps the drawn multiset)."""
    noise = gaussian(x0, generator)
    return noise[torch.from_numpy(ot_permutation(x0, noise)).to(noise.device)]


def ot_subbatch(x0: torch.Tensor, generator: torch.Generator, size: int) -> torch.Tensor:
    """B Gaussian noises (the draw `gaussian` makes), permuted by exact OT within consecutive sub-batches of
    `size` (the last may be smaller): size 1 is that draw as it is, size >= B (or 0) is `ot_exact`."""
    noise = gaussian(x0, generator)
    n = x0.shape[0]
    size = n if size <= 0 else min(size, n)
    if size == 1:
        return noise
    perm = np.arange(n)
    for start in range(0, n, size):
        stop = min(start + size, n)
        if stop - start > 1:
            perm[start:stop] = start + ot_permutation(x0[start:stop], noise[start:stop])
    return noise[torch.from_numpy(perm).to(noise.device)]


def draw_pairing(plan: np.ndarray, generator: torch.Generator, cost: np.ndarray | None = None) -> np.ndarray:
    """perm [B]: a permutation drawn from a [B, B] plan (row i = sample i, column j = noise j) without
    replacement: the rows in a random order, each drawing its column from its plan row restricted to the
    columns not yet taken (renormalised); a row whose untaken mass underflowed to zero takes its untaken
    column of lowest `cost` (of largest plan value without one). All randomness comes from `generator`.

    A plan that is a permutation gives that permutation; a uniform plan gives a uniformly random one. Each
    noise is used once, so the batch's noises are the drawn multiset (drawing every row independently from
    its plan row would reuse some noises and drop others, and even a uniform plan would not give
    independent noise)."""
    n = plan.shape[0]
    device = generator.device
    order = torch.randperm(n, generator=generator, device=device).cpu().numpy()
    uniforms = torch.rand(n, generator=generator, device=device, dtype=torch.float64).cpu().numpy()
    weights = np.clip(np.nan_to_num(np.asarray(plan, dtype=np.float64)), 0.0, None)
    free = np.ones(n, dtype=bool)
    perm = np.empty(n, dtype=np.int64)
    for row, u in zip(order, uniforms, strict=True):
        w = np.where(free, weights[row], 0.0)
        total = w.sum()
        if total > 0 and np.isfinite(total):
            col = int(np.searchsorted(np.cumsum(w), u * total, side="right"))
            if col >= n:  # rounding at the top end of the cumulative sum
                col = int(np.flatnonzero(w > 0)[-1])
        elif cost is not None:
            col = int(np.argmin(np.where(free, cost[row], np.inf)))
        else:
            col = int(np.argmax(np.where(free, weights[row], -np.inf)))
        perm[row] = col
        free[col] = False
    return perm


def sinkhorn_plan(cost: np.ndarray, reg: float) -> np.ndarray:
    """POT's entropic OT plan for a [B, B] cost with uniform marginals and regularisation `reg` * mean(cost).

    Each row's minimum is taken off the cost first (the plan is unchanged: a row's constant is absorbed by
    its scaling). POT's default Sinkhorn-Knopp runs first; where it fails (at a small reg its kernel
    underflows, or it stops short of convergence) and the plan comes back non-finite or more than 1% off its
    marginals, POT's epsilon-scaling solver (`method="sinkhorn_epsilon_scaling"`, log-stabilised) is used.
    """
    import ot

    n = cost.shape[0]
    a = _uniform(n)
    scale = float(cost.mean())
    shifted = cost - cost.min(axis=1, keepdims=True)
    absolute = reg * scale if scale > 0 else reg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            plan = ot.sinkhorn(a, a, shifted, absolute)
    if _off_marginals(plan, a):
        plan = ot.sinkhorn(a, a, shifted, absolute, method="sinkhorn_epsilon_scaling")
    return plan


def _off_marginals(plan: np.ndarray, a: np.ndarray, tolerance: float = 1e-2) -> bool:
    if not np.all(np.isfinite(plan)):
        return True
    error = max(np.abs(plan.sum(0) - a).max(), np.abs(plan.sum(1) - a).max())
    return bool(error > tolerance * a[0])


def ot_sinkhorn(x0: torch.Tensor, generator: torch.Generator, reg: float) -> torch.Tensor:
    """B Gaussian noises paired with the batch by a draw (`draw_pairing`) from POT's entropic OT plan with
    regularisation `reg` relative to the mean squared distance; reg 0 is exact OT (`ot_exact`'s pairing)."""
    noise = gaussian(x0, generator)
    cost = squared_distances(x0, noise).cpu().numpy()
    if reg <= 0:
        import ot

        n = cost.shape[0]
        perm = plan_permutation(ot.emd(_uniform(n), _uniform(n), cost, numItermax=OT_MAX_ITERATIONS))
    else:
        perm = draw_pairing(sinkhorn_plan(cost, reg), generator, cost)
    return noise[torch.from_numpy(perm).to(noise.device)]


def torchcfm_plan_sampler() -> Any:
    """torchcfm's exact minibatch OT plan sampler, as `ExactOptimalTransportConditionalFlowMatcher` builds it."""
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

    return ExactOptimalTransportConditionalFlowMatcher().ot_sampler


def torchcfm_exact(x0: torch.Tensor, generator: torch.Generator, sampler: Any = None) -> torch.Tensor:
    """B Gaussian noises paired with the batch by torchcfm's exact OT plan.

    torchcfm's own `sample_plan(noise, data)` draws B (noise, data) index pairs from the flattened plan with
    replacement (numpy's global generator), so it may repeat or drop data samples. Here the data are given,
    in order: the plan comes from the sampler's `get_map(noise, x0)` (torchcfm's orientation: noise is its
    source, data its target; the cost as torchcfm computes it, in the tensors' dtype) and each x0 draws its
    noise from its column of the plan (`draw_pairing`, with `generator`), i.e. from the noise torchcfm pairs
    with that x0. The exact plan is a permutation, so this is exactly torchcfm's pairing."""
    sampler = sampler if sampler is not None else torchcfm_plan_sampler()
    noise = gaussian(x0, generator)
    plan = np.asarray(sampler.get_map(noise, x0), dtype=np.float64)  # [noise, data]
    perm = draw_pairing(plan.T, generator)
    return noise[torch.from_numpy(perm).to(noise.device)]


def candidate_losses(x0: torch.Tensor, t: torch.Tensor, candidates: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """[B, K] losses of `loss_fn` for each sample with each of its candidates (candidates [B, K, ...])."""
    b, k = candidates.shape[:2]
    with torch.no_grad():
        losses = loss_fn(x0.repeat_interleave(k, dim=0), t.repeat_interleave(k, dim=0), candidates.flatten(0, 1))
    return losses.reshape(b, k)


def model_aligned(x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator, k: int,
                  loss_fn: LossFn) -> torch.Tensor:
    """Per sample, the one of K Gaussian candidates with the lowest `loss_fn` (ties: the lower index)."""
    shape = (x0.shape[0], k, *x0.shape[1:])
    candidates = torch.randn(shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)
    losses = candidate_losses(x0, t, candidates, loss_fn).double().cpu().numpy()
    idx = torch.from_numpy(selection.top_k(-losses, 1)[:, 0]).to(x0.device)
    return candidates[torch.arange(x0.shape[0], device=x0.device), idx]


PAIRS_PER_CALL = 8192  # model_aligned_assign evaluates the B x B pairs in calls of about this many


def pair_losses(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """[B, B] losses: row i = sample i (at its own t_i), column j = noise j."""
    n = x0.shape[0]
    rows_per_call = max(1, PAIRS_PER_CALL // n)
    out = []
    with torch.no_grad():
        for start in range(0, n, rows_per_call):
            stop = min(start + rows_per_call, n)
            rows = stop - start
            losses = loss_fn(x0[start:stop].repeat_interleave(n, dim=0), t[start:stop].repeat_interleave(n, dim=0),
                             noise.repeat(rows, *([1] * (noise.dim() - 1))))
            out.append(losses.reshape(rows, n))
    return torch.cat(out)


def model_aligned_assign(x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
                         loss_fn: LossFn) -> torch.Tensor:
    """B Gaussian noises permuted over the batch to minimise the summed `loss_fn` of the pairs (scipy
    `linear_sum_assignment` on the [B, B] per-pair losses: B^2 loss evaluations per batch)."""
    noise = gaussian(x0, generator)
    cost = pair_losses(x0, t, noise, loss_fn).double().cpu().numpy()
    return noise[torch.from_numpy(selection.assign(-cost)).to(noise.device)]
