"""The rater as noise sources, registered next to the peers of `noiserater.client.sources`:

- `rater-argmax`, `rater-sample`, `rater-assign`: a NoiseSelector with that rule, either the one given as
  `selector` (local or remote) or one built from the ONNX file `rater` with `num_candidates`, `temperature`,
  `seed` and `threads` (onnxruntime intra-op threads);
- `rater-kanneal`: argmax with K annealed linearly from `num_candidates` to 1 by `kanneal_end` of `steps`;
  once K is 1 the noise is plain Gaussian from `generator`.

    source = make_source("rater-argmax", generator=gen, rater="digits.onnx", num_candidates=8, seed=0)

A factory that needs a rater says so with `needs_rater = True` (`needs_rater(name)` reads it), so a harness
knows before it trains which methods need one; such a factory receives `rater` and `selector` among its
options. Reports compare every rater method (`is_rater_method`: those, and any source named `rater-...`)
against the goal. `load_plugin` imports a module that registers more sources (`nrctl bench train --plugin`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from noiserater.client import peers
from noiserater.client.sources import REGISTRY, NoiseSource, SourceError, register


class Stage2Error(SourceError):
    """A stage-2 setting that cannot work (an unknown method, a missing rater, ...); the message says which."""


def needs_rater(name: str) -> bool:
    """Whether the source registered as `name` selects with the harness's rater (its factory's `needs_rater`)."""
    factory = REGISTRY.get(name)
    return bool(getattr(factory, "needs_rater", False))


def is_rater_method(name: str) -> bool:
    """Whether reports treat `name` as a rater method: it selects with the harness's rater, or it is named
    `rater-...` (a plugin's method bound to a rater file of its own)."""
    return needs_rater(name) or name.startswith("rater-")


def kanneal_schedule(k: int, steps: int, end_fraction: float) -> Callable[[int], int]:
    """K(step): linear from k at step 0 to 1 at end_fraction * steps, 1 afterwards."""
    end = max(1, int(round(end_fraction * steps)))
    return lambda step: max(1, int(round(k - (k - 1) * min(step, end) / end)))


class RaterSource:
    """Noise chosen by a NoiseSelector; with `k_schedule(step) -> K`, K per step, and plain Gaussian noise
    from `generator` at the steps where K is 1 (`selected` says whether the last batch was chosen).

    `prefetch(x0, t, step)` starts the selection of a later `sample(x0, t, step)` (the very same tensors) in
    the background when `prefetch_allowed(selector, prefetch)` says so; otherwise it does nothing and `sample`
    selects."""

    def __init__(self, selector: Any, generator: torch.Generator, k_schedule: Callable[[int], int] | None = None,
                 prefetch: str = "remote"):
        self.selector = selector
        self.generator = generator
        self.k_schedule = k_schedule
        self.selected = False
        self.prefetches = prefetch_allowed(selector, prefetch)

    def prefetch(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> None:
        k = self.k_schedule(step) if self.k_schedule is not None else None
        if self.prefetches and k != 1:
            self.selector.prefetch(x0, t, num_candidates=k)

    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        k = self.k_schedule(step) if self.k_schedule is not None else None
        self.selected = k != 1
        if k is None:
            return self.selector.select(x0, t)
        if k == 1:
            return peers.gaussian(x0, self.generator)
        return self.selector.select(x0, t, num_candidates=k)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return None


PREFETCH = ("remote", "all", "off")


def prefetch_allowed(selector: Any, prefetch: str = "remote") -> bool:
    """Whether a rater source prefetches through `selector` under the policy `prefetch`: "remote" for a
    remote NoiseSelector, "all" for an in-process one too, "off" never; and only a selector that draws from a
    noise stream of its own (`seed=`, or a generator other than torch's global one, whose draws the training
    step's own random ops would reorder), so that prefetching changes no result."""
    if prefetch not in PREFETCH:
        raise Stage2Error(f"prefetch: {prefetch!r} is not one of {', '.join(PREFETCH)}")
    if prefetch == "off" or not hasattr(selector, "is_remote") or not (selector.is_remote or prefetch == "all"):
        return False
    generator = getattr(selector, "generator", None)
    if generator is not None:
        return all(generator is not default for default in _global_generators())
    return getattr(selector, "seed", None) is not None


def _global_generators() -> list[torch.Generator]:
    cuda = list(torch.cuda.default_generators) if torch.cuda.is_available() else []
    return [torch.default_generator, *cuda]


def rater_selector(method: str, rule: str, selector: Any, rater: str | Path | None, num_candidates: int,
                   temperature: float, seed: int, threads: int) -> Any:
    """`selector` as given, or an in-process NoiseSelector over the ONNX file `rater`."""
    if selector is not None:
        return selector
    if rater is None:
        raise Stage2Error(f"method {method!r} needs a rater (an ONNX file) or a NoiseSelector")
    from noiserater.client.selector import NoiseSelector, SelectorError

    try:
        return NoiseSelector.local(rater, num_candidates=num_candidates, rule=rule, temperature=temperature, seed=seed,
                                   intra_op_threads=threads)
    except SelectorError as exc:
        raise Stage2Error(str(exc)) from None


def _register_rule(method: str, rule: str) -> None:
    def factory(generator: torch.Generator, selector: Any = None, rater: str | Path | None = None,
                num_candidates: int = 8, temperature: float = 1.0, seed: int = 0, threads: int = 1,
                prefetch: str = "remote") -> NoiseSource:
        return RaterSource(rater_selector(method, rule, selector, rater, num_candidates, temperature, seed, threads),
                           generator, prefetch=prefetch)

    factory.needs_rater = True
    register(method)(factory)


for _method, _rule in (("rater-argmax", "argmax"), ("rater-sample", "sample"), ("rater-assign", "assign")):
    _register_rule(_method, _rule)


@register("rater-kanneal")
def rater_kanneal(generator: torch.Generator, steps: int, selector: Any = None, rater: str | Path | None = None,
                  num_candidates: int = 8, temperature: float = 1.0, seed: int = 0, threads: int = 1,
                  kanneal_end: float = 0.5, prefetch: str = "remote") -> NoiseSource:
    selector = rater_selector("rater-kanneal", "argmax", selector, rater, num_candidates, temperature, seed, threads)
    return RaterSource(selector, generator, kanneal_schedule(num_candidates, steps, kanneal_end), prefetch=prefetch)


rater_kanneal.needs_rater = True


def load_plugin(spec: str) -> ModuleType:
    """Import a module that registers sources: a dotted module name, or the path of a .py file. Any failure,
    inside the module too, is a Stage2Error naming the plugin."""
    try:
        if not spec.endswith(".py"):
            return importlib.import_module(spec)
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError("no such file")
        name = f"noiserater_plugin_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    except Exception as exc:  # an import error, or any error the plugin's own code raises
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Stage2Error(f"plugin {spec}: {reason}") from None
