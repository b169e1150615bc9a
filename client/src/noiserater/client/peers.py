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

Selection rules go through `noiserater.core.selection`, the same functions the rater path uses.
"""

from __future__ import annotations

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
