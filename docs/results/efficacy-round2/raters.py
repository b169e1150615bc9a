"""`nrctl bench train --plugin` for the few-step study: the rater methods whose raters were trained with the
other stage-1 objectives, each bound to its committed ONNX file (`raters/<dataset>-<objective>-<kind>.onnx`,
the one whose objective and data shape are the run's), so that one benchmark compares them with the default
rater (`--rater`):

- `rater-ts-argmax`, `rater-ts-sample`: the through-selection rater (meta-learned through a straight-through
  Gumbel choice of 1 of K over H real steps), argmax of K, or a softmax draw at temperature 1;
- `rater-gn-is`: the grad-norm rater (it predicts the log per-sample gradient norm), drawn with probability
  proportional to exp(score) (temperature 1) and loss-weighted by 1 / (K p): unbiased importance sampling
  of the Gaussian-noise gradient, with the variance-optimal proposal if the prediction were exact;
- `rater-de-argmax`, `rater-de-assign`: the denoiser-error rater (`--meta-objective denoiser-error`: minus the
  loss of a denoiser trained on Gaussian noise), the argmax of K per sample, or the batch assignment that
  maximises the summed score (both marginals kept).
"""

from __future__ import annotations

from pathlib import Path

import torch

from noiserater.client.sources import NoiseSource, register
from noiserater.trainer.stage2.sources import RaterSource, Stage2Error, rater_selector
from noiserater.trainer.stage2.variants import importance_weighted

RATERS = Path(__file__).resolve().parent / "raters"


def _onnx(objective: str, kind: str, data_shape: tuple[int, ...]) -> str:
    from noiserater.core.scoring import RaterSession

    for path in sorted(RATERS.glob(f"*-{objective}-{kind}.onnx")):
        if tuple(RaterSession(path, device="cpu").info.data_shape) == tuple(data_shape):
            return str(path)
    raise Stage2Error(f"{RATERS}: no {kind} rater for the {objective} objective and data shape {list(data_shape)}")


def _bind(method: str, kind: str, rule: str, weighted: bool = False) -> None:
    def factory(generator: torch.Generator, objective: str = "eps", num_candidates: int = 8, seed: int = 0,
                threads: int = 1, steps: int = 0, data_shape: tuple[int, ...] = ()) -> NoiseSource:
        temperature = 1.0
        selector = rater_selector(method, rule, None, _onnx(objective, kind, data_shape), num_candidates,
                                  temperature, seed, threads)
        source = RaterSource(selector, generator)
        if weighted:
            options = {"generator": generator, "num_candidates": num_candidates, "temperature": temperature,
                       "steps": steps, "seed": seed}
            source = importance_weighted()(source, options)
        return source

    factory.needs_rater = False  # it brings its own rater file; reports still count it a rater method by name
    register(method)(factory)


_bind("rater-ts-argmax", "ts", "argmax")
_bind("rater-ts-sample", "ts", "sample")
_bind("rater-gn-is", "gn", "sample", weighted=True)
_bind("rater-de-argmax", "de", "argmax")
_bind("rater-de-assign", "de", "assign")
