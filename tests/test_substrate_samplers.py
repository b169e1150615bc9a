"""The samplers against closed forms: for Gaussian data N(mu, Sigma) the exact eps and velocity fields are
known, and every sampler driven by them must reproduce the data law's mean and covariance."""

import pytest
import torch
from torch import nn

from noiserater.trainer.substrate.diffusion import FlowSchedule, NoiseSchedule, make_schedule, per_sample_loss
from noiserater.trainer.substrate.samplers import SamplerError, check_sampler, evaluations, sample, trailing_timesteps

MU = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
_A = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [-0.3, 0.2, 0.4]], dtype=torch.float64)
SIGMA = _A @ _A.T + 0.05 * torch.eye(3, dtype=torch.float64)


class ExactEps(nn.Module):
    """E[eps | x_t] for x0 ~ N(MU, SIGMA) under the VP schedule (t integer)."""

    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.abar = schedule.alphas_cumprod.to(torch.float64)

    def forward(self, x, t):
        out = []
        for xi, ti in zip(x.to(torch.float64), t.long(), strict=True):
            a = self.abar[ti]
            cov = a * SIGMA + (1 - a) * torch.eye(3, dtype=torch.float64)
            out.append((1 - a).sqrt() * torch.linalg.solve(cov, xi - a.sqrt() * MU))
        return torch.stack(out).float()


class ExactVelocity(nn.Module):
    """E[eps - x0 | x_s] for x0 ~ N(MU, SIGMA) under the linear interpolant (t fractional)."""

    def __init__(self, schedule: FlowSchedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t):
        s = self.schedule.noise_level(t.to(torch.float64))[0]  # one level per call in the samplers
        cov = (1 - s) ** 2 * SIGMA + s ** 2 * torch.eye(3, dtype=torch.float64)
        r = x.to(torch.float64) - (1 - s) * MU
        solved = torch.linalg.solve(cov, r.T).T
        x0 = MU + (1 - s) * solved @ SIGMA
        eps = s * solved
        return (eps - x0).float()


def _moments(x):
    x = x.to(torch.float64)
    return x.mean(0), torch.cov(x.T)


def _start(n=20000):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("nfe", [100])
def test_ddim_with_the_exact_eps_reproduces_the_gaussian(nfe):
    schedule = NoiseSchedule(1000)
    x = sample(ExactEpsBatched(schedule), schedule, _start(), nfe=nfe)
    mean, cov = _moments(x)
    assert torch.allclose(mean, MU, atol=0.04)
    assert torch.allclose(cov, SIGMA, atol=0.06)


def test_ancestral_with_the_exact_eps_reproduces_the_gaussian():
    schedule = NoiseSchedule(100)
    x = sample(ExactEpsBatched(schedule), schedule, _start(), nfe=100, sampler="ancestral",
               generator=torch.Generator().manual_seed(1))
    mean, cov = _moments(x)
    assert torch.allclose(mean, MU, atol=0.05)
    assert torch.allclose(cov, SIGMA, atol=0.08)


@pytest.mark.parametrize("sampler,nfe", [("euler", 100), ("heun", 21)])
def test_flow_samplers_with_the_exact_velocity_reproduce_the_gaussian(sampler, nfe):
    schedule = FlowSchedule(1000)
    x = sample(ExactVelocity(schedule), schedule, _start(), nfe=nfe, sampler=sampler)
    mean, cov = _moments(x)
    assert torch.allclose(mean, MU, atol=0.04)
    assert torch.allclose(cov, SIGMA, atol=0.06)


def test_one_euler_step_is_far_and_heun_beats_euler_at_equal_evaluations():
    """A check that the closed-form tests can fail: one Euler step from s = 1 lands on the mean's
    neighbourhood with the wrong spread, and at 9 evaluations Heun is closer to the law than Euler."""
    schedule = FlowSchedule(1000)
    field = ExactVelocity(schedule)
    one = _moments(sample(field, schedule, _start(), nfe=1))[1]
    assert (one - SIGMA).abs().max() > 0.2
    err = {name: (_moments(sample(field, schedule, _start(), nfe=9, sampler=name))[1] - SIGMA).abs().max()
           for name in ("euler", "heun")}
    assert err["heun"] < err["euler"]


class ExactEpsBatched(ExactEps):
    def forward(self, x, t):  # the samplers call with one timestep for the whole batch
        a = self.abar[t.long()[0]]
        cov = a * SIGMA + (1 - a) * torch.eye(3, dtype=torch.float64)
        return ((1 - a).sqrt() * torch.linalg.solve(cov, (x.to(torch.float64) - a.sqrt() * MU).T).T).float()


def test_batched_exact_eps_equals_the_per_sample_one():
    schedule = NoiseSchedule(1000)
    x, t = torch.randn(5, 3), torch.full((5,), 321)
    assert torch.allclose(ExactEps(schedule)(x, t), ExactEpsBatched(schedule)(x, t), atol=1e-6)


def test_flow_interpolant_target_and_loss():
    schedule = make_schedule(1000, "linear", "flow")
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0, 499, 998, 999])
    s = (t.double() + 1) / 1000
    assert torch.allclose(schedule.add_noise(x0, eps, t), ((1 - s)[:, None] * x0 + s[:, None] * eps).float())
    assert torch.equal(schedule.add_noise(x0, eps, torch.tensor([999]).expand(4)), eps)
    assert torch.equal(schedule.target(x0, eps, t), eps - x0)

    class Oracle(nn.Module):  # knows x0 and eps: predicts the velocity exactly
        def forward(self, x_t, tt):
            return eps - x0

    assert torch.allclose(per_sample_loss(Oracle(), schedule, x0, t, eps), torch.zeros(4))
    assert schedule.timestep_at(float(schedule.noise_level(torch.tensor(37)))) == pytest.approx(37)


def test_sampler_names_steps_and_evaluations():
    assert check_sampler("eps", None) == "ddim" and check_sampler("flow", None) == "euler"
    with pytest.raises(SamplerError, match="does not apply to the flow objective"):
        check_sampler("flow", "ddim")
    with pytest.raises(SamplerError, match="nfe"):
        sample(nn.Identity(), FlowSchedule(10), torch.zeros(1, 3), nfe=0)
    with pytest.raises(ValueError, match="unknown objective"):
        make_schedule(10, "linear", "score")
    assert trailing_timesteps(1000, 1) == [999]
    assert trailing_timesteps(1000, 4) == [999, 749, 499, 249]
    assert evaluations("heun", 8, 1000) == 7 and evaluations("euler", 8, 1000) == 8


def test_sampling_is_a_function_of_the_starting_noise():
    net = nn.Linear(3, 3)
    wrapped = lambda x, t: net(x)  # noqa: E731

    class Net(nn.Module):
        def forward(self, x, t):
            return wrapped(x, t)

    schedule = NoiseSchedule(100)
    start = _start(16)
    a = sample(Net(), schedule, start, nfe=4)
    b = sample(Net(), schedule, start.clone(), nfe=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(Net(), schedule, _start(16) + 1, nfe=4))
