"""NoiseRater trainer: diffusion substrate, the rater, meta-learning, export, and the selector that
training jobs call (`from noiserater.trainer import NoiseSelector`)."""

from __future__ import annotations

__all__ = ["NoiseSelector"]


def __getattr__(name: str):
    if name == "NoiseSelector":
        from noiserater.trainer.selector import NoiseSelector

        return NoiseSelector
    raise AttributeError(name)
