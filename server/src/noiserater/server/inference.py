"""Scoring shared by the v1 and KServe services: validate the triples, check the request's work against the
server's limits, score them through the model version's batcher and count the scores in the statistics;
selection is that plus a SelectionPlan."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from noiserater.core import scoring
from noiserater.core.selection import Rule, SelectionPlan
from noiserater.server import stats
from noiserater.server.config import ServerConfig
from noiserater.server.models import ModelVersion
from noiserater.server.rpc import RpcError
from noiserater.server.stats import StatsRecorder

DEFAULT_DATASET = "default"


class RequestTooLargeError(RpcError):
    """One request asks for more work than the server's limits allow."""

    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class RequestLimits:
    """The most work one request may ask for, in (x0, t, eps) triples: checked from the request's shapes,
    before anything is expanded or queued."""

    max_triples: int = ServerConfig.max_request_triples
    max_assign_batch: int = ServerConfig.max_assign_batch

    @classmethod
    def of(cls, config: ServerConfig) -> RequestLimits:
        return cls(config.max_request_triples, config.max_assign_batch)

    def check_score(self, triples: int) -> None:
        if triples > self.max_triples:
            raise RequestTooLargeError(f"x0: {triples} triples in one request; this server scores at most "
                                       f"{self.max_triples} (--max-request-triples)")

    def check_select(self, plan: SelectionPlan, batch: int) -> None:
        if plan.rule is Rule.ASSIGN and batch > self.max_assign_batch:
            raise RequestTooLargeError(
                f"x0: rule 'assign' with B={batch} samples scores B*B={plan.num_triples(batch)} triples; this server "
                f"takes at most B={self.max_assign_batch} (--max-assign-batch)")
        triples = plan.num_triples(batch)
        if triples > self.max_triples:
            raise RequestTooLargeError(
                f"candidates: B={batch} x K={plan.num_candidates} is {triples} triples; this server scores at most "
                f"{self.max_triples} per request (--max-request-triples)")


def resolve_dataset(requested: str, version: ModelVersion) -> str:
    """The request's dataset id, else the one the exporter wrote into the model, else 'default'."""
    return stats.check_dataset(requested or version.session.info.dataset or DEFAULT_DATASET)


class Inference:
    def __init__(self, recorder: StatsRecorder, limits: RequestLimits | None = None):
        self.recorder = recorder
        self.limits = limits or RequestLimits()

    async def score(self, version: ModelVersion, dataset: str, x0: np.ndarray, t: np.ndarray,
                    eps: np.ndarray) -> np.ndarray:
        """The scores [N] of N triples."""
        if x0.ndim >= 1 and x0.shape[0] == 0:
            raise scoring.ScoringError("x0: the batch is empty (N=0)")
        if x0.ndim >= 1:
            self.limits.check_score(x0.shape[0])
        scoring.validate_triples(version.session.info, x0, t, eps)
        dataset = self._admitted(dataset, version)
        return await self._scored(version, dataset, np.asarray(x0, dtype=np.float32), np.asarray(t, dtype=np.int64),
                                  np.asarray(eps, dtype=np.float32))

    async def select(self, version: ModelVersion, plan: SelectionPlan, dataset: str, x0: np.ndarray,
                     t: np.ndarray, candidates: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, chosen scores) of the plan's choice among the candidates, as in-process selection."""
        plan.validate(version.session.info, x0, t, candidates)
        self.limits.check_select(plan, x0.shape[0])
        dataset = self._admitted(dataset, version)
        scores = await self._scored(version, dataset, *plan.triples(x0, t, candidates))
        return plan.choose(scores, seed)

    def _admitted(self, requested: str, version: ModelVersion) -> str:
        """The request's dataset, once the recorder agreed to keep statistics for it."""
        dataset = resolve_dataset(requested, version)
        self.recorder.admit(dataset)
        return dataset

    async def _scored(self, version: ModelVersion, dataset: str, x0: np.ndarray, t: np.ndarray,
                      eps: np.ndarray) -> np.ndarray:
        scores = await version.batcher.submit(x0, t, eps)
        self.recorder.record(dataset, version.name, version.version, version.session.info.num_timesteps, t, scores,
                             version.hist_range)
        return scores
