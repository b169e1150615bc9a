"""Proxy denoisers eps_hat = f(x_t, t): an MLP for vector data and a small UNet for images.

Both are plain modules without buffers, so `torch.func.functional_call` and double backward work through
them (no attention at all, hence no fused SDPA kernels in the differentiated path).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noiserater.trainer.substrate.diffusion import timestep_embedding

DENOISER_KINDS = ("auto", "mlp", "unet")


class TimeConditioned(nn.Module):
    """A network of (data, timestep): keeps the data shape, the timestep count and the embedding width, and
    checks that image networks get (C, H, W) data."""

    def __init__(self, data_shape: tuple[int, ...], num_timesteps: int, time_dim: int, image: bool = False):
        super().__init__()
        if image and len(data_shape) != 3:
            raise ValueError(f"{type(self).__name__} needs image data (C, H, W), got shape {tuple(data_shape)}")
        self.data_shape = tuple(data_shape)
        self.num_timesteps = num_timesteps
        self.time_dim = time_dim


class MLPDenoiser(TimeConditioned):
    """Residual MLP over the flattened x_t with a sinusoidal timestep embedding added in every block."""

    def __init__(self, data_shape: tuple[int, ...], num_timesteps: int = 1000, hidden: int = 256, depth: int = 3,
                 time_dim: int = 64):
        super().__init__(data_shape, num_timesteps, time_dim)
        dim = math.prod(self.data_shape)
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.time_dim, self.num_timesteps).to(x_t.dtype))
        h = self.inp(x_t.flatten(1))
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h).view_as(x_t)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(groups, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(math.gcd(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SmallUNet(TimeConditioned):
    """Two resolutions (full, half) with a skip connection; enough for 8x8 .. 32x32 proxy training."""

    def __init__(self, data_shape: tuple[int, ...], num_timesteps: int = 1000, channels: int = 32,
                 time_dim: int = 64, groups: int = 8):
        super().__init__(data_shape, num_timesteps, time_dim, image=True)
        c_img, c = data_shape[0], channels
        emb_dim = 4 * c
        self.time = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(c_img, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb_dim, groups)
        self.downsample = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * c, 2 * c, emb_dim, groups)
        self.up1 = ResBlock(3 * c, c, emb_dim, groups)
        self.out_norm = nn.GroupNorm(math.gcd(groups, c), c)
        self.out = nn.Conv2d(c, c_img, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.time_dim, self.num_timesteps).to(x_t.dtype))
        h0 = self.down1(self.inp(x_t), emb)
        h1 = self.mid(self.downsample(h0), emb)
        up = F.interpolate(h1, size=h0.shape[-2:], mode="nearest")
        h = self.up1(torch.cat([up, h0], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


def build_denoiser(data_shape, kind: str = "auto", **kw: Any) -> nn.Module:
    """'mlp' for vectors, 'unet' for (C, H, W) images; 'auto' picks by the rank of data_shape.
    Keyword arguments go to the model (num_timesteps, hidden/depth or channels, time_dim)."""
    data_shape = tuple(int(d) for d in data_shape)
    if kind == "auto":
        kind = "unet" if len(data_shape) == 3 else "mlp"
    if kind == "mlp":
        return MLPDenoiser(data_shape, **kw)
    if kind == "unet":
        return SmallUNet(data_shape, **kw)
    raise ValueError(f"unknown denoiser kind {kind!r} (one of {', '.join(DENOISER_KINDS)})")
