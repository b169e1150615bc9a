"""NoiseRater trainer, in four sub-packages:

- `substrate`: datasets, the diffusion schedule / loss / sampler and the denoisers both stages train;
- `stage1`: the rater, its meta-learning, the training run and the ONNX export;
- `stage2`: the noise sources that use a rater, their research variants, the training loop that trains a
  fresh denoiser on any registered source, and its metrics;
- `bench`: the benchmarks as a library (`nrctl bench ...`).

Training jobs import `NoiseSelector` from `noiserater.client`; the name is kept here too
(`from noiserater.trainer import NoiseSelector`) for code written against it."""

from __future__ import annotations

__all__ = ["NoiseSelector"]


def __getattr__(name: str):
    if name == "NoiseSelector":
        from noiserater.client.selector import NoiseSelector

        return NoiseSelector
    raise AttributeError(name)
