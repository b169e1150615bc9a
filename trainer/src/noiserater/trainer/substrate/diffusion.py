"""The diffusion substrate: the two training objectives, their per-sample loss and ancestral sampling.

- `eps` (`NoiseSchedule`): a variance-preserving DDPM schedule, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
  and the network predicts eps.
- `flow` (`FlowSchedule`): the rectified-flow linear interpolant x_t = (1 - s) x0 + s eps with
  s = (t + 1) / T, and the network predicts the velocity eps - x0 (the convention of SD3 and Flux: s = 1 is pure
  noise, sampling integrates from s = 1 down to s = 0).

Both use integer timesteps t in [0, T) for training, so the rater, its ONNX interface and the server are the
same for both; the deterministic samplers (`substrate.samplers`) also call the network at fractional t.
Schedules are a separate, swappable piece (as in diffusers): `add_noise(x0, eps, t)` accepts any noise,
which is what lets stage 2 train on selected rather than Gaussian noise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULE_KINDS = ("linear", "cosine")
OBJECTIVES = ("eps", "flow")
FLOW_KINDS = ("linear",)  # the linear (rectified-flow) interpolant


def _linear_betas(num_timesteps: int) -> torch.Tensor:
    # DDPM's 1e-4 .. 2e-2 over 1000 steps, rescaled so shorter schedules cover the same noise range.
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 2e-2, num_timesteps, dtype=torch.float64)


def _cosine_betas(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)


def timestep_embedding(t: torch.Tensor, dim: int, num_timesteps: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, scaled so t spans [0, 1000) whatever T is."""
    half = dim // 2
    scaled = t.to(torch.float32) * (1000.0 / num_timesteps)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
    angles = scaled[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class NoiseSchedule:
    """A variance-preserving schedule: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t in [0, T); the network
    predicts eps."""

    objective = "eps"

    def __init__(self, num_timesteps: int = 1000, kind: str = "linear"):
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule {kind!r} (one of {', '.join(SCHEDULE_KINDS)})")
        if num_timesteps < 1:
            raise ValueError("num_timesteps must be >= 1")
        self.num_timesteps = int(num_timesteps)
        self.kind = kind
        betas64 = _linear_betas(num_timesteps) if kind == "linear" else _cosine_betas(num_timesteps)
        self.betas = betas64.to(torch.float32)
        self.alphas_cumprod = torch.cumprod(1 - betas64, dim=0).to(torch.float32)

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, kind={self.kind!r})"

    def to(self, device) -> NoiseSchedule:
        self.betas = self.betas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(like.device)[t.to(like.device)].to(like.dtype)
        return abar.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network predicts: the noise."""
        return eps

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1 - abar)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator,
                          device=generator.device if generator is not None else "cpu")
        return t.to(device) if device is not None else t


class FlowSchedule:
    """The rectified-flow linear interpolant x_t = (1 - s) x0 + s eps, s = (t + 1) / T for t in [0, T) (t may
    be fractional when sampling); the network predicts the velocity dx_t/ds = eps - x0."""

    objective = "flow"

    def __init__(self, num_timesteps: int = 1000, kind: str = "linear"):
        if kind not in FLOW_KINDS:
            raise ValueError(f"unknown flow interpolant {kind!r} (one of {', '.join(FLOW_KINDS)})")
        if num_timesteps < 1:
            raise ValueError("num_timesteps must be >= 1")
        self.num_timesteps = int(num_timesteps)
        self.kind = kind

    def __repr__(self) -> str:
        return f"FlowSchedule(num_timesteps={self.num_timesteps}, kind={self.kind!r})"

    def to(self, device) -> FlowSchedule:
        return self

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """s(t) = (t + 1) / T: 1 is pure noise."""
        return (t.to(torch.float64) + 1) / self.num_timesteps

    def timestep_at(self, s: float) -> float:
        """The (fractional) timestep of noise level s, the inverse of `noise_level`."""
        return s * self.num_timesteps - 1

    def _s(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.noise_level(t.to(like.device)).to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._s(t, x0)
        return (1 - s) * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps - x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        s = self.noise_level(t).to(torch.float32)
        return ((1 - s) / s) ** 2

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator,
                          device=generator.device if generator is not None else "cpu")
        return t.to(device) if device is not None else t


Schedule = NoiseSchedule | FlowSchedule


def make_schedule(num_timesteps: int = 1000, kind: str = "linear", objective: str = "eps") -> Schedule:
    """The schedule of `objective`: 'eps' (VP DDPM, kind linear|cosine) or 'flow' (kind linear)."""
    if objective == "eps":
        return NoiseSchedule(num_timesteps, kind)
    if objective == "flow":
        return FlowSchedule(num_timesteps, kind)
    raise ValueError(f"unknown objective {objective!r} (one of {', '.join(OBJECTIVES)})")


def per_sample_loss(denoiser: nn.Module, schedule: Schedule, x0: torch.Tensor, t: torch.Tensor,
                    eps: torch.Tensor) -> torch.Tensor:
    """[B] MSE against the objective's target (eps, or the velocity), averaged over each sample's dimensions."""
    x_t = schedule.add_noise(x0, eps, t)
    return (denoiser(x_t, t) - schedule.target(x0, eps, t)).pow(2).flatten(1).mean(dim=1)


@torch.no_grad()
def ddpm_sample(denoiser: nn.Module, schedule: NoiseSchedule, shape, generator: torch.Generator | None = None,
                device=None, steps: int | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestral sampling from N(0, I). `steps` < T samples on an evenly strided sub-sequence of timesteps
    (DDPM with respaced betas); None uses every timestep. `start` is the starting noise (drawn from
    `generator` when None); the per-step noise always comes from `generator`."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    T = schedule.num_timesteps
    steps = T if steps is None else max(1, min(int(steps), T))
    ts = torch.linspace(T - 1, 0, steps).round().long().unique_consecutive().tolist()
    abar_all = schedule.alphas_cumprod.to(device=device, dtype=torch.float64)
    gen_device = generator.device if generator is not None else "cpu"
    if start is None:
        x = torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
    else:
        x = start.to(device)
    for i, t in enumerate(ts):
        abar = abar_all[t]
        abar_prev = abar_all[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64, device=device)
        beta = 1 - abar / abar_prev
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        eps_hat = denoiser(x, tt)
        mean = (x - (beta / (1 - abar).sqrt()).float() * eps_hat) / (1 - beta).sqrt().float()
        if i + 1 < len(ts):
            var = beta * (1 - abar_prev) / (1 - abar)
            z = torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
            x = mean + var.sqrt().float() * z
        else:
            x = mean
    return x
