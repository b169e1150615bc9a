"""The peer methods in the stage-2 harness: immiscible, its KNN variant, min-SNR-gamma weights."""

from __future__ import annotations

import itertools

import torch

from noiserater.client import peers
from noiserater.trainer.substrate.diffusion import NoiseSchedule


def test_immiscible_is_the_distance_minimising_permutation():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 5, generator=gen)
    noise = torch.randn(6, 5, generator=gen)
    perm = peers.immiscible_permutation(x0, noise)
    assert sorted(perm.tolist()) == list(range(6))
    cost = peers.squared_distances(x0, noise).numpy()
    best = min(itertools.permutations(range(6)), key=lambda p: sum(cost[i, p[i]] for i in range(6)))
    assert perm.tolist() == list(best)
    assert sum(cost[i, perm[i]] for i in range(6)) <= sum(cost[i, i] for i in range(6))


def test_immiscible_keeps_the_batch_noise_multiset():
    x0 = torch.randn(16, 3, 4, 4)
    eps = peers.immiscible(x0, torch.Generator().manual_seed(1))
    plain = peers.gaussian(x0, torch.Generator().manual_seed(1))
    assert eps.shape == x0.shape
    key = lambda a: sorted(map(tuple, a.flatten(1).tolist()))  # noqa: E731
    assert key(eps) == key(plain)


def test_knn_picks_the_nearest_candidate():
    x0 = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    candidates = torch.tensor([[[3.0, 0.0], [0.5, 0.5], [-2.0, 0.0]],
                               [[0.0, 0.0], [9.0, 9.0], [10.0, 11.5]]])
    assert peers.nearest_candidate(x0, candidates).tolist() == [1, 1]
    eps = peers.immiscible_knn(torch.randn(7, 4), torch.Generator().manual_seed(0), k=5)
    assert eps.shape == (7, 4)


def test_knn_draw_is_the_nearest_of_its_k_candidates():
    x0 = torch.randn(7, 4)
    eps = peers.immiscible_knn(x0, torch.Generator().manual_seed(3), k=5)
    candidates = torch.randn((7, 5, 4), generator=torch.Generator().manual_seed(3))
    dist = (candidates - x0[:, None]).pow(2).sum(-1)
    torch.testing.assert_close(eps, candidates[torch.arange(7), dist.argmin(1)])


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(peers.min_snr_weights(snr), torch.tensor([1.0, 1.0, 0.1]))
    schedule = NoiseSchedule(1000)
    t = torch.arange(0, 1000, 50)
    w = peers.min_snr_weights(schedule.snr(t), gamma=5.0)
    assert (w <= 1).all() and (w > 0).all()
    low_t = schedule.snr(t) > 5
    torch.testing.assert_close(w[low_t], 5.0 / schedule.snr(t)[low_t])
