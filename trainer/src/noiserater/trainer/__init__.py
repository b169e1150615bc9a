"""NoiseRater trainer: diffusion substrate, the rater, meta-learning, export, noise sources and the
stage-2 harness. Training jobs import `NoiseSelector` from `noiserater.client`; the name is kept here too
(`from noiserater.trainer import NoiseSelector`) for code written against it."""

from __future__ import annotations

__all__ = ["NoiseSelector"]


def __getattr__(name: str):
    if name == "NoiseSelector":
        from noiserater.client.selector import NoiseSelector

        return NoiseSelector
    raise AttributeError(name)
