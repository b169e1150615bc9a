"""Research variants of the stage-2 sources, as wrappers around a source (the digits research scripts
compose them; the benchmark's methods use none):

- `windowed(start, stop)`: the inner source only at steps in [start, stop) x the run's steps, plain Gaussian
  noise (and no loss weights) at the others;
- `symmetrised()`: every selected noise's sign flipped by a fair coin (removes any mean shift a selection
  causes); a batch the inner source says it did not select (`selected` False: plain Gaussian noise) is left
  as it is;
- `t_threshold(t_min)`: the inner source only for the samples with t >= t_min, plain Gaussian noise below;
- `importance_weighted()`: around a `rater-sample` source with an in-process rater: the same kind of draw,
  with loss weights 1 / (K p_chosen), which makes the expected gradient exactly the Gaussian one.

Each builder returns a `Wrap`, `wrap(source, options) -> source`, where `options` are those the training loop
built the source from (`generator`, `steps`, `num_candidates`, `temperature`, ...). `train_stage2` applies
its `wrappers` in order, each around the result of the ones before:

    train_stage2(data, "rater-argmax", 2000, 0, rater="r.onnx", wrappers=[t_threshold(200), symmetrised()])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from noiserater.client import peers
from noiserater.client.sources import NoiseSource
from noiserater.trainer.stage2.sources import Stage2Error

Wrap = Callable[[NoiseSource, dict[str, Any]], NoiseSource]


class Windowed:
    def __init__(self, inner: NoiseSource, generator: torch.Generator, start: float, stop: float):
        self.inner, self.generator, self.start, self.stop = inner, generator, start, stop
        self._inside = False

    @property
    def selected(self) -> bool:
        return self._inside and getattr(self.inner, "selected", True)

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        self._inside = self.start <= step < self.stop
        return self.inner.sample(x0, t, step) if self._inside else peers.gaussian(x0, self.generator)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return self.inner.loss_weights(t) if self._inside else None


class Symmetrised:
    def __init__(self, inner: NoiseSource, generator: torch.Generator):
        self.inner, self.generator = inner, generator

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        eps = self.inner.sample(x0, t, step)
        if not getattr(self.inner, "selected", True):
            return eps
        coin = torch.randint(0, 2, (eps.shape[0],), generator=self.generator, device=self.generator.device)
        return eps * (2 * coin - 1).to(eps.device, eps.dtype).view(-1, *([1] * (eps.dim() - 1)))

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return self.inner.loss_weights(t)


class TThreshold:
    def __init__(self, inner: NoiseSource, generator: torch.Generator, t_min: int):
        self.inner, self.generator, self.t_min = inner, generator, t_min
        self._chosen: torch.Tensor | None = None

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        eps = peers.gaussian(x0, self.generator)
        self._chosen = t >= self.t_min
        if bool(self._chosen.any()):
            eps[self._chosen] = self.inner.sample(x0[self._chosen], t[self._chosen], step)
        return eps

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        chosen = self._chosen
        inner = self.inner.loss_weights(t[chosen]) if chosen is not None and bool(chosen.any()) else None
        if inner is None:
            return None
        weights = torch.ones(t.shape[0], dtype=inner.dtype, device=inner.device)
        weights[chosen] = inner
        return weights


class ImportanceWeighted:
    """rater-sample through the shared scoring code, keeping 1 / (K p_chosen) as the loss weights."""

    def __init__(self, inner: NoiseSource, num_candidates: int, temperature: float):
        from noiserater.core.selection import Rule

        selector = getattr(inner, "selector", None)
        if selector is None or selector.rule is not Rule.SAMPLE:
            raise Stage2Error("importance weighting needs a rater-sample source")
        if selector.session is None:
            raise Stage2Error("importance weighting needs an in-process rater (an ONNX file, not a remote selector)")
        self.session = selector.session
        self.generator = inner.generator
        self.k_schedule = inner.k_schedule
        self.num_candidates, self.temperature = num_candidates, temperature
        self._weights: torch.Tensor | None = None
        self._calls = 0

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        from noiserater.core.selection import Rule, SelectionPlan

        k = self.k_schedule(step) if self.k_schedule is not None else self.num_candidates
        if k == 1:
            self._weights = None
            return peers.gaussian(x0, self.generator)
        b = x0.shape[0]
        candidates = torch.randn((b, k, *x0.shape[1:]), generator=self.generator, device=self.generator.device)
        x0_np, t_np = x0.detach().cpu().float().numpy(), t.detach().cpu().numpy()
        plan = SelectionPlan(k, 1, Rule.SAMPLE, self.temperature)
        flat = self.session.score(*plan.triples(x0_np, t_np, candidates.cpu().numpy()))
        self._calls += 1
        idx, _ = plan.choose(flat, seed=self._calls)
        chosen = torch.from_numpy(idx[:, 0])
        log_p = torch.from_numpy(plan.log_probs(flat))[torch.arange(b), chosen]
        self._weights = (1.0 / (k * log_p.exp())).to(x0.device, torch.float32)
        return candidates[torch.arange(b), chosen].to(x0.device, x0.dtype)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return self._weights


def windowed(start: float = 0.0, stop: float = 1.0) -> Wrap:
    """Select only at steps in [start, stop) as fractions of the run."""
    return lambda inner, o: Windowed(inner, o["generator"], start * o["steps"], stop * o["steps"])


def symmetrised() -> Wrap:
    return lambda inner, o: Symmetrised(inner, o["generator"])


def t_threshold(t_min: int) -> Wrap:
    return lambda inner, o: TThreshold(inner, o["generator"], t_min)


def importance_weighted() -> Wrap:
    return lambda inner, o: ImportanceWeighted(inner, o["num_candidates"], o["temperature"])
