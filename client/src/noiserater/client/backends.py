"""Where a NoiseSelector's choice is made: in-process with onnxruntime (`LocalBackend`) or on a rater
server (`RemoteBackend`). Both take a `SelectionPlan` and the drawn candidates as numpy arrays and return
the chosen indices [B, keep]; `version` is the model version that answered last (0 in-process).

A remote failure is one of two kinds (`remote_failure`):
- an outage, `ServerOutage`, which the selector answers with its fallback: UNAVAILABLE (no connection, a
  broken stream, a draining server), DEADLINE_EXCEEDED, CANCELLED (a server stopping mid-call) and
  RESOURCE_EXHAUSTED when the server's queue is full (an overloaded server; falling back sheds its load);
- everything else is a mistake that no retry or fallback can mend, raised as `SelectorError`: NOT_FOUND
  (a typo in the model name), UNAUTHENTICATED / PERMISSION_DENIED (the token), a TLS handshake that fails
  (untrusted certificate, TLS against plaintext), INVALID_ARGUMENT, FAILED_PRECONDITION (a model the
  server cannot use), any other RESOURCE_EXHAUSTED (a request over a server limit), UNIMPLEMENTED, ...
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from noiserater.client.breaker import CircuitBreaker
from noiserater.client.channel import SERVING, RaterChannel
from noiserater.client.transports import RemoteError, open_transport
from noiserater.core import codec, scoring
from noiserater.core.selection import SelectionPlan

OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED})
PROBE_TIMEOUT_S = 0.5
MAX_DETAILS = 300


class SelectorError(ValueError):
    pass


class ServerOutage(Exception):
    """The rater server could not answer (see the module doc): the selector falls back."""


def _short(details: str) -> str:
    line = " ".join(details.split())
    return line if len(line) <= MAX_DETAILS else line[:MAX_DETAILS] + "..."


def remote_failure(exc: grpc.RpcError | RemoteError, target: str, model: str) -> SelectorError | ServerOutage:
    """What a failed call to the rater server at `target` for `model` means (see the module doc)."""
    code = exc.code()
    details = _short(exc.details() or "")
    status = f"{code.name}: {details}"
    if code in OUTAGE_CODES and "SSL_ERROR_SSL" not in details:
        return ServerOutage(status)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details and "is full" in details:
        return ServerOutage(status)
    if code in OUTAGE_CODES:
        return SelectorError(f"tls: the rater server at {target} failed the TLS handshake ({status}); "
                             "check tls_root_cert (the server's CA certificate) and that the server serves TLS")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return SelectorError(f"token: the rater server at {target} refused the token ({status}); pass token=...")
    if code == grpc.StatusCode.NOT_FOUND:
        return SelectorError(f"model: the rater server at {target} has no {model} ({status})")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return SelectorError(f"rater server rejected the request: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return SelectorError(f"model: the rater server at {target} cannot use {model} ({status})")
    return SelectorError(f"rater server at {target} failed the selection ({status})")


@dataclass(frozen=True)
class Expectation:
    """What the job expects of the model's data shape, timestep count and training objective (None: anything);
    `source` says where it comes from."""

    source: str
    data_shape: tuple[int, ...] | None = None
    num_timesteps: int | None = None
    objective: str | None = None

    def check(self, info: scoring.RaterInfo, what: str) -> None:
        if self.data_shape is not None and tuple(self.data_shape) != tuple(info.data_shape):
            raise SelectorError(f"data_shape: {what} takes data of shape {list(info.data_shape)}, "
                                f"not {list(self.data_shape)} as {self.source} expects")
        if self.num_timesteps is not None and self.num_timesteps != info.num_timesteps:
            raise SelectorError(f"num_timesteps: {what} has {info.num_timesteps} timesteps, "
                                f"not {self.num_timesteps} as {self.source} expects")
        if self.objective is not None and self.objective != info.objective:
            expected = scoring.TIME_CONVENTIONS.get(self.objective)
            raise SelectorError(f"objective: {what} was trained for the {info.objective} objective "
                                f"({info.time_convention}), not {self.objective}"
                                f"{f' ({expected})' if expected else ''} as {self.source} expects; use a rater "
                                f"trained with `nrctl train-rater --objective {self.objective}`")


class LocalBackend:
    """Scores in this process. onnxruntime's threads do not spin between selections: the training step that
    runs between them needs the cores."""

    def __init__(self, onnx_path: str | Path, device: str = "cpu", intra_op_threads: int = 0):
        path = Path(onnx_path)
        if not path.is_file():
            raise SelectorError(f"rater file not found: {path}")
        self.session = scoring.RaterSession(path, device=device, intra_op_threads=intra_op_threads,
                                            allow_spinning=False)
        self.version = 0

    def choose(self, plan: SelectionPlan, x0, t, candidates, seed) -> np.ndarray:
        indices, _ = plan.select(self.session.score, self.session.info, x0, t, candidates, seed)
        return indices


class RemoteBackend:
    """SelectNoise requests for `model` (`version` 0 = the server's default) over `transport` on `channel`,
    each with the channel's deadline, behind a `CircuitBreaker`. Owns the channel: `close` closes both.

    On construction it asks the server for the model's metadata (within `connect_timeout_s`): a mistake
    raises SelectorError (an unknown model, the token, TLS, a data shape or timestep count other than each
    of `expect`); an outage does not: the backend starts with its breaker open, and the probe checks the
    model once the server serves. A mistake the probe finds is raised by the next selection."""

    def __init__(self, channel: RaterChannel, model: str, dataset: str, version: int, max_attempts: int,
                 transport: str = "stream", *, expect: Sequence[Expectation] = (), connect_timeout_s: float = 2.0,
                 breaker_failures: int = 2, probe_interval_s: float = 0.25):
        from noiserater.core.v1 import rater_service_pb2 as pb

        self._pb = pb
        self.channel = channel
        self.transport = open_transport(transport, channel, max_attempts)
        self.model_ref = pb.ModelRef(name=model, version=version)
        self.model = f"model {model!r}" + (f" version {version}" if version else "")
        self.dataset = dataset
        self.version = 0
        self.expect = list(expect)
        self.connect_timeout_s = connect_timeout_s
        self.info: scoring.RaterInfo | None = None
        self.problem: SelectorError | None = None  # a mistake the probe found, raised by the next selection
        self.requests = self.served = self.outages = 0
        self._counts_lock = threading.Lock()  # selections may run on several threads at once
        self.breaker = CircuitBreaker(self._probe, channel.target, breaker_failures, probe_interval_s)
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    # -- checking the model -----------------------------------------------------------------------
    def _failure(self, exc: grpc.RpcError | RemoteError, tls_check: bool = False) -> SelectorError | ServerOutage:
        """What `exc` means (see `remote_failure`). With `tls_check`, an UNAVAILABLE is checked for a TLS
        mismatch, which gRPC reports as such (a TLS server closes a plaintext client's connections; which
        address's failure the details name varies): one TLS handshake tells them apart."""
        failure = remote_failure(exc, self.channel.target, self.model)
        if not tls_check or not isinstance(failure, ServerOutage) or exc.code() != grpc.StatusCode.UNAVAILABLE:
            return failure
        verdict, why = self.channel.tls_handshake(PROBE_TIMEOUT_S)
        where = f"the rater server at {self.channel.target}"
        if self.channel.tls_root_cert is None and verdict == "tls":
            return SelectorError(f"tls: {where} serves TLS; pass tls_root_cert= (its CA certificate)")
        if self.channel.tls_root_cert is not None and verdict == "plaintext":
            return SelectorError(f"tls: {where} does not serve TLS ({_short(why)}); leave tls_root_cert out")
        if self.channel.tls_root_cert is not None and verdict == "untrusted":
            return SelectorError(f"tls: {where} presents a certificate that tls_root_cert does not trust "
                                 f"({_short(why)})")
        return failure

    def _metadata(self, timeout_s: float) -> SelectorError | ServerOutage | None:
        """Ask for the model's metadata and check it: None when it is the model the job expects."""
        try:
            response = self.channel.call("GetModelMetadata", self._pb.GetModelMetadataRequest(model=self.model_ref),
                                         timeout_s)
        except grpc.RpcError as exc:
            return self._failure(exc, tls_check=True)
        what = f"model {response.model.name!r} version {response.model.version} on {self.channel.target}"
        try:
            info = scoring.RaterInfo.from_metadata(dict(response.metadata))
            for expectation in self.expect:
                expectation.check(info, what)
        except scoring.ScoringError as exc:
            return SelectorError(f"model: {what} cannot be checked: {exc}")
        except SelectorError as exc:
            return exc
        self.info = info
        return None

    def _connect(self) -> None:
        problem = self._metadata(self.connect_timeout_s)
        if isinstance(problem, SelectorError):
            raise problem
        if isinstance(problem, ServerOutage):
            self.breaker.open(f"{problem} (at start; the model is checked once it serves)")

    def _probe(self) -> bool:
        """True once the server serves again (the breaker closes): its health is SERVING (or it has no
        health service) and it answered for the model, whose check may have found a mistake."""
        try:
            serving = self.channel.health(PROBE_TIMEOUT_S) == SERVING
        except grpc.RpcError as exc:
            problem = self._failure(exc, tls_check=True)
            if isinstance(problem, ServerOutage):
                return False
            if isinstance(problem, SelectorError) and problem.args[0].startswith("tls:"):
                self.problem = problem
                return True
            serving = True  # no grpc health here: the model's metadata answers for the server
        if not serving:
            return False
        problem = self._metadata(self.connect_timeout_s)
        if isinstance(problem, ServerOutage):
            return False
        self.problem = problem
        return True

    # -- selecting -------------------------------------------------------------------------------
    def admit(self, shape: Sequence[int]) -> bool:
        """Raises the mistake a selection of x0 with `shape` would meet (a data shape other than the model's
        or the job's, a problem the probe found); then True when the server is to be asked, False while
        the breaker is open."""
        if self.problem is not None:
            raise self.problem
        expected = self.info.data_shape if self.info is not None else next(
            (e.data_shape for e in self.expect if e.data_shape is not None), None)
        if expected is not None and tuple(shape[1:]) != tuple(expected):
            what = f"{self.model} on {self.channel.target}" if self.info is not None else "the job's data_shape="
            raise SelectorError(f"x0: shape {list(shape)} does not match [B, *{list(expected)}] of {what}")
        return not self.breaker.is_open

    def choose(self, plan: SelectionPlan, x0, t, candidates, seed) -> np.ndarray:
        if self.problem is not None:
            raise self.problem
        if self.breaker.is_open:
            raise ServerOutage(self.outage)
        request = self._pb.SelectNoiseRequest(model=self.model_ref, dataset=self.dataset, keep=plan.keep,
                                              rule=plan.rule.to_proto(), temperature=plan.temperature, seed=seed)
        # Filled in place: a Tensor message built first would be copied, bytes and all, into the request.
        codec.encode_into(request.x0, x0)
        codec.encode_into(request.t, t)
        codec.encode_into(request.candidates, candidates)
        with self._counts_lock:
            self.requests += 1
        try:
            response = self.transport.select(request, self.channel.timeout_s)
        except (grpc.RpcError, RemoteError) as exc:
            failure = self._failure(exc)
            if isinstance(failure, ServerOutage):
                with self._counts_lock:
                    self.outages += 1
                self.breaker.failed(str(failure))
            raise failure from None
        self.breaker.succeeded()
        with self._counts_lock:
            self.served += 1
        self.version = response.model.version
        return np.array(codec.decode(response.indices, "indices"))

    # -- state -----------------------------------------------------------------------------------
    @property
    def outage(self) -> str:
        """Why the breaker is open (the failure that opened it); empty while it is closed."""
        return self.breaker.reason if self.breaker.is_open else ""

    def counts(self) -> dict[str, int]:
        """Selections sent to the server (`requests`), answered (`served`), failed by an outage (`outages`),
        and the breaker's state: `breaker_open` (1 while open), `breaker_trips`, `probes`."""
        with self._counts_lock:
            mine = {"requests": self.requests, "served": self.served, "outages": self.outages}
        return {**mine, **self.breaker.counts()}

    def health(self) -> dict[str, Any]:
        breaker = self.breaker
        return {
            "target": self.channel.target,
            "model": self.model,
            "checked": self.info is not None,
            "serving": not breaker.is_open and self.problem is None,
            "breaker_open": breaker.is_open,
            "reason": breaker.reason if breaker.is_open else "",
            "open_for_s": round(time.monotonic() - breaker.opened_at, 3) if breaker.is_open else 0.0,
            "problem": str(self.problem) if self.problem is not None else "",
        }

    def close(self) -> None:
        self.breaker.close()
        self.transport.close()
        self.channel.close()  # ends a probe's call in flight
        self.breaker.join()
        self.channel.close()  # the channel a probe may have reopened meanwhile
