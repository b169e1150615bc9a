"""Stage 2 through a selector that prefetches the next minibatch's selection trains exactly as without
prefetch: the same noise, minibatches, timesteps and weights, for every rater rule and a K schedule, remote
(prefetched by default) and in-process (prefetched with prefetch="all")."""

from __future__ import annotations

import pytest
import torch
from support.server import ServerThread, make_repository

from noiserater.client.selector import NoiseSelector
from noiserater.server.config import ServerConfig
from noiserater.trainer.stage2.sources import Stage2Error, prefetch_allowed
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


def run(digits, selector: NoiseSelector, method: str, prefetch: str):
    """One stage-2 run through `selector` (closed after it); (result, the prefetch calls, its counters)."""
    calls = []
    original = selector.prefetch
    selector.prefetch = lambda x0, t, **kw: (calls.append(kw), original(x0, t, **kw))[1]
    with selector:
        result = train_stage2(digits, method, STEPS, seed=1, selector=selector, keep_model=True,
                              config=Stage2Config(**TINY, prefetch=prefetch))
        return result, calls, selector.counters


def assert_same_training(ahead, plain) -> None:
    assert ahead.curve_val_loss == plain.curve_val_loss
    for name in ("val_loss", "test_loss", "train_loss_selected", "noise_sq_norm_per_dim", "noise_cosine_with_x0"):
        assert ahead.metrics[name] == plain.metrics[name], name
    for a, b in zip(ahead.denoiser.parameters(), plain.denoiser.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def expected_calls(method: str) -> list[dict]:
    # The K schedule goes 4, 3, 2, 1, 1, 1 over 6 steps: steps 1 and 2 are prefetched with their own K; the
    # steps where K is 1 draw plain Gaussian noise and need no selection.
    if method == "rater-kanneal":
        return [{"num_candidates": k} for k in (3, 2)]
    return [{"num_candidates": None}] * (STEPS - 1)


@pytest.mark.parametrize("method, rule", [("rater-argmax", "argmax"), ("rater-sample", "sample"),
                                          ("rater-assign", "assign"), ("rater-kanneal", "argmax")])
def test_a_prefetching_remote_run_equals_one_without_prefetch(digits, server, method, rule):
    def remote():
        return NoiseSelector.remote(server.target, model="digits", num_candidates=4, rule=rule, temperature=0.7,
                                    seed=3)

    plain, plain_calls, plain_counts = run(digits, remote(), method, prefetch="off")
    ahead, ahead_calls, ahead_counts = run(digits, remote(), method, prefetch="remote")
    assert plain_calls == [] and ahead_calls == expected_calls(method)
    assert_same_training(ahead, plain)
    assert ahead_counts["served"] == plain_counts["served"] > 0
    assert ahead_counts["fallback_local"] == ahead_counts["fallback_gaussian"] == 0


@pytest.mark.parametrize("method, rule", [("rater-sample", "sample"), ("rater-kanneal", "argmax")])
def test_an_in_process_rater_prefetches_only_when_asked_and_trains_the_same(digits, rater_onnx, method, rule):
    def local():
        return NoiseSelector.local(rater_onnx, num_candidates=4, rule=rule, temperature=0.7, seed=3,
                                   intra_op_threads=1)

    plain, plain_calls, _ = run(digits, local(), method, prefetch="remote")
    ahead, ahead_calls, _ = run(digits, local(), method, prefetch="all")
    assert plain_calls == [] and ahead_calls == expected_calls(method)
    assert_same_training(ahead, plain)


def test_only_a_selector_with_its_own_stream_prefetches(server, rater_onnx, digits):
    with NoiseSelector.remote(server.target, model="digits", seed=0) as seeded:
        assert prefetch_allowed(seeded) and not prefetch_allowed(seeded, "off")
    with NoiseSelector.remote(server.target, model="digits") as global_stream:
        # torch's global generator: the training step's own random ops could interleave with its draws
        assert not prefetch_allowed(global_stream, "all")
    with NoiseSelector.remote(server.target, model="digits", generator=torch.Generator().manual_seed(0)) as own:
        assert prefetch_allowed(own)
    with NoiseSelector.local(rater_onnx, seed=0) as local:
        assert not prefetch_allowed(local) and prefetch_allowed(local, "all")
    assert not prefetch_allowed(None, "all")  # a source without a selector
    with pytest.raises(Stage2Error, match="prefetch: 'sometimes' is not one of remote, all, off"):
        train_stage2(digits, "uniform", 1, seed=0, config=Stage2Config(**TINY, prefetch="sometimes"))
