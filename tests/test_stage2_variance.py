"""The gradient-variance decomposition (`nrctl bench variance`): the parts add up to the directly estimated
total, a gradient that ignores the noise has no eps part and a ceiling of exactly 1, the parts and the ceiling
match the closed form of a one-parameter toy, and the command trains, saves, reloads and reports."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.stats import norm
from torch import nn
from typer.testing import CliRunner

from noiserater.trainer.bench.variance import GroupMoments, VarianceConfig, measure_variance, stratified_timesteps
from noiserater.trainer.substrate.denoisers import build_denoiser
from noiserater.trainer.substrate.diffusion import make_schedule


class ConstantNet(nn.Module):
    """f(x_t, t) = w, whatever the input: the per-sample loss mean_d (w_d - target_d)^2 has gradient
    2 (w - target) / D."""

    def __init__(self, dim: int, value: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(torch.full((dim,), value))

    def forward(self, x_t, t):
        return self.w.expand_as(x_t)


class ToySchedule:
    """target = mu[t] + x0 + sigma eps (x_t is not used by ConstantNet); sigma = 0 makes it ignore eps."""

    objective = "toy"

    def __init__(self, mu: torch.Tensor, sigma: float):
        self.num_timesteps, self.mu, self.sigma = len(mu), mu, sigma

    def add_noise(self, x0, eps, t):
        return x0 + eps

    def target(self, x0, eps, t):
        return self.mu[t].view(-1, *([1] * (x0.dim() - 1))) + x0 + self.sigma * eps


def test_group_moments_match_a_direct_computation_across_chunks():
    gen = torch.Generator().manual_seed(0)
    values, groups = torch.randn(23, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (23,), generator=gen)
    moments = GroupMoments(3, [1, 3])
    for lo, hi in ((0, 5), (5, 6), (6, 17), (17, 23)):  # uneven chunks, some missing a group
        moments.add([values[lo:hi, :1], values[lo:hi, 1:]], groups[lo:hi])
    means = torch.stack([values[groups == k].mean(0) for k in range(3)])
    for k in range(3):
        mine = values[groups == k]
        assert moments.count[k] == len(mine)
        assert torch.allclose(torch.cat([m[k] for m in moments.means]), mine.mean(0))
        assert math.isclose(moments.m2[k], float((mine - mine.mean(0)).pow(2).sum()), rel_tol=1e-12)
    assert math.isclose(moments.spread_of_means(), float((means - means.mean(0)).pow(2).sum()), rel_tol=1e-12)


def test_timesteps_are_one_per_stratum():
    t = stratified_timesteps(40, 1000, torch.Generator().manual_seed(0))
    assert (t // 25 == torch.arange(40)).all()
    assert (stratified_timesteps(8, 8, torch.Generator()) == torch.arange(8)).all()


@pytest.mark.parametrize("objective", ["eps", "flow"])
def test_parts_add_up_to_the_direct_total(objective):
    torch.manual_seed(0)
    model = build_denoiser((3,), "mlp", num_timesteps=50, hidden=16, depth=1, time_dim=8)
    train = torch.randn(30, 3)
    result = measure_variance(model, make_schedule(50, "linear", objective), train,
                              VarianceConfig(n_t=5, n_x0=3, n_eps=4, buckets=5, k=(1, 2, 8), chunk=5))
    g = result["gradient"]
    assert result["design"]["samples"] == 60 and result["design"]["objective"] == objective
    assert g["t"] + g["x0"] + g["eps"] == pytest.approx(g["total"], rel=1e-12)
    assert g["total"] == pytest.approx(g["total_direct"], rel=1e-7)  # two float64 sums of float32 gradients
    assert sum(g["fractions"].values()) == pytest.approx(1.0)
    assert g["eps"] > 0 and 0 < g["eps_norm_var"] < g["eps"]  # ||g|| varies less than g (triangle inequality)
    ratios = [g["is_noise_k"][k]["ratio"] for k in ("1", "2", "8")]
    assert ratios[0] == pytest.approx(1.0) and ratios[0] < ratios[1] < ratios[2] < g["is_noise"]["ratio"]
    assert [b["timesteps"] for b in result["buckets"]] == [1] * 5
    assert sum(b["eps_share_of_all"] for b in result["buckets"]) == pytest.approx(1.0)
    assert len(result["per_t"]) == 5 and set(result["gradient"]["se"]) >= {"fraction_eps", "ratio"}


def test_a_gradient_that_ignores_the_noise_has_no_eps_part():
    schedule = ToySchedule(torch.linspace(-1, 1, 20), sigma=0.0)
    train = torch.randn(12, 2, generator=torch.Generator().manual_seed(1))
    result = measure_variance(ConstantNet(2, 0.3), schedule, train,
                              VarianceConfig(n_t=4, n_x0=3, n_eps=5, buckets=2, chunk=7))
    g = result["gradient"]
    assert g["eps"] == 0.0 and result["loss"]["eps"] == 0.0
    assert g["eps_norm_var"] == pytest.approx(0.0, abs=1e-15 * g["mean_sq_norm"])  # norms round alike, or nearly
    assert g["t"] > 0 and g["x0"] > 0
    one = pytest.approx(1.0, abs=1e-12)
    assert g["is_noise"]["ratio"] == one and all(v["ratio"] == one for v in g["is_noise_k"].values())
    assert all(b["is_noise_ratio"] == one for b in result["buckets"])


def test_parts_and_ceiling_match_the_closed_form():
    """One parameter: g = 2 (w - mu_t - x0 - sigma eps). Every t is drawn (n_t = T), so all three estimators are
    unbiased; given (x0, t), g is normal and |g| folded normal, whose variance is known."""
    T, sigma, w = 8, 0.5, 0.25
    mu = torch.linspace(-1.5, 1.5, T)
    train = torch.tensor([[-1.0], [-0.5], [0.0], [0.5], [1.0]])
    result = measure_variance(ConstantNet(1, w), ToySchedule(mu, sigma), train,
                              VarianceConfig(n_t=T, n_x0=256, n_eps=16, buckets=2, k=(4,), chunk=4096, seed=1))
    g = result["gradient"]
    # the seed's draws land within 2% here (the spread over seeds is about 5%); the textbook t estimator for
    # independent timesteps would read 8/7 of it
    assert g["t"] == pytest.approx(4 * float(mu.var(unbiased=False)), rel=0.07)
    assert g["x0"] == pytest.approx(4 * float(train.var(unbiased=False)), rel=0.07)
    assert g["eps"] == pytest.approx(4 * sigma**2, rel=0.03)

    def folded_var(m: float, s: float) -> float:  # Var|Z|, Z ~ N(m, s^2)
        mean_abs = s * math.sqrt(2 / math.pi) * math.exp(-m * m / (2 * s * s)) + m * (1 - 2 * norm.cdf(-m / s))
        return m * m + s * s - mean_abs**2

    norm_var = sum(folded_var(2 * (w - float(m) - float(x)), 2 * sigma) for m in mu for x in train) / (T * len(train))
    total = 4 * (float(mu.var(unbiased=False)) + float(train.var(unbiased=False)) + sigma**2)
    assert g["eps_norm_var"] == pytest.approx(norm_var, rel=0.1)
    assert g["is_noise"]["ratio"] == pytest.approx(total / (total - norm_var), rel=0.05)
    assert g["is_noise_k"]["4"]["reduction"] == pytest.approx(0.75 * g["eps_norm_var"])
    assert g["eps_removed"]["ratio"] == pytest.approx(total / (total - 4 * sigma**2), rel=0.05)


def test_cli_trains_saves_reloads_and_reports(tmp_path):
    from noiserater.cli.main import app

    args = ["--dataset", "digits", "--n-t", "4", "--n-x0", "2", "--n-eps", "2", "--buckets", "2", "--k", "2,8"]
    first = CliRunner().invoke(app, ["bench", "variance", *args, "--steps", "3", "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "ceiling of any unbiased noise selection" in first.stdout and "eps | x0, t" in first.stdout
    assert {p.name for p in (tmp_path / "a").iterdir()} == {"variance.json", "variance.md", "denoiser.pt"}
    saved = json.loads((tmp_path / "a" / "variance.json").read_text())
    assert saved["model"]["steps"] == 3 and saved["model"]["objective"] == "eps" and saved["model"]["denoiser"] == "mlp"

    again = CliRunner().invoke(app, ["bench", "variance", *args, "--model-from", str(tmp_path / "a"), "--json",
                                     "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    reloaded = json.loads(again.stdout)
    assert reloaded["gradient"]["total"] == pytest.approx(saved["gradient"]["total"], rel=1e-9)
    assert reloaded["model"]["model_from"] == str(tmp_path / "a") and not (tmp_path / "b" / "denoiser.pt").exists()

    wrong = CliRunner().invoke(app, ["bench", "variance", *args, "--model-from", str(tmp_path / "a"),
                                     "--objective", "flow", "--out", str(tmp_path / "c")])
    assert wrong.exit_code == 1 and "trained for eps" in wrong.output and "Traceback" not in wrong.output
    flow = CliRunner().invoke(app, ["bench", "variance", *args, "--objective", "flow", "--steps", "2", "--json",
                                    "--out", str(tmp_path / "e")])
    assert flow.exit_code == 0, flow.output
    assert json.loads(flow.stdout)["design"]["objective"] == "flow"
    missing = CliRunner().invoke(app, ["bench", "variance", "--model-from", str(tmp_path / "nope"), "--out",
                                       str(tmp_path / "d")])
    assert missing.exit_code == 1 and "no denoiser.pt" in missing.output
