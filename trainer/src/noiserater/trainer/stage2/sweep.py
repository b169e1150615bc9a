"""Sample quality against the number of function evaluations (NFE), from the same starting noises for every
method and seed.

For each NFE of the sweep (1, 2, 4, ... by default) and a high-NFE reference, the objective's deterministic
sampler (DDIM for eps, Euler for flow) maps one fixed bank of starting noises to samples, and

- `frechet@N`, `swd@N`: Fréchet (classifier features) and sliced Wasserstein distances to the *held-out* split;
- `straightness@N`: RMS-per-dimension distance between the N-evaluation sample and the reference sample from
  the same start (0 for perfectly straight paths; lower is straighter);
- `memorisation`: the reference samples' mean distance to their nearest training item over the held-out items'
  (below 1: samples sit closer to training items than unseen real data does).

    sweep = NfeSweep.build(quality, data_shape, count=2000, nfes=[1, 2, 4, 8, 16, 32], reference_nfe=100)
    metrics = sweep.measure(model, schedule)          # {"frechet@1": ..., "straightness@4": ..., ...}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from noiserater.trainer.stage2.metrics import EVAL_SEED, SampleQuality
from noiserater.trainer.substrate.diffusion import Schedule
from noiserater.trainer.substrate.samplers import sample

START_SEED = EVAL_SEED + 77
PRIMARY_NFE = 4
PRIMARY = f"frechet@{PRIMARY_NFE}"
SWEEP_METRICS = ("frechet", "swd", "straightness")


def metric_at(name: str, nfe: int) -> str:
    return f"{name}@{nfe}"


@dataclass
class NfeSweep:
    quality: SampleQuality
    start: torch.Tensor  # the starting noises, shared by every method and seed
    nfes: list[int]
    reference_nfe: int
    sampler: str | None = None  # None: the objective's deterministic sampler

    @classmethod
    def build(cls, quality: SampleQuality, data_shape: tuple[int, ...], count: int = 2000,
              nfes: list[int] | tuple[int, ...] = (1, 2, 4, 8, 16, 32), reference_nfe: int = 100,
              sampler: str | None = None) -> NfeSweep:
        nfes = sorted({int(n) for n in nfes})
        if not nfes or nfes[0] < 1 or reference_nfe < 1:
            raise ValueError("nfe: every number of function evaluations must be >= 1")
        if reference_nfe in nfes:
            raise ValueError(f"nfe: the reference NFE {reference_nfe} is also in the sweep; pick a higher one")
        start = torch.randn((count, *data_shape), generator=torch.Generator().manual_seed(START_SEED))
        return cls(quality, start, nfes, int(reference_nfe), sampler or None)

    def names(self) -> list[str]:
        """Every metric `measure` returns, in table order."""
        per = [metric_at(m, n) for m in SWEEP_METRICS for n in self.nfes]
        return [*per, metric_at("frechet", self.reference_nfe), metric_at("swd", self.reference_nfe), "memorisation"]

    def samples(self, model: nn.Module, schedule: Schedule, nfe: int) -> torch.Tensor:
        device = next(model.parameters()).device
        return sample(model, schedule, self.start.to(device), nfe, sampler=self.sampler).cpu()

    def primary(self, model: nn.Module, schedule: Schedule) -> float:
        """frechet at the primary NFE alone (for curves over training)."""
        return self.quality.measure_heldout(self.samples(model, schedule, PRIMARY_NFE))["frechet"]

    def measure(self, model: nn.Module, schedule: Schedule) -> dict[str, float]:
        reference = self.samples(model, schedule, self.reference_nfe)
        out: dict[str, float] = {}
        dims = reference[0].numel() ** 0.5
        for nfe in self.nfes:
            x = self.samples(model, schedule, nfe)
            for name, value in self.quality.measure_heldout(x).items():
                out[metric_at(name, nfe)] = value
            gap = (x.clamp(*self.quality.range) - reference.clamp(*self.quality.range)).flatten(1).norm(dim=1) / dims
            out[metric_at("straightness", nfe)] = float(gap.mean())
        for name, value in self.quality.measure_heldout(reference).items():
            out[metric_at(name, self.reference_nfe)] = value
        nearest = self.quality.nearest_train_distance(reference)
        out["memorisation"] = float(nearest.mean()) / self.quality.heldout_nearest_train
        return {name: out[name] for name in self.names()}
