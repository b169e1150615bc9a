"""Noise sources: every way of producing a training batch's noise behind one interface, in the manner of
diffusers' schedulers (one piece, swappable by name).

    source = make_source("immiscible", generator=torch.Generator().manual_seed(0))
    eps = source.sample(x0, t, step)             # was: eps = torch.randn_like(x0)
    weights = source.loss_weights(t)             # None, or per-sample loss weights (min-snr)

A source is any object with `sample(x0, t, step) -> eps` (same shape, device and dtype as x0) and
`loss_weights(t) -> Tensor | None`. `NoiseSelector` (the rater, local or remote) is one; the peers below are
the others, and stage 2 registers the rater rules and their research variants next to them. Register a new
one with `@register("name")` on a factory `f(**options) -> source`; `make_source(name, **options)` passes
only the options the factory's signature names, so one set of options (generator, num_candidates, snr, ...)
serves every source.

The couplings from outside packages (`ot`, `ot-sinkhorn`, `ot-subbatch` from POT, `ot-torchcfm` from
torchcfm; both optional, `pip install POT torchcfm`) say at construction when their package is missing. The
model-aligned sources (`model-aligned`, `model-aligned-assign`) take `loss_fn`, a callable (x0, t, eps) ->
[B] per-sample losses of the model being trained (stage 2 passes its denoiser's loss under its schedule).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from noiserater.client import peers


class SourceError(ValueError):
    """An unknown source name or a source's missing option; the message names it."""


@runtime_checkable
class NoiseSource(Protocol):
    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor: ...

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None: ...


REGISTRY: dict[str, Callable[..., NoiseSource]] = {}


def register(name: str) -> Callable[[Callable[..., NoiseSource]], Callable[..., NoiseSource]]:
    """Decorator: make `factory(**options) -> NoiseSource` available as `name`."""

    def add(factory: Callable[..., NoiseSource]) -> Callable[..., NoiseSource]:
        REGISTRY[name] = factory
        return factory

    return add


def names() -> list[str]:
    return list(REGISTRY)


def make_source(name: str, **options: Any) -> NoiseSource:
    """The source registered as `name`, built from the options its factory takes (the rest are ignored)."""
    factory = REGISTRY.get(name)
    if factory is None:
        raise SourceError(f"source: unknown {name!r} (one of {', '.join(REGISTRY)})")
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return factory(**options)
    missing = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise SourceError(f"source {name!r} needs {', '.join(missing)}")
    return factory(**{k: v for k, v in options.items() if k in parameters})


class Gaussian:
    """eps ~ N(0, I) from `generator` (the baseline, `uniform`)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return peers.gaussian(x0, self.generator)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return None


class Immiscible(Gaussian):
    """B Gaussian noises assigned over the batch by the distance-minimising permutation."""

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return peers.immiscible(x0, self.generator)


class ImmiscibleKnn(Gaussian):
    """The nearest to x0 of K Gaussian candidates per sample (the rater's K, so only *what* is chosen differs)."""

    def __init__(self, generator: torch.Generator, num_candidates: int = 8):
        super().__init__(generator)
        if num_candidates < 1:
            raise SourceError(f"num_candidates: must be >= 1, got {num_candidates}")
        self.num_candidates = num_candidates

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return peers.immiscible_knn(x0, self.generator, self.num_candidates)


class MinSnr(Gaussian):
    """Gaussian noise with Min-SNR-gamma loss weights: min(snr(t), gamma) / snr(t) for eps prediction,
    min(snr(t), gamma) / (snr(t) + 1) for the flow objective's velocity."""

    def __init__(self, generator: torch.Generator, snr: Callable[[torch.Tensor], torch.Tensor],
                 gamma: float | None = None, objective: str = "eps"):
        super().__init__(generator)
        self.snr = snr
        self.gamma = peers.MIN_SNR_GAMMA if gamma is None else gamma
        self.objective = objective

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return peers.min_snr_weights(self.snr(t), self.gamma, self.objective)


def _require(module: str, package: str, source: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SourceError(f"source {source!r} needs the {package} package (pip install {package})")


class OptimalTransport(Gaussian):
    """B Gaussian noises permuted over the batch by POT's exact minibatch OT plan (`ot.emd`)."""

    def __init__(self, generator: torch.Generator):
        _require("ot", "POT", "ot")
        super().__init__(generator)

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return peers.ot_exact(x0, self.generator)


class OptimalTransportSinkhorn(Gaussian):
    """B Gaussian noises paired by a without-replacement draw from POT's entropic OT plan; `ot_reg` is the
    regularisation relative to the mean squared distance (0: exact OT; large: independent noise)."""

    def __init__(self, generator: torch.Generator, ot_reg: float = 0.05):
        _require("ot", "POT", "ot-sinkhorn")
        super().__init__(generator)
        if not ot_reg >= 0:
            raise SourceError(f"ot_reg: must be >= 0, got {ot_reg}")
        self.reg = float(ot_reg)

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return peers.ot_sinkhorn(x0, self.generator, self.reg)


class OptimalTransportSubbatch(Gaussian):
    """Exact OT (POT) within consecutive sub-batches of `ot_subbatch` samples (1: independent noise; 0 or
    at least the batch: `ot`)."""

    def __init__(self, generator: torch.Generator, ot_subbatch: int = 0):
        _require("ot", "POT", "ot-subbatch")
        super().__init__(generator)
        if ot_subbatch < 0:
            raise SourceError(f"ot_subbatch: must be >= 0 (0: the whole batch), got {ot_subbatch}")
        self.size = int(ot_subbatch)

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return peers.ot_subbatch(x0, self.generator, self.size)


class TorchcfmOptimalTransport(Gaussian):
    """B Gaussian noises paired by the exact OT plan of torchcfm's ExactOptimalTransportConditionalFlowMatcher."""

    def __init__(self, generator: torch.Generator):
        _require("ot", "POT", "ot-torchcfm")
        _require("torchcfm", "torchcfm", "ot-torchcfm")
        super().__init__(generator)
        self.sampler = peers.torchcfm_plan_sampler()

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return peers.torchcfm_exact(x0, self.generator, self.sampler)


def _check_loss_fn(loss_fn: peers.LossFn | None, source: str) -> peers.LossFn:
    if not callable(loss_fn):
        raise SourceError(f"source {source!r} needs loss_fn, a callable (x0, t, eps) -> [B] losses of the model "
                          "being trained")
    return loss_fn


class ModelAligned(Gaussian):
    """Per sample, the one of K Gaussian candidates on which `loss_fn` (the current model's loss) is lowest."""

    def __init__(self, generator: torch.Generator, loss_fn: peers.LossFn | None = None, num_candidates: int = 8):
        super().__init__(generator)
        self.loss_fn = _check_loss_fn(loss_fn, "model-aligned")
        if num_candidates < 1:
            raise SourceError(f"num_candidates: must be >= 1, got {num_candidates}")
        self.num_candidates = num_candidates

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return peers.model_aligned(x0, t, self.generator, self.num_candidates, self.loss_fn)


class ModelAlignedAssign(Gaussian):
    """B Gaussian noises assigned over the batch by the permutation of least summed `loss_fn` (B^2 loss
    evaluations per batch)."""

    def __init__(self, generator: torch.Generator, loss_fn: peers.LossFn | None = None):
        super().__init__(generator)
        self.loss_fn = _check_loss_fn(loss_fn, "model-aligned-assign")

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return peers.model_aligned_assign(x0, t, self.generator, self.loss_fn)


register("uniform")(Gaussian)
register("immiscible")(Immiscible)
register("immiscible-knn")(ImmiscibleKnn)
register("min-snr")(MinSnr)
register("ot")(OptimalTransport)
register("ot-sinkhorn")(OptimalTransportSinkhorn)
register("ot-subbatch")(OptimalTransportSubbatch)
register("ot-torchcfm")(TorchcfmOptimalTransport)
register("model-aligned")(ModelAligned)
register("model-aligned-assign")(ModelAlignedAssign)
