"""Stage-2 selection rules on fixed candidates, through the shared scoring code and the NoiseSelector.

The rater here is hand-made so the expected choice is known: score(x0, t, eps) = <x0, eps>.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from support import select_in_process
from torch import nn

from noiserater.core import scoring, selection
from noiserater.trainer.stage2.sources import kanneal_schedule

D, T = 4, 50


class DotRater(nn.Module):
    def __init__(self):
        super().__init__()
        self.data_shape = (D,)
        self.num_timesteps = T

    def forward(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x0 * eps).sum(1) + 0.0 * t.to(torch.float32)


@pytest.fixture(scope="module")
def dot_onnx(tmp_path_factory):
    from noiserater.trainer.stage1.export import export_rater

    path = tmp_path_factory.mktemp("dot") / "dot.onnx"
    export_rater(DotRater(), path, dataset="test", schedule="linear")
    return path


def fixed_batch():
    x0 = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    t = np.array([3, 7, 11], dtype=np.int64)
    # candidate j of sample b is j * e_b (so the score of candidate j is j) except for a twist in sample 2
    candidates = np.zeros((3, 4, D), dtype=np.float32)
    for b in range(3):
        for j in range(4):
            candidates[b, j, b] = j
    candidates[2, :, 2] = [5, -1, 2, 0]
    return x0, t, candidates


def test_argmax_picks_the_highest_scored_candidate(dot_onnx):
    session = scoring.RaterSession(dot_onnx, device="cpu")
    x0, t, candidates = fixed_batch()
    indices, scores = select_in_process(session, x0, t, candidates, 1, "top_k")
    assert indices[:, 0].tolist() == [3, 3, 0]
    assert scores[:, 0].tolist() == [3.0, 3.0, 5.0]
    top2, _ = select_in_process(session, x0, t, candidates, 2, "top_k")
    assert top2.tolist() == [[3, 2], [3, 2], [0, 2]]


def test_sample_is_seeded_gumbel_top_k_and_cold_sampling_is_argmax(dot_onnx):
    session = scoring.RaterSession(dot_onnx, device="cpu")
    x0, t, candidates = fixed_batch()
    scores = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [5, -1, 2, 0]], dtype=np.float64)
    for seed in (0, 1, 2):
        got, _ = select_in_process(session, x0, t, candidates, 1, "sample", temperature=2.0, seed=seed)
        gumbel = np.random.default_rng(seed).gumbel(size=scores.shape)
        assert got[:, 0].tolist() == np.argmax(scores / 2.0 + gumbel, axis=1).tolist()
        again, _ = select_in_process(session, x0, t, candidates, 1, "sample", temperature=2.0, seed=seed)
        assert (again == got).all()
    cold, _ = select_in_process(session, x0, t, candidates, 1, "sample", temperature=1e-4, seed=3)
    assert cold[:, 0].tolist() == [3, 3, 0]


def test_assign_maximises_the_summed_score_and_keeps_the_noise_multiset(dot_onnx):
    rng = np.random.default_rng(0)
    b = 6
    x0 = rng.standard_normal((b, D)).astype(np.float32)
    t = np.zeros(b, dtype=np.int64)
    pool = rng.standard_normal((b, 1, D)).astype(np.float32)
    session = scoring.RaterSession(dot_onnx, device="cpu")
    perm, _ = select_in_process(session, x0, t, pool, 1, "assign")
    perm = perm[:, 0]
    assert sorted(perm.tolist()) == list(range(b))  # a permutation: the multiset of noises is unchanged
    matrix = x0 @ pool[:, 0].T
    best = max(itertools.permutations(range(b)), key=lambda p: sum(matrix[i, p[i]] for i in range(b)))
    assert perm.tolist() == list(best)


def test_selector_rules_match_the_shared_functions(dot_onnx):
    from noiserater.client.selector import NoiseSelector

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, D, generator=gen)
    t = torch.randint(0, T, (5,), generator=gen)
    for rule, shared in (("argmax", "top_k"), ("sample", "sample")):
        selector = NoiseSelector.local(dot_onnx, num_candidates=6, rule=rule, temperature=0.5, seed=4)
        twin = NoiseSelector.local(dot_onnx, num_candidates=6, rule=rule, temperature=0.5, seed=4)
        candidates = twin.draw_candidates(x0, 6)
        eps = selector.select(x0, t)
        scores = (x0[:, None, :] * candidates).sum(-1).numpy()
        expected = (selection.top_k(scores, 1) if shared == "top_k"
                    else selection.sample(scores, 1, 0.5, seed=4 * 1_000_003))[:, 0]
        torch.testing.assert_close(eps, candidates[torch.arange(5), torch.from_numpy(expected)])
    selector = NoiseSelector.local(dot_onnx, rule="assign", seed=9)
    pool = NoiseSelector.local(dot_onnx, rule="assign", seed=9).draw_candidates(x0, 1)[:, 0]
    eps = selector.select(x0, t)
    perm = selection.assign((x0 @ pool.T).numpy())
    torch.testing.assert_close(eps, pool[torch.from_numpy(perm)])
    assert sorted(map(tuple, eps.numpy().tolist())) == sorted(map(tuple, pool.numpy().tolist()))


def test_k_anneal_schedule_goes_from_k_to_one():
    k_at = kanneal_schedule(8, 1000, 0.5)
    ks = [k_at(s) for s in range(1000)]
    assert ks[0] == 8 and ks[499] == 1 and ks[-1] == 1
    assert all(a >= b for a, b in itertools.pairwise(ks))


def test_t_threshold_selects_only_above_t_min_and_symmetrise_only_flips_signs(dot_onnx):
    from noiserater.client import peers
    from noiserater.client.selector import NoiseSelector
    from noiserater.client.sources import make_source
    from noiserater.trainer.stage2.variants import symmetrised, t_threshold

    def argmax(seed: int, *wrappers):
        options = dict(generator=torch.Generator().manual_seed(seed * 1000 + 2), rater=dot_onnx, num_candidates=4,
                       seed=seed, steps=10)
        source = make_source("rater-argmax", **options)
        for wrap in wrappers:
            source = wrap(source, options)
        return source

    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, D, generator=gen)
    t = torch.tensor([0, 10, 30, 40, 24, 49])
    high = t >= 25
    eps = argmax(0, t_threshold(25)).sample(x0, t, 0)
    gaussian = peers.gaussian(x0, torch.Generator().manual_seed(0 * 1000 + 2))
    torch.testing.assert_close(eps[~high], gaussian[~high])
    twin = NoiseSelector.local(dot_onnx, num_candidates=4, seed=0, intra_op_threads=1)
    candidates = twin.draw_candidates(x0[high], 4)
    best = (x0[high][:, None, :] * candidates).sum(-1).argmax(1)
    torch.testing.assert_close(eps[high], candidates[torch.arange(int(high.sum())), best])

    a, b = argmax(3).sample(x0, t, 0), argmax(3, symmetrised()).sample(x0, t, 0)
    ratio = (b / a)[:, 0]
    assert set(ratio.round().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(b, a * ratio[:, None])


def test_importance_weights_are_one_over_k_p(dot_onnx):
    from noiserater.client.sources import make_source
    from noiserater.trainer.stage2.sources import Stage2Error
    from noiserater.trainer.stage2.variants import importance_weighted

    k, temperature = 4, 1.0

    def source(method: str):
        options = dict(generator=torch.Generator().manual_seed(0 * 1000 + 2), rater=dot_onnx, num_candidates=k,
                       temperature=temperature, seed=0, steps=10)
        return importance_weighted()(make_source(method, **options), options)

    weighted = source("rater-sample")
    t = torch.zeros(5, dtype=torch.long)
    weighted.sample(torch.zeros(5, D), t, 0)  # x0 = 0: every candidate scores 0, p = 1/K, weight exactly 1
    torch.testing.assert_close(weighted.loss_weights(t), torch.ones(5))
    fresh = source("rater-sample")
    x0 = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
    eps = fresh.sample(x0, t, 0)
    candidates = torch.randn((5, 4, D), generator=torch.Generator().manual_seed(0 * 1000 + 2))  # the same stream
    chosen = [int(((candidates[i] - eps[i]).abs().sum(-1) < 1e-6).nonzero()[0]) for i in range(5)]
    p = ((x0[:, None, :] * candidates).sum(-1).double() / temperature).softmax(1)
    expected = 1.0 / (4 * p[torch.arange(5), torch.tensor(chosen)])
    torch.testing.assert_close(fresh.loss_weights(t), expected.float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(Stage2Error, match="importance weighting needs a rater-sample source"):
        source("rater-argmax")
