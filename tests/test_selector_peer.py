"""NoiseSelector as a noise source, and NoiseSelector.peer: a peer method behind the selector's interface."""

from __future__ import annotations

import pytest
import torch

from noiserater.client import peers
from noiserater.client.selector import NoiseSelector, SelectorError
from noiserater.client.sources import NoiseSource, make_source


def batch(b=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, 64, generator=gen) * 2 - 1, torch.randint(0, 100, (b,), generator=gen)


def test_a_rater_selector_is_a_noise_source(rater_onnx):
    selector = NoiseSelector.local(rater_onnx, num_candidates=4, seed=2)
    twin = NoiseSelector.local(rater_onnx, num_candidates=4, seed=2)
    x0, t = batch()
    assert isinstance(selector, NoiseSource)
    torch.testing.assert_close(selector.sample(x0, t, step=0), twin.select(x0, t), rtol=0, atol=0)
    assert selector.loss_weights(t) is None and selector.counters["selections"] == 1


def test_peer_selector_is_the_source_with_the_selector_interface():
    selector = NoiseSelector.peer("immiscible-knn", num_candidates=8, seed=0)
    source = make_source("immiscible-knn", generator=torch.Generator().manual_seed(0), num_candidates=8)
    assert isinstance(selector, NoiseSelector) and isinstance(selector, NoiseSource)
    (x0a, ta), (x0b, tb), (x0c, tc) = batch(seed=1), batch(seed=2), batch(seed=3)
    torch.testing.assert_close(selector.select(x0a, ta), source.sample(x0a, ta, 0), rtol=0, atol=0)
    selector.prefetch(x0b, tb)
    torch.testing.assert_close(selector.select(x0b, tb), source.sample(x0b, tb, 1), rtol=0, atol=0)
    torch.testing.assert_close(selector.sample(x0c, tc, step=2), source.sample(x0c, tc, 2), rtol=0, atol=0)
    assert selector.counters == {"selections": 3, "fallback_local": 0, "fallback_gaussian": 0}
    assert set(selector.last_stats) == {"sq_norm_per_dim", "cosine_with_x0"}
    assert selector.loss_weights(tc) is None and selector.model_version == 0 and selector.session is None
    with pytest.raises(SelectorError, match="num_candidates"):
        selector.select(x0a, ta, num_candidates=2)
    with pytest.raises(SelectorError, match="t: shape"):
        selector.select(x0a, ta[:2])
    selector.close()


def test_a_discarded_peer_prefetch_still_draws_in_call_order():
    selector = NoiseSelector.peer("immiscible", seed=4)
    source = make_source("immiscible", generator=torch.Generator().manual_seed(4))
    (x0a, ta), (x0b, tb) = batch(seed=1), batch(seed=2)
    for _ in range(5):
        selector.prefetch(x0a, ta)  # never selected: select asks for other tensors
        source.sample(x0a, ta, 0)
        torch.testing.assert_close(selector.select(x0b, tb), source.sample(x0b, tb, 1), rtol=0, atol=0)
    selector.close()


def test_peer_loss_weights_and_errors():
    snr = lambda t: 10.0 / (1.0 + t.float())  # noqa: E731
    with NoiseSelector.peer("min-snr", seed=1, snr=snr) as selector:
        x0, t = batch()
        torch.testing.assert_close(selector.select(x0, t), peers.gaussian(x0, torch.Generator().manual_seed(1)))
        torch.testing.assert_close(selector.loss_weights(t), peers.min_snr_weights(snr(t)))
    with pytest.raises(SelectorError, match="unknown 'nope'"):
        NoiseSelector.peer("nope")
    with pytest.raises(SelectorError, match="needs snr"):
        NoiseSelector.peer("min-snr")
    with pytest.raises(SelectorError, match="num_candidates"):
        NoiseSelector.peer("immiscible-knn", num_candidates=0)



def test_peer_takes_the_deprecated_k():
    with pytest.warns(DeprecationWarning, match="use num_candidates"):
        assert NoiseSelector.peer("immiscible-knn", k=5).source.num_candidates == 5
