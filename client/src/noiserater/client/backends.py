"""Where a NoiseSelector's choice is made: in-process with onnxruntime (`LocalBackend`) or on a rater
server (`RemoteBackend`). Both take a `SelectionPlan` and the drawn candidates as numpy arrays and return
the chosen indices [B, keep]; `version` is the model version that answered last (0 in-process).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from noiserater.client.channel import RaterChannel
from noiserater.client.transports import open_transport
from noiserater.core import codec, scoring
from noiserater.core.selection import SelectionPlan


class SelectorError(ValueError):
    pass


class LocalBackend:
    def __init__(self, onnx_path: str | Path, device: str = "cpu", intra_op_threads: int = 0):
        path = Path(onnx_path)
        if not path.is_file():
            raise SelectorError(f"rater file not found: {path}")
        self.session = scoring.RaterSession(path, device=device, intra_op_threads=intra_op_threads)
        self.version = 0

    def choose(self, plan: SelectionPlan, x0, t, candidates, seed) -> np.ndarray:
        indices, _ = plan.select(self.session.score, self.session.info, x0, t, candidates, seed)
        return indices


class RemoteBackend:
    """SelectNoise requests for `model` (`version` 0 = the server's default) over `transport` on `channel`,
    each with the channel's deadline. Owns the channel: `close` closes both."""

    def __init__(self, channel: RaterChannel, model: str, dataset: str, version: int, max_attempts: int,
                 transport: str = "stream"):
        from noiserater.core.v1 import rater_service_pb2 as pb

        self._pb = pb
        self.channel = channel
        self.transport = open_transport(transport, channel, max_attempts)
        self.model_ref = pb.ModelRef(name=model, version=version)
        self.dataset = dataset
        self.version = 0

    def choose(self, plan: SelectionPlan, x0, t, candidates, seed) -> np.ndarray:
        request = self._pb.SelectNoiseRequest(
            model=self.model_ref,
            dataset=self.dataset,
            x0=codec.encode(x0),
            t=codec.encode(t),
            candidates=codec.encode(candidates),
            keep=plan.keep,
            rule=plan.rule.to_proto(),
            temperature=plan.temperature,
            seed=seed,
        )
        response = self.transport.select(request, self.channel.timeout_s)
        self.version = response.model.version
        return np.array(codec.decode(response.indices, "indices"))

    def close(self) -> None:
        self.transport.close()
        self.channel.close()
