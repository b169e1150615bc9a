"""NoiseSelector.remote against a real server equals NoiseSelector.local on the same model and seed."""

import pytest
import torch
from support.server import ServerThread, make_repository

from noiserater.client.selector import NoiseSelector, SelectorError
from noiserater.server.config import ServerConfig


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, max_delay_ms=1.0)
    with ServerThread(config) as running:
        yield running


def batches(n, b=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(b, 64, generator=gen) * 2 - 1, torch.randint(0, 100, (b,), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("transport", ["stream", "unary"])
@pytest.mark.parametrize("rule, k", [("argmax", 8), ("sample", 8), ("assign", 1)])
def test_remote_equals_local(server, rater_onnx, rule, k, transport):
    remote = NoiseSelector.remote(server.target, model="digits", dataset="digits", num_candidates=k, rule=rule,
                                  temperature=0.7, seed=3, transport=transport)
    local = NoiseSelector.local(rater_onnx, num_candidates=k, rule=rule, temperature=0.7, seed=3)
    uniform = NoiseSelector.local(rater_onnx, num_candidates=k, rule=rule, seed=3)
    for x0, t in batches(3):
        got, want = remote.select(x0, t), local.select(x0, t)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.shape == x0.shape
    assert remote.counters == {"selections": 3, "fallback_local": 0, "fallback_gaussian": 0, "requests": 3,
                               "served": 3, "outages": 0, "breaker_open": 0, "breaker_trips": 0, "probes": 0}
    assert remote.model_version == 1
    # The choice is not trivially the first candidate (what a Gaussian fallback would return).
    assert not torch.equal(remote.select(*batches(1, seed=9)[0]), uniform.draw_candidates(batches(1)[0][0], k)[:, 0])
    remote.close()


def test_remote_prefetch_and_k_schedule(server, rater_onnx):
    remote = NoiseSelector.remote(server.target, model="digits", num_candidates=8, seed=5)
    local = NoiseSelector.local(rater_onnx, num_candidates=8, seed=5)
    (x0a, ta), (x0b, tb) = batches(2, seed=1)
    remote.prefetch(x0a, ta, num_candidates=4)
    torch.testing.assert_close(remote.select(x0a, ta), local.select(x0a, ta, num_candidates=4), rtol=0, atol=0)
    torch.testing.assert_close(remote.select(x0b, tb, num_candidates=2), local.select(x0b, tb, num_candidates=2),
                               rtol=0, atol=0)
    remote.close()


def test_remote_errors(server):
    with pytest.raises(SelectorError, match="model: the rater server at .* has no model 'nope' .*NOT_FOUND"):
        NoiseSelector.remote(server.target, model="nope", num_candidates=4, timeout_s=2)
    x0, t = batches(1)[0]
    bad = NoiseSelector.remote(server.target, model="digits", num_candidates=4)
    with pytest.raises(SelectorError, match="t: timesteps must lie in"):
        bad.select(x0, t + 1000)
    bad.close()


@pytest.mark.parametrize("rule", ["argmax", "sample"])
def test_remote_equals_local_for_the_same_generator_state(server, rater_onnx, rule):
    """Without a seed the noise follows the generator (global or given), and the call's "sample" seed comes
    from it too: the same generator state gives the same noise in process and on the server."""
    remote = NoiseSelector.remote(server.target, model="digits", num_candidates=8, rule=rule, temperature=0.7,
                                  generator=torch.Generator().manual_seed(21))
    local = NoiseSelector.local(rater_onnx, num_candidates=8, rule=rule, temperature=0.7,
                                generator=torch.Generator().manual_seed(21))
    for x0, t in batches(2, seed=4):
        torch.testing.assert_close(remote.select(x0, t), local.select(x0, t), rtol=0, atol=0)
    x0, t = batches(1, seed=5)[0]
    torch.manual_seed(8)
    default_remote = NoiseSelector.remote(server.target, model="digits", num_candidates=8, rule=rule, temperature=0.7)
    got = default_remote.select(x0, t)
    torch.manual_seed(8)
    torch.testing.assert_close(got, NoiseSelector.local(rater_onnx, num_candidates=8, rule=rule,
                                                     temperature=0.7).select(x0, t), rtol=0, atol=0)
    remote.close()
    default_remote.close()


def test_info_says_what_the_rater_takes(server, rater_onnx):
    with NoiseSelector.remote(server.target, model="digits") as remote:
        assert remote.info.data_shape == (64,) and remote.info.schedule == "linear"
        assert remote.info == NoiseSelector.local(rater_onnx).info
    assert NoiseSelector.peer("uniform").info is None
