"""The noise rater r_phi(x0, t, eps) -> score, built from export-friendly ops only.

Every rater takes x0 [N, *data_shape] (float), t [N] (int64) and eps [N, *data_shape] and returns
a score per triple [N]. `build_rater` is the one constructor used by training, checkpoints and export.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

from noiserater.trainer.substrate.denoisers import TimeConditioned
from noiserater.trainer.substrate.diffusion import timestep_embedding


class VectorRater(TimeConditioned):
    """An MLP over x0, eps, x0*eps and a timestep embedding, for vector data."""

    def __init__(self, data_shape: tuple[int, ...], num_timesteps: int, hidden: int = 128, time_dim: int = 32):
        super().__init__(data_shape, num_timesteps, time_dim)
        dim = math.prod(self.data_shape)
        self.net = nn.Sequential(
            nn.Linear(3 * dim + time_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        x = x0.flatten(1)
        e = eps.flatten(1)
        emb = timestep_embedding(t, self.time_dim, self.num_timesteps).to(x0.dtype)
        return self.net(torch.cat([x, e, x * e, emb], dim=1)).squeeze(1)


class ImageRater(TimeConditioned):
    """A small conv net over the channels [x0, eps, x0*eps]: one full-resolution conv, the timestep embedding
    added per channel, then convs at half resolution, global average pooling and a linear head.
    Ops: Conv, SiLU, Add, Mul, ReduceMean, Gemm. Rating K = 8 candidates costs ~0.1 UNet training steps."""

    def __init__(self, data_shape: tuple[int, ...], num_timesteps: int, channels: int = 16, time_dim: int = 32):
        super().__init__(data_shape, num_timesteps, time_dim, image=True)
        c_img = data_shape[0]
        self.inp = nn.Conv2d(3 * c_img, channels, 3, padding=1)
        self.time = nn.Linear(time_dim, channels)
        self.body = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1),
            nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Linear(2 * channels, 2 * channels), nn.SiLU(), nn.Linear(2 * channels, 1))

    def forward(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.time_dim, self.num_timesteps).to(x0.dtype))
        h = self.inp(torch.cat([x0, eps, x0 * eps], dim=1)) + emb[:, :, None, None]
        h = self.body(h).mean(dim=(2, 3))
        return self.head(h).squeeze(1)


RATER_KINDS: dict[str, type[nn.Module]] = {"mlp": VectorRater, "conv": ImageRater}


def default_rater_kind(data_shape: tuple[int, ...]) -> str:
    """'conv' for (C, H, W) images, 'mlp' otherwise."""
    return "conv" if len(data_shape) == 3 else "mlp"


def build_rater(kind: str, data_shape: tuple[int, ...], num_timesteps: int, **kwargs: Any) -> nn.Module:
    if kind not in RATER_KINDS:
        raise ValueError(f"unknown rater kind {kind!r} (one of {', '.join(RATER_KINDS)})")
    return RATER_KINDS[kind](tuple(data_shape), num_timesteps, **kwargs)


RATER_FILE = "rater.pt"


def save_rater(path, rater: nn.Module, kind: str, *, dataset: str = "", schedule: str = "",
               rater_kwargs: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None) -> None:
    """Write the frozen rater (weights + everything needed to rebuild and export it)."""
    torch.save(
        {
            "kind": kind,
            "data_shape": list(rater.data_shape),
            "num_timesteps": rater.num_timesteps,
            "rater_kwargs": rater_kwargs or {},
            "state_dict": rater.state_dict(),
            "dataset": dataset,
            "schedule": schedule,
            # JSON round trip: provenance must load with weights_only=True (no torch objects inside).
            "provenance": json.loads(json.dumps(provenance or {}, default=str)),
        },
        path,
    )


def load_rater(path) -> tuple[nn.Module, dict[str, Any]]:
    """(rater in eval mode, the checkpoint's description without the weights)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    rater = build_rater(blob["kind"], tuple(blob["data_shape"]), blob["num_timesteps"], **blob["rater_kwargs"])
    rater.load_state_dict(blob["state_dict"])
    rater.eval()
    return rater, {k: v for k, v in blob.items() if k != "state_dict"}
