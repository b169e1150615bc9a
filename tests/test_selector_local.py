"""NoiseSelector.local: shapes, the rules against the rater's own scores, fallbacks and prefetch."""

import numpy as np
import pytest
import torch
from support import free_port

from noiserater.client.selector import NoiseSelector, SelectorError
from noiserater.core import scoring
from noiserater.core.selection import SelectionPlan


def batch(b=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, 64, generator=gen) * 2 - 1, torch.randint(0, 100, (b,), generator=gen)


def test_select_returns_noise_like_x0(rater_onnx):
    selector = NoiseSelector.local(rater_onnx, num_candidates=4)
    x0, t = batch()
    for dtype in (torch.float32, torch.float16):
        eps = selector.select(x0.to(dtype), t)
        assert eps.shape == x0.shape and eps.dtype == dtype and eps.device == x0.device
    assert set(selector.last_stats) == {"sq_norm_per_dim", "cosine_with_x0"}


def test_argmax_picks_the_best_scored_candidate(rater_onnx):
    session = scoring.RaterSession(rater_onnx, device="cpu")
    selector = NoiseSelector.local(rater_onnx, num_candidates=8, seed=5)
    x0, t = batch()
    twin = NoiseSelector.local(rater_onnx, num_candidates=8, seed=5)  # same generator stream -> same candidates
    candidates = twin.draw_candidates(x0, 8)
    eps = selector.select(x0, t)
    scores = session.score(*SelectionPlan(8).triples(x0.numpy(), t.numpy(), candidates.numpy())).reshape(6, 8)
    best = scores.argmax(axis=1)
    torch.testing.assert_close(eps, candidates[torch.arange(6), torch.from_numpy(best)])
    assert (scores.max(axis=1) > scores.mean(axis=1)).all()


def test_assign_permutes_the_batch_noise(rater_onnx):
    selector = NoiseSelector.local(rater_onnx, rule="assign", seed=2)
    twin = NoiseSelector.local(rater_onnx, rule="assign", seed=2)
    x0, t = batch(b=9)
    pool = twin.draw_candidates(x0, 1)[:, 0]
    eps = selector.select(x0, t)
    rows = sorted(map(tuple, eps.numpy().round(6).tolist()))
    assert rows == sorted(map(tuple, pool.numpy().round(6).tolist()))


def test_per_call_num_candidates_overrides_and_bad_arguments(rater_onnx):
    selector = NoiseSelector.local(rater_onnx, num_candidates=8)
    x0, t = batch()
    assert selector.select(x0, t, num_candidates=1).shape == x0.shape
    with pytest.raises(SelectorError, match="num_candidates:"):
        selector.select(x0, t, num_candidates=0)
    with pytest.raises(SelectorError, match="x0: shape"):
        selector.select(x0[:, :10], t)
    with pytest.raises(SelectorError, match="rule"):
        NoiseSelector.local(rater_onnx, rule="best")
    with pytest.raises(SelectorError, match="not found"):
        NoiseSelector.local("/nonexistent/model.onnx")


def test_sample_rule_is_reproducible(rater_onnx):
    x0, t = batch()
    a = NoiseSelector.local(rater_onnx, num_candidates=8, rule="sample", temperature=0.5, seed=11)
    b = NoiseSelector.local(rater_onnx, num_candidates=8, rule="sample", temperature=0.5, seed=11)
    torch.testing.assert_close(a.select(x0, t), b.select(x0, t))


def test_remote_without_server_falls_back_and_counts(rater_onnx):
    target = f"127.0.0.1:{free_port()}"  # nothing listens here
    x0, t = batch()
    gaussian = NoiseSelector.remote(target, model="digits", num_candidates=4, timeout_s=0.5, max_attempts=2, seed=1)
    eps = gaussian.select(x0, t)
    # Unreachable at construction: the breaker is open, and a selection is one torch.randn from the seed.
    torch.testing.assert_close(eps, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    assert gaussian.counters["fallback_gaussian"] == 1 and gaussian.counters["requests"] == 0

    with_local = NoiseSelector.remote(target, model="digits", num_candidates=4, timeout_s=0.5, max_attempts=2, seed=1,
                                      fallback_onnx=rater_onnx)
    local = NoiseSelector.local(rater_onnx, num_candidates=4, seed=1)
    torch.testing.assert_close(with_local.select(x0, t), local.select(x0, t))
    assert with_local.counters["fallback_local"] == 1 and with_local.counters["breaker_open"] == 1
    gaussian.close()
    with_local.close()


def test_prefetch_gives_the_same_noise_as_select(rater_onnx):
    x0, t = batch()
    plain = NoiseSelector.local(rater_onnx, num_candidates=8, seed=4)
    prefetching = NoiseSelector.local(rater_onnx, num_candidates=8, seed=4)
    expected = [plain.select(x0, t), plain.select(x0 * 0.5, t)]
    x0b = x0 * 0.5
    prefetching.prefetch(x0, t)
    first = prefetching.select(x0, t)
    prefetching.prefetch(x0b, t)
    second = prefetching.select(x0b, t)
    torch.testing.assert_close(first, expected[0])
    torch.testing.assert_close(second, expected[1])
    prefetching.close()
    assert np.isfinite(second.numpy()).all()


def test_k_is_a_deprecated_alias_of_num_candidates(rater_onnx):
    x0, t = batch()
    with pytest.warns(DeprecationWarning, match="use num_candidates"):
        old = NoiseSelector.local(rater_onnx, k=3, seed=7)
    new = NoiseSelector.local(rater_onnx, num_candidates=3, seed=7)
    assert old.num_candidates == new.num_candidates == 3
    with pytest.warns(DeprecationWarning, match="use num_candidates"):
        got = old.select(x0, t, k=2)
    torch.testing.assert_close(got, new.select(x0, t, num_candidates=2), rtol=0, atol=0)
    with pytest.raises(TypeError, match="not both"):
        NoiseSelector.local(rater_onnx, num_candidates=3, k=3)
