"""Samplers from a given starting noise, counted in function evaluations (NFE: calls of the network).

- eps objective: `ancestral` (DDPM, stochastic; see `diffusion.ddpm_sample`) and `ddim` (DDIM with eta = 0,
  deterministic: the probability-flow update of the VP schedule);
- flow objective: `euler` and `heun` (Heun's second-order method; n steps cost 2n - 1 evaluations, the last
  step being an Euler step onto s = 0, as in EDM).

The deterministic samplers integrate the coupling a method trained on, whatever noise it paired with the data:
a coupling that keeps both marginals still transports N(0, I) to the data law. Both place their few steps on
"trailing" timesteps (the first evaluation at the noisiest timestep T - 1, as diffusers' trailing spacing),
which is what makes 1 to 4 steps usable.

    x = sample(model, schedule, start_noise, nfe=4)                    # the objective's deterministic sampler
    x = sample(model, schedule, start_noise, nfe=8, sampler="heun")
"""

from __future__ import annotations

import math

import torch
from torch import nn

from noiserater.trainer.substrate.diffusion import FlowSchedule, NoiseSchedule, Schedule, ddpm_sample

SAMPLERS = {"eps": ("ddim", "ancestral"), "flow": ("euler", "heun")}
DETERMINISTIC = {"eps": "ddim", "flow": "euler"}


class SamplerError(ValueError):
    """A sampler that does not exist for the objective, or an NFE below 1."""


def check_sampler(objective: str, sampler: str | None) -> str:
    """The sampler's name (the objective's deterministic one when None); an error for another objective's."""
    if objective not in SAMPLERS:
        raise SamplerError(f"unknown objective {objective!r} (one of {', '.join(SAMPLERS)})")
    name = sampler or DETERMINISTIC[objective]
    if name not in SAMPLERS[objective]:
        raise SamplerError(f"sampler {name!r} does not apply to the {objective} objective "
                           f"(one of {', '.join(SAMPLERS[objective])})")
    return name


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` integer timesteps from T - 1 down, evenly spaced and ending one stride above 0."""
    stride = num_timesteps / steps
    return [int(round(num_timesteps - i * stride)) - 1 for i in range(steps)]


def _batched(denoiser: nn.Module, x: torch.Tensor, t: float | int) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, dtype=torch.float32 if isinstance(t, float) else torch.long, device=x.device)
    return denoiser(x, tt)


@torch.no_grad()
def ddim_sample(denoiser: nn.Module, schedule: NoiseSchedule, start: torch.Tensor, nfe: int) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) with `nfe` evaluations; the last step goes to abar = 1 (the predicted x0)."""
    abar_all = schedule.alphas_cumprod.to(device=start.device, dtype=torch.float64)
    ts = trailing_timesteps(schedule.num_timesteps, nfe)
    x = start.to(torch.float64)
    for i, t in enumerate(ts):
        abar = abar_all[t]
        abar_prev = abar_all[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=torch.float64, device=x.device)
        eps_hat = _batched(denoiser, x.float(), t).to(torch.float64)
        x0_hat = (x - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
        x = abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps_hat
    return x.float()


def _flow_levels(schedule: FlowSchedule, steps: int) -> list[float]:
    # Noise levels from s = 1 to s = 0; the network is called at fractional timesteps s T - 1.
    return [1 - i / steps for i in range(steps + 1)]


@torch.no_grad()
def euler_sample(denoiser: nn.Module, schedule: FlowSchedule, start: torch.Tensor, nfe: int) -> torch.Tensor:
    """Euler on dx/ds = v(x, s) from s = 1 to 0 in `nfe` equal steps."""
    levels = _flow_levels(schedule, nfe)
    x = start.to(torch.float64)
    for s, s_next in zip(levels[:-1], levels[1:], strict=True):
        v = _batched(denoiser, x.float(), schedule.timestep_at(s)).to(torch.float64)
        x = x + (s_next - s) * v
    return x.float()


@torch.no_grad()
def heun_sample(denoiser: nn.Module, schedule: FlowSchedule, start: torch.Tensor, nfe: int) -> torch.Tensor:
    """Heun's method with the most steps that fit in `nfe` evaluations (n steps cost 2n - 1)."""
    steps = max(1, (nfe + 1) // 2)
    levels = _flow_levels(schedule, steps)
    x = start.to(torch.float64)
    for s, s_next in zip(levels[:-1], levels[1:], strict=True):
        v = _batched(denoiser, x.float(), schedule.timestep_at(s)).to(torch.float64)
        x_euler = x + (s_next - s) * v
        if s_next > 0:
            v_next = _batched(denoiser, x_euler.float(), schedule.timestep_at(s_next)).to(torch.float64)
            x = x + (s_next - s) * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x.float()


def evaluations(sampler: str, nfe: int, num_timesteps: int) -> int:
    """How many network calls `sample(..., nfe, sampler)` really makes."""
    if sampler == "heun":
        return 2 * max(1, (nfe + 1) // 2) - 1
    if sampler == "ancestral":
        return len(torch.linspace(num_timesteps - 1, 0, min(nfe, num_timesteps)).round().long().unique_consecutive())
    return nfe


def sample(denoiser: nn.Module, schedule: Schedule, start: torch.Tensor, nfe: int, sampler: str | None = None,
           generator: torch.Generator | None = None, chunk: int = 4096) -> torch.Tensor:
    """Samples from the starting noises `start` [N, ...] with `nfe` network evaluations (per sample) of
    `sampler` (default: the objective's deterministic one). `generator` feeds the ancestral sampler's
    per-step noise. Runs in chunks of `chunk` samples; the model is put in eval mode for the call."""
    if nfe < 1 or int(nfe) != nfe:
        raise SamplerError(f"nfe: must be an integer >= 1, got {nfe}")
    name = check_sampler(schedule.objective, sampler)
    was_training = denoiser.training
    denoiser.eval()
    try:
        out = []
        for i in range(0, start.shape[0], chunk):
            part = start[i:i + chunk]
            if name == "ddim":
                out.append(ddim_sample(denoiser, schedule, part, int(nfe)))
            elif name == "ancestral":
                out.append(ddpm_sample(denoiser, schedule, part.shape, generator=generator, device=part.device,
                                       steps=int(nfe), start=part))
            elif name == "euler":
                out.append(euler_sample(denoiser, schedule, part, int(nfe)))
            else:
                out.append(heun_sample(denoiser, schedule, part, int(nfe)))
        return torch.cat(out)
    finally:
        denoiser.train(was_training)


def nfe_sweep(max_nfe: int = 32) -> list[int]:
    """1, 2, 4, ... up to `max_nfe` (powers of two)."""
    return [2 ** i for i in range(int(math.log2(max_nfe)) + 1)]
