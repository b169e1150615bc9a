"""One selection plan, three places that run it: the in-process selector, the rater server and stage 2 choose
the same candidates, bit for bit, for every rule (`sample` included: same seed, same draw)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.server import ServerThread, make_repository

from noiserater.client.backends import LocalBackend
from noiserater.client.selector import NoiseSelector
from noiserater.core import codec
from noiserater.core.selection import Rule, SelectionPlan
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.server.config import ServerConfig
from noiserater.trainer.stage2 import variants
from noiserater.trainer.stage2.training import build_source

TEMPERATURE = 0.7  # not a float32 value: the wire carries the double the client holds
K = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("parity") / "repo", {"digits": [rater_onnx]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")) as thread:
        yield thread


def arrays(plan: SelectionPlan, seed: int = 0):
    rng = np.random.default_rng(seed)
    batch = 12
    return (rng.standard_normal((batch, 64)).astype(np.float32), rng.integers(0, 100, batch).astype(np.int64),
            rng.standard_normal((batch, plan.num_candidates, 64)).astype(np.float32))


PLANS = [SelectionPlan(K, keep=1, rule=Rule.TOP_K), SelectionPlan(K, keep=3, rule=Rule.TOP_K),
         SelectionPlan(K, keep=1, rule=Rule.SAMPLE, temperature=TEMPERATURE),
         SelectionPlan(K, keep=2, rule=Rule.SAMPLE, temperature=TEMPERATURE),
         SelectionPlan(1, keep=1, rule=Rule.ASSIGN)]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.rule.value}-keep{p.keep}")
def test_the_same_plan_chooses_the_same_indices_in_process_and_on_the_server(server, rater_onnx, plan):
    local = LocalBackend(rater_onnx)
    with NoiseSelector.remote(server.target, model="digits", transport="unary") as remote:
        for seed in (0, 1, 2**40 + 3):
            x0, t, candidates = arrays(plan, seed % 97)
            want, _ = plan.select(local.session.score, local.session.info, x0, t, candidates, seed)
            got = remote.backend.choose(plan, x0, t, candidates, seed)
            np.testing.assert_array_equal(got, want)
            assert got.shape == (x0.shape[0], plan.keep)


@pytest.mark.parametrize("rule", ["argmax", "sample", "assign"])
def test_stage2_the_local_and_the_remote_selector_give_identical_noise(server, rater_onnx, rule):
    """Stage 2's rater source (its own in-process selector), NoiseSelector.local and NoiseSelector.remote with
    the same seed draw the same candidates and keep the same ones, step after step (atol 0)."""
    seed = 11
    options = dict(generator=torch.Generator().manual_seed(5), rater=rater_onnx, num_candidates=K,
                   temperature=TEMPERATURE, seed=seed, threads=1)
    stage2 = build_source(f"rater-{rule}", options)
    local = NoiseSelector.local(rater_onnx, num_candidates=K, rule=rule, temperature=TEMPERATURE, seed=seed)
    remote = NoiseSelector.remote(server.target, model="digits", num_candidates=K, rule=rule,
                                  temperature=TEMPERATURE, seed=seed)
    with local, remote:
        gen = torch.Generator().manual_seed(3)
        for step in range(3):
            x0 = torch.randn(16, 64, generator=gen)
            t = torch.randint(0, 100, (16,), generator=gen)
            want = stage2.sample(x0, t, step)
            torch.testing.assert_close(local.select(x0, t), want, rtol=0, atol=0)
            torch.testing.assert_close(remote.select(x0, t), want, rtol=0, atol=0)
        assert remote.counters["fallback_gaussian"] == remote.counters["fallback_local"] == 0


def test_stage2_importance_weighted_sampling_chooses_what_the_server_chooses(server, rater_onnx):
    """The importance-weighted variant scores and chooses in stage 2 itself; the server, given its candidates
    and the call's seed, keeps the same ones."""
    options = dict(generator=torch.Generator().manual_seed(9), rater=rater_onnx, num_candidates=K,
                   temperature=TEMPERATURE, seed=0, threads=1)
    source = build_source("rater-sample", options, wrappers=[variants.importance_weighted()])
    replay = torch.Generator().manual_seed(9)  # the same stream the source draws its candidates from
    plan = SelectionPlan(K, keep=1, rule=Rule.SAMPLE, temperature=TEMPERATURE)
    with NoiseSelector.remote(server.target, model="digits", transport="unary") as remote:
        for call in range(1, 4):
            x0, t = torch.randn(10, 64), torch.randint(0, 100, (10,))
            eps = source.sample(x0, t, call - 1)
            candidates = torch.randn((10, K, 64), generator=replay)
            request = pb.SelectNoiseRequest(model=pb.ModelRef(name="digits"), x0=codec.encode(x0.numpy()),
                                            t=codec.encode(t.numpy()), candidates=codec.encode(candidates.numpy()),
                                            keep=plan.keep, rule=plan.rule.to_proto(), temperature=plan.temperature,
                                            seed=call)
            assert pb.SelectNoiseRequest.FromString(request.SerializeToString()).temperature == TEMPERATURE
            response = remote.backend.channel.stub.SelectNoise(request, timeout=30)
            chosen = np.array(codec.decode(response.indices))[:, 0]
            torch.testing.assert_close(eps, candidates[torch.arange(10), torch.from_numpy(chosen)], rtol=0, atol=0)
