"""The coupling peers from outside packages (POT's exact and entropic OT, torchcfm's exact plan) and the
model-aligned rules: they agree with each other and with `immiscible` where they should, their strength
knobs reach both ends, and they keep the noise marginal where they claim to."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from noiserater.client import peers
from noiserater.client.sources import SourceError, make_source
from noiserater.trainer.stage2.training import Stage2Config, source_options
from noiserater.trainer.substrate.diffusion import NoiseSchedule, per_sample_loss

PERMUTING = ("ot", "ot-sinkhorn", "ot-subbatch", "ot-torchcfm", "immiscible")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rows(a: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, a.flatten(1).tolist()))


def test_exact_couplings_of_pot_torchcfm_and_immiscible_are_one_permutation():
    for seed in range(5):
        g = gen(seed)
        x0 = torch.randn(7, 2, 3, generator=g) * 0.7
        noise = torch.randn(7, 2, 3, generator=g)
        pot = peers.ot_permutation(x0, noise)
        assert pot.tolist() == peers.immiscible_permutation(x0, noise).tolist()
        assert sorted(pot.tolist()) == list(range(7))

        sampler = peers.torchcfm_plan_sampler()
        plan = sampler.get_map(noise, x0)  # torchcfm's orientation: [noise, data]
        support = {(int(i), int(j)) for i, j in zip(*np.nonzero(plan), strict=True)}
        assert support == {(int(pot[j]), j) for j in range(7)}
        state = np.random.get_state()  # torchcfm samples its pairs with numpy's global generator
        try:
            np.random.seed(seed)
            noise_idx, data_idx = sampler.sample_map(plan, 32)
        finally:
            np.random.set_state(state)
        assert {(int(i), int(j)) for i, j in zip(noise_idx, data_idx, strict=True)} <= support

    x0 = torch.randn(9, 16, generator=gen(10))
    expected = make_source("immiscible", generator=gen(3)).sample(x0, None, 0)
    for name in ("ot", "ot-torchcfm"):
        torch.testing.assert_close(make_source(name, generator=gen(3)).sample(x0, None, 0), expected, rtol=0, atol=0)


def test_permuting_sources_keep_the_drawn_noise_multiset():
    x0 = torch.randn(12, 3, 4, 4, generator=gen(0)) * 0.5
    drawn = rows(peers.gaussian(x0, gen(5)))
    options = {"ot_subbatch": 5, "ot_reg": 0.05}
    for name in PERMUTING:
        eps = make_source(name, generator=gen(5), **options).sample(x0, None, 0)
        assert eps.shape == x0.shape and eps.dtype == x0.dtype
        assert rows(eps) == drawn, name
    for reg in (0.0, 1e-3, 1.0, 1e6):
        assert rows(peers.ot_sinkhorn(x0, gen(5), reg)) == drawn


def mean_paired_sq_distance(sample, batches: int = 60, b: int = 16, d: int = 8) -> float:
    g = gen(123)
    total = 0.0
    for _ in range(batches):
        x0 = torch.randn(b, d, generator=g) * 0.8 + 0.3
        total += float((sample(x0) - x0).pow(2).sum(1).mean())
    return total / batches


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")  # POT's note at the tiny reg; the pairing is exact
def test_sinkhorn_runs_from_exact_ot_to_independent_noise():
    for seed in range(4):
        x0 = torch.randn(8, 6, generator=gen(100 + seed))
        exact = peers.ot_exact(x0, gen(seed))
        torch.testing.assert_close(peers.ot_sinkhorn(x0, gen(seed), 1e-4), exact, rtol=0, atol=0)
        torch.testing.assert_close(peers.ot_sinkhorn(x0, gen(seed), 0.0), exact, rtol=0, atol=0)

    g = gen(7)
    independent = mean_paired_sq_distance(lambda x0: peers.gaussian(x0, g))
    g = gen(7)
    exact = mean_paired_sq_distance(lambda x0: peers.ot_exact(x0, g))
    g = gen(7)
    mid = mean_paired_sq_distance(lambda x0: peers.ot_sinkhorn(x0, g, 0.05))
    g = gen(7)
    huge = mean_paired_sq_distance(lambda x0: peers.ot_sinkhorn(x0, g, 1e6))
    gap = independent - exact
    assert gap > 1.0  # the coupling moves the pairing measurably at this size
    assert exact < mid < independent
    assert abs(huge - independent) < 0.1 * gap


def test_subbatch_runs_from_independent_noise_to_exact_ot():
    x0 = torch.randn(10, 5, generator=gen(1))
    exact = peers.ot_exact(x0, gen(4))
    for size in (0, 10, 64):
        torch.testing.assert_close(peers.ot_subbatch(x0, gen(4), size), exact, rtol=0, atol=0)
    torch.testing.assert_close(peers.ot_subbatch(x0, gen(4), 1), peers.gaussian(x0, gen(4)), rtol=0, atol=0)
    eps = peers.ot_subbatch(x0, gen(4), 4)
    noise = peers.gaussian(x0, gen(4))
    for start in (0, 4, 8):  # exact OT within each sub-batch, the last one short
        chunk = slice(start, start + 4)
        torch.testing.assert_close(eps[chunk], noise[chunk][peers.ot_permutation(x0[chunk], noise[chunk])])


class ToyDenoiser(nn.Module):
    """A fixed linear map of x_t, plus a learned-looking offset per timestep."""

    def __init__(self, d: int, num_timesteps: int):
        super().__init__()
        self.linear = nn.Linear(d, d)
        self.offset = nn.Embedding(num_timesteps, d)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(x_t) + self.offset(t)


def toy_options(k: int = 5, b: int = 6, d: int = 4):
    torch.manual_seed(0)
    schedule = NoiseSchedule(50)
    model = ToyDenoiser(d, 50)
    options = source_options(Stage2Config(k=k), 3, torch.device("cpu"), schedule, model=model)
    x0, t = torch.randn(b, d, generator=gen(9)), torch.randint(0, 50, (b,), generator=gen(9))
    return options, schedule, model, x0, t


def test_model_aligned_keeps_the_candidate_of_least_loss():
    options, schedule, model, x0, t = toy_options()
    start = options["generator"].get_state()
    eps = make_source("model-aligned", **options).sample(x0, t, 0)

    replay = torch.Generator().set_state(start)
    candidates = torch.randn((6, 5, 4), generator=replay)
    for i in range(6):
        with torch.no_grad():
            losses = [float(per_sample_loss(model, schedule, x0[i:i + 1], t[i:i + 1], candidates[i, j:j + 1]))
                      for j in range(5)]
        torch.testing.assert_close(eps[i], candidates[i, int(np.argmin(losses))])
    assert not options["loss_fn"](x0, t, eps).requires_grad  # the training step's graph stays clean


def test_model_aligned_assign_is_the_permutation_of_least_summed_loss():
    options, schedule, model, x0, t = toy_options()
    start = options["generator"].get_state()
    eps = make_source("model-aligned-assign", **options).sample(x0, t, 0)

    noise = peers.gaussian(x0, torch.Generator().set_state(start))
    with torch.no_grad():
        cost = [[float(per_sample_loss(model, schedule, x0[i:i + 1], t[i:i + 1], noise[j:j + 1])) for j in range(6)]
                for i in range(6)]
    best = min(itertools.permutations(range(6)), key=lambda p: sum(cost[i][p[i]] for i in range(6)))
    torch.testing.assert_close(eps, noise[list(best)])
    assert rows(eps) == rows(noise)


def test_model_aligned_pairs_in_several_calls_give_the_same_losses(monkeypatch):
    options, _, _, x0, t = toy_options(b=6)
    noise = torch.randn(6, 4, generator=gen(2))
    whole = peers.pair_losses(x0, t, noise, options["loss_fn"])
    monkeypatch.setattr(peers, "PAIRS_PER_CALL", 7)  # one row of 6 pairs per call
    torch.testing.assert_close(peers.pair_losses(x0, t, noise, options["loss_fn"]), whole)


def test_sources_refuse_bad_knobs_and_a_missing_loss_fn():
    with pytest.raises(SourceError, match="needs loss_fn"):
        make_source("model-aligned", generator=gen(0))
    with pytest.raises(SourceError, match="needs loss_fn"):
        make_source("model-aligned-assign", generator=gen(0), loss_fn=None)
    with pytest.raises(SourceError, match="ot_reg"):
        make_source("ot-sinkhorn", generator=gen(0), ot_reg=-1.0)
    with pytest.raises(SourceError, match="ot_subbatch"):
        make_source("ot-subbatch", generator=gen(0), ot_subbatch=-2)


def test_stage2_passes_the_knobs_to_the_sources():
    cfg = Stage2Config(ot_reg=0.3, ot_subbatch=4)
    options = source_options(cfg, 0, torch.device("cpu"), NoiseSchedule(10))
    assert make_source("ot-sinkhorn", **options).reg == 0.3
    assert make_source("ot-subbatch", **options).size == 4
    assert options["model"] is None and options["loss_fn"] is None


def test_nrctl_bench_train_takes_the_coupling_knobs(tmp_path):
    from noiserater.cli.main import app

    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "train", "--methods", "ot-subbatch,model-aligned", "--ot-subbatch",
                                      "1", "--ot-reg", "0.2", "--k", "2", "--seeds", "1", "--steps", "2",
                                      "--batch-size", "8", "--no-quality", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["uniform", "ot-subbatch", "model-aligned"]
    # sub-batches of one: the uniform run's very noise, so the same cosine with x0
    assert report["ot-subbatch"]["noise_cosine_with_x0"] == report["uniform"]["noise_cosine_with_x0"]
    config = json.loads((out / "details.json").read_text())["config"]
    assert config["ot_reg"] == 0.2 and config["ot_subbatch"] == 1
    assert "ot-subbatch sub-batches of 1." in (out / "report.md").read_text()
