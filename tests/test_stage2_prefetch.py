"""Stage 2 through a remote selector that prefetches the next minibatch's selection trains exactly as without
prefetch: the same noise, minibatches, timesteps and weights, for every rater rule and a K schedule."""

from __future__ import annotations

import pytest
import torch
from support.server import ServerThread, make_repository

from noiserater.client.selector import NoiseSelector
from noiserater.server.config import ServerConfig
from noiserater.trainer.stage2.sources import prefetch_pays
from noiserater.trainer.stage2.training import Stage2Config, train_stage2
from noiserater.trainer.substrate.data import load_dataset

TINY = dict(batch_size=16, num_timesteps=100, eval_every=2, eval_repeats=1, quality=False, k=4,
            kanneal_end=0.5, denoiser_kwargs={"hidden": 32, "depth": 1, "time_dim": 16})
STEPS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("prefetch") / "repo", {"digits": [rater_onnx]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")) as thread:
        yield thread


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def run(digits, server, method: str, rule: str, prefetch: bool):
    """One stage-2 run through a fresh remote selector; (result, prefetch calls, counters)."""
    selector = NoiseSelector.remote(server.target, model="digits", num_candidates=4, rule=rule, temperature=0.7,
                                    seed=3)
    calls = []
    original = selector.prefetch
    selector.prefetch = lambda x0, t, **kw: (calls.append(kw), original(x0, t, **kw))[1]
    with selector:
        result = train_stage2(digits, method, STEPS, seed=1, selector=selector, keep_model=True,
                              config=Stage2Config(**TINY, prefetch=prefetch))
        return result, calls, selector.counters


@pytest.mark.parametrize("method, rule", [("rater-argmax", "argmax"), ("rater-sample", "sample"),
                                          ("rater-assign", "assign"), ("rater-kanneal", "argmax")])
def test_a_prefetching_remote_run_equals_one_without_prefetch(digits, server, method, rule):
    plain, plain_calls, plain_counts = run(digits, server, method, rule, prefetch=False)
    ahead, ahead_calls, ahead_counts = run(digits, server, method, rule, prefetch=True)
    assert plain_calls == []
    # The K schedule goes 4, 3, 2, 1, 1, 1 over 6 steps: steps 1 and 2 are prefetched with their own K; the
    # steps where K is 1 draw plain Gaussian noise and need no selection.
    expected = [{"num_candidates": k} for k in (3, 2)] if method == "rater-kanneal" else \
        [{"num_candidates": None}] * (STEPS - 1)
    assert ahead_calls == expected
    assert ahead.curve_val_loss == plain.curve_val_loss
    for name in ("val_loss", "test_loss", "train_loss_selected", "noise_sq_norm_per_dim", "noise_cosine_with_x0"):
        assert ahead.metrics[name] == plain.metrics[name], name
    for a, b in zip(ahead.denoiser.parameters(), plain.denoiser.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ahead_counts["served"] == plain_counts["served"] > 0
    assert ahead_counts["fallback_local"] == ahead_counts["fallback_gaussian"] == 0


def test_only_a_remote_selector_with_its_own_stream_prefetches(server, rater_onnx):
    with NoiseSelector.remote(server.target, model="digits", seed=0) as seeded:
        assert prefetch_pays(seeded)
    with NoiseSelector.remote(server.target, model="digits") as global_stream:
        assert not prefetch_pays(global_stream)  # torch's global generator: the model's own draws could interleave
    with NoiseSelector.remote(server.target, model="digits", generator=torch.Generator().manual_seed(0)) as own:
        assert prefetch_pays(own)
    with NoiseSelector.local(rater_onnx, seed=0) as local:
        assert not prefetch_pays(local)
