"""The noise rater r_phi(x0, t, eps) -> score, built from export-friendly ops only.

Every rater takes x0 [N, *data_shape] (float), t [N] (int64) and eps [N, *data_shape] and returns
a score per triple [N]. `build_rater` is the one constructor used by training, checkpoints and export.

A trained rater is saved as a folder in the Hugging Face layout (`save_pretrained`: model.safetensors +
config.json, no pickle) and as one torch file (`save_rater`: rater.pt); `load_rater` reads either, or a
train-rater RUN_DIR holding them, from_pretrained-style.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noiserater.trainer.substrate.denoisers import TimeConditioned, build_denoiser
from noiserater.trainer.substrate.diffusion import make_schedule, per_sample_loss, timestep_embedding


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


class DenoiserErrorRater(nn.Module):
    """Score = minus a frozen denoiser's loss on the triple: -mean((f(x_t, t) - target)^2) for the objective
    (and schedule) it was trained with. Its argmax over K candidates is the candidate the denoiser already
    explains best, the pairing of a model-aligned coupling, but with a fixed, fully trained denoiser instead
    of the model being trained, so it can be exported and served like any rater. Rating K candidates costs K
    forward passes of that denoiser.

    The keyword arguments say which denoiser (`denoiser`, `denoiser_kwargs`) and which loss (`objective`,
    `schedule`); they are stored with the rater so that `build_rater` rebuilds the same network."""

    def __init__(self, data_shape: tuple[int, ...], num_timesteps: int, objective: str = "eps",
                 schedule: str = "linear", denoiser: str = "auto", denoiser_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.num_timesteps = num_timesteps
        self.denoiser = build_denoiser(self.data_shape, denoiser, num_timesteps=num_timesteps,
                                       **(denoiser_kwargs or {}))
        self.schedule = make_schedule(num_timesteps, schedule, objective)

    def forward(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return -per_sample_loss(self.denoiser, self.schedule.to(x0.device), x0, t, eps)


RATER_KINDS: dict[str, type[nn.Module]] = {"mlp": VectorRater, "conv": ImageRater,
                                           "denoiser-error": DenoiserErrorRater}


def default_rater_kind(data_shape: tuple[int, ...]) -> str:
    """'conv' for (C, H, W) images, 'mlp' otherwise."""
    return "conv" if len(data_shape) == 3 else "mlp"


def build_rater(kind: str, data_shape: tuple[int, ...], num_timesteps: int, **kwargs: Any) -> nn.Module:
    if kind not in RATER_KINDS:
        raise ValueError(f"unknown rater kind {kind!r} (one of {', '.join(RATER_KINDS)})")
    return RATER_KINDS[kind](tuple(data_shape), num_timesteps, **kwargs)


RATER_FILE = "rater.pt"  # pickle-based (torch.save), read back with weights_only=True
PRETRAINED_DIR = "rater"  # RUN_DIR/rater/: the Hugging Face layout, model.safetensors + config.json
WEIGHTS_FILE = "model.safetensors"
PRETRAINED_CONFIG_FILE = "config.json"
MODEL_TYPE = "noiserater-rater"


class RaterLoadError(ValueError):
    """A path that holds no loadable rater; the message is one line and starts with the path."""


def describe(rater: nn.Module, kind: str, *, dataset: str = "", schedule: str = "", objective: str = "eps",
             meta_objective: str = "", rater_kwargs: dict[str, Any] | None = None,
             provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to rebuild and export the rater, but its weights (plain JSON types only). `objective`:
    what the denoisers it was trained against predicted ("eps" or "flow"); `meta_objective`: how stage 1
    trained it (see `noiserater.trainer.stage1.train.META_OBJECTIVES`). A file written before these two
    existed is read back as an eps rater of the soft-weights objective."""
    return {
        "kind": kind,
        "data_shape": list(rater.data_shape),
        "num_timesteps": rater.num_timesteps,
        "rater_kwargs": rater_kwargs or {},
        "dataset": dataset,
        "schedule": schedule,
        "objective": objective,
        "meta_objective": meta_objective,
        # JSON round trip: provenance must load with weights_only=True (no torch objects inside).
        "provenance": json.loads(json.dumps(provenance or {}, default=str)),
    }


def save_rater(path, rater: nn.Module, kind: str, **description: Any) -> None:
    """Write the frozen rater as one torch file (weights + `describe`), what `load_rater` reads back."""
    torch.save({**describe(rater, kind, **description), "state_dict": rater.state_dict()}, path)


def save_pretrained(folder, rater: nn.Module, kind: str, **description: Any) -> Path:
    """Write the frozen rater as `folder`/model.safetensors + `folder`/config.json (the Hugging Face layout:
    no pickle; `load_rater(folder)` reads it back). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, **describe(rater, kind, **description)}
    weights = {k: v.detach().cpu().contiguous() for k, v in rater.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / PRETRAINED_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rater_source(path) -> Path:
    """The file or folder `load_rater(path)` reads: a rater.pt, a model.safetensors folder, or in a train-rater
    RUN_DIR its rater/ folder (else its rater.pt). RaterLoadError when `path` holds none of them."""
    path = Path(path)
    if not path.exists():
        raise RaterLoadError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".onnx":
            raise RaterLoadError(f"{path}: an exported ONNX model, not a trained rater (deploy it with nrctl "
                                 "deploy; a trained rater is a train-rater RUN_DIR, its rater.pt or a "
                                 f"{WEIGHTS_FILE} folder)")
        if path.name == WEIGHTS_FILE:
            return path.parent
        return path
    for candidate in (path, path / PRETRAINED_DIR):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate
    if (path / RATER_FILE).is_file():
        return path / RATER_FILE
    raise RaterLoadError(f"{path}: no trained rater here (expected a train-rater RUN_DIR, a {RATER_FILE} or "
                         f"a folder with {WEIGHTS_FILE} + {PRETRAINED_CONFIG_FILE})")


def load_rater(path) -> tuple[nn.Module, dict[str, Any]]:
    """(rater in eval mode, its description without the weights), from_pretrained-style: `path` is a rater.pt,
    a folder with model.safetensors + config.json, or a train-rater RUN_DIR. RaterLoadError (one line) when
    it holds no loadable rater."""
    source = rater_source(path)
    try:
        if source.is_dir():
            from safetensors.torch import load_file

            info = json.loads((source / PRETRAINED_CONFIG_FILE).read_text())
            state = load_file(str(source / WEIGHTS_FILE))
        else:
            try:
                blob = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch's message advises unpickling untrusted files: leave it out
                raise RaterLoadError(f"{source}: not a rater checkpoint (torch cannot read it: "
                                     f"{type(exc).__name__})") from None
            if not isinstance(blob, dict) or "state_dict" not in blob:
                raise RaterLoadError(f"{source}: a torch file, but not a rater checkpoint (no state_dict)")
            state, info = blob["state_dict"], {k: v for k, v in blob.items() if k != "state_dict"}
    except RaterLoadError:
        raise
    except Exception as exc:  # torch.load, safetensors, JSON and OS errors of many kinds
        raise RaterLoadError(f"{source}: not a readable rater ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        rater = build_rater(info["kind"], tuple(info["data_shape"]), info["num_timesteps"], **info["rater_kwargs"])
        rater.load_state_dict(state)
    except Exception as exc:  # missing keys, shape mismatches, an unknown kind
        raise RaterLoadError(f"{source}: the weights do not fit the rater it describes "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
    rater.eval()
    return rater, info
