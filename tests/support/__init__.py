"""Helpers shared by the tests (fixtures stay in conftest.py): a free port, small exported raters and a
test client's loop over one SelectNoiseStream. `support.server` runs a real rater server in-process."""

from __future__ import annotations

from pathlib import Path

from noiserater.trainer.bench.local_server import free_port

__all__ = ["DIGITS_SHAPE", "TINY_TIMESTEPS", "SelectStream", "export_random_rater", "free_port", "select_in_process",
           "tiny_stage1"]


def tiny_stage1(batch_size: int, **overrides) -> dict:
    """Stage-1 settings for runs of a few meta steps in tests: small models, T = 100, every step logged, the
    checkpoint written only at the end."""
    return {"batch_size": batch_size, "val_batch_size": 2 * batch_size, "population": 2, "num_timesteps": 100,
            "denoiser_kwargs": {"hidden": 32, "depth": 1}, "rater_kwargs": {"hidden": 16}, "log_every": 1,
            "checkpoint_every": 100, **overrides}

DIGITS_SHAPE = (64,)
TINY_TIMESTEPS = 100


def export_random_rater(path: Path, seed: int = 0, data_shape=DIGITS_SHAPE, num_timesteps=TINY_TIMESTEPS,
                        dataset: str = "digits") -> Path:
    import torch

    from noiserater.trainer.stage1.export import export_rater
    from noiserater.trainer.stage1.rater import build_rater

    torch.manual_seed(seed)
    rater = build_rater("mlp", data_shape, num_timesteps, hidden=32)
    export_rater(rater, path, dataset=dataset, schedule="linear", provenance={"test": True})
    return path


class SelectStream:
    """A test client's closed loop over one SelectNoiseStream: `call` sends one request and returns its
    response (a SelectNoiseStreamResponse); grpc.RpcError when the stream itself ends."""

    def __init__(self, stub, timeout: float = 120):
        import queue

        self._outbox: queue.Queue = queue.Queue()
        self._responses = stub.SelectNoiseStream(iter(self._outbox.get, None), timeout=timeout)
        self._count = 0

    def call(self, request):
        from noiserater.core.v1 import rater_service_pb2 as pb

        self._count += 1
        self._outbox.put(pb.SelectNoiseStreamRequest(request_id=str(self._count), request=request))
        return next(self._responses)

    def close(self) -> None:
        self._outbox.put(None)


def select_in_process(session, x0, t, candidates, keep=1, rule="top_k", temperature=1.0, seed=0):
    """(indices, chosen scores) of the selection plan that a request with these arrays carries, scored by an
    in-process RaterSession: what a server must answer."""
    from noiserater.core.selection import SelectionPlan

    plan = SelectionPlan.for_candidates(candidates, keep, rule, temperature)
    return plan.select(session.score, session.info, x0, t, candidates, seed)
