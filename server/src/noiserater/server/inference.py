"""Scoring shared by the v1 and KServe services: validate the triples, score them through the model
version's batcher and count the scores in the statistics; selection is that plus a SelectionPlan."""

from __future__ import annotations

import numpy as np

from noiserater.core import scoring
from noiserater.core.selection import SelectionPlan
from noiserater.server import stats
from noiserater.server.models import ModelVersion
from noiserater.server.stats import StatsRecorder

DEFAULT_DATASET = "default"


def resolve_dataset(requested: str, version: ModelVersion) -> str:
    """The request's dataset id, else the one the exporter wrote into the model, else 'default'."""
    return stats.check_dataset(requested or version.session.info.dataset or DEFAULT_DATASET)


class Inference:
    def __init__(self, recorder: StatsRecorder):
        self.recorder = recorder

    async def score(self, version: ModelVersion, dataset: str, x0: np.ndarray, t: np.ndarray,
                    eps: np.ndarray) -> np.ndarray:
        """The scores [N] of N triples."""
        if x0.ndim >= 1 and x0.shape[0] == 0:
            raise scoring.ScoringError("x0: the batch is empty (N=0)")
        scoring.validate_triples(version.session.info, x0, t, eps)
        dataset = resolve_dataset(dataset, version)
        return await self._scored(version, dataset, np.asarray(x0, dtype=np.float32), np.asarray(t, dtype=np.int64),
                                  np.asarray(eps, dtype=np.float32))

    async def select(self, version: ModelVersion, plan: SelectionPlan, dataset: str, x0: np.ndarray,
                     t: np.ndarray, candidates: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, chosen scores) of the plan's choice among the candidates, as in-process selection."""
        plan.validate(version.session.info, x0, t, candidates)
        dataset = resolve_dataset(dataset, version)
        scores = await self._scored(version, dataset, *plan.triples(x0, t, candidates))
        return plan.choose(scores, seed)

    async def _scored(self, version: ModelVersion, dataset: str, x0: np.ndarray, t: np.ndarray,
                      eps: np.ndarray) -> np.ndarray:
        scores = await version.batcher.submit(x0, t, eps)
        self.recorder.record(dataset, version.name, version.version, version.session.info.num_timesteps, t, scores)
        return scores
