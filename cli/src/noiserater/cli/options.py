"""Choices that nrctl options share, as enums so that --help lists them and Typer checks them."""

from __future__ import annotations

from enum import Enum, StrEnum


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class MetaGrad(StrEnum):
    exact = "exact"
    fast = "fast"


class MetaObjective(StrEnum):  # noiserater.trainer.stage1.train.META_OBJECTIVES
    soft_weights = "soft-weights"
    through_selection = "through-selection"
    through_assignment = "through-assignment"
    grad_norm = "grad-norm"
    denoiser_error = "denoiser-error"


class Denoiser(StrEnum):
    auto = "auto"
    mlp = "mlp"
    unet = "unet"


class Objective(StrEnum):  # noiserater.trainer.substrate.diffusion.OBJECTIVES
    eps = "eps"
    flow = "flow"


class Transport(StrEnum):  # noiserater.client.transports.TRANSPORTS
    stream = "stream"
    unary = "unary"


class Layout(StrEnum):  # noiserater.trainer.substrate.data.LAYOUTS
    auto = "auto"
    nchw = "nchw"
    nhwc = "nhwc"


class LogWith(StrEnum):  # noiserater.trainer.stage1.train.LOGGERS
    none = "none"
    tensorboard = "tensorboard"


def value(choice: Enum | str | None) -> str | None:
    """The plain string of an enum option (None stays None)."""
    return choice.value if isinstance(choice, Enum) else choice
