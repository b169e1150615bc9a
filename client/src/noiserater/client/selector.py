"""NoiseSelector: the one line a training job changes (`eps = selector.select(x0, t)`).

`NoiseSelector.local(onnx)` scores in-process with onnxruntime; `NoiseSelector.remote(target, model=...)`
asks a rater server. Both draw the K candidates here and both choose through `noiserater.core.scoring`, so
for the same generator state (or the same seed) they return the same noise, bit for bit.
`NoiseSelector.peer(name)` puts a peer method (a registered noise source: uniform, immiscible,
immiscible-knn, min-snr) behind the same interface (select, prefetch, counters, close).

`num_candidates` is the number of candidates K drawn per sample; one of them is kept per sample:
- "argmax": the best-scoring of the K;
- "sample": one drawn from softmax(score / temperature) over the K;
- "assign": K is ignored; the batch's B Gaussian noises are permuted over the samples to maximise
  the summed score (batch-level assignment), so the multiset of noises stays i.i.d. Gaussian.
The constructors and `select` / `prefetch` still take K as `k=`, the name it had before, so code written
against it keeps working; `k=` warns (DeprecationWarning) and is the same as `num_candidates=`.

A selector is a noise source (`noiserater.client.sources.NoiseSource`): `sample(x0, t, step)` is
`select(x0, t)` and `loss_weights(t)` is None for a rater (a peer's own weights for a peer).

Where the randomness comes from (the candidates, and for rule "sample" the seed of the call's draw):
- by default (no `seed`, no `generator`) torch's global generator of x0's device, as `torch.randn_like(x0)`
  does: `torch.manual_seed` governs it, and each rank's own seeding (DDP, accelerate's `set_seed`) applies;
- `generator=`: that torch.Generator (candidates drawn on its device, then moved to x0's);
- `seed=N`: the selector's own generator per device, seeded with N for reproducible standalone use; when
  `torch.distributed` is initialised (looked up at the first selection) it is seeded with N + rank, so ranks
  draw distinct streams, unless `rank_distinct=False` (every rank then draws the same noise).
With a generator (global or given) the call's seed for rule "sample" is one int64 drawn from that generator
after the candidates; with `seed=` it is `(S * 1_000_003 + call) mod 2**63`, S the seed used (N or N + rank)
and call the selector's call count from 0. Either way it differs between ranks and streams.

The remote selector fails closed on mistakes and falls back on outages (`noiserater.client.backends`):
- a mistake raises SelectorError, at construction where it can be found there: `remote` asks the server
  for the model's metadata, so a typo in the model name, a wrong or missing token, a TLS mismatch, or a
  model whose data shape, timestep count or objective differs from `data_shape=` / `num_timesteps=` /
  `objective=` (or from the fallback rater's) raises before training starts (`local(objective=)` checks
  its rater file the same way); a selection whose x0 does not have the model's shape
  raises even while the server is down;
- an outage (the server down, unreachable, draining, overloaded, too slow for the deadline) never
  stalls training: each selection has a deadline, UNAVAILABLE is retried with backoff, and then the
  selection falls back to the local ONNX rater (`fallback_onnx`) or to plain Gaussian noise. After
  `breaker_failures` outage failures in a row a circuit breaker (`noiserater.client.breaker`) opens:
  selections fall back at once, with no RPC, while a background probe watches the server's health and
  closes the breaker when it serves again. A server that cannot be reached at construction is no
  error: the selector starts with the breaker open and checks the model when the server comes.
`selector.counters` counts selections, each kind of fallback and (remote) the server's side: requests
sent, served, outage failures, `breaker_open` (1 while open), `breaker_trips` and `probes`;
`selector.health()` says where selections come from now. Fallbacks are logged at most every 10 s.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noiserater.client.backends import Expectation, LocalBackend, RemoteBackend, SelectorError, ServerOutage
from noiserater.core import scoring
from noiserater.core.selection import Rule, SelectionPlan

__all__ = ["NoiseSelector", "SelectorError", "selection_stats"]

log = logging.getLogger("noiserater.selector")
LOG_EVERY_S = 10.0  # at most one fallback report per this period


def selection_stats(eps: torch.Tensor, x0: torch.Tensor) -> dict[str, float]:
    """Mean ||eps||^2 / d and mean cosine(eps, x0) of a selection (1.0 and ~0 for Gaussian noise)."""
    e = eps.detach().flatten(1).float()
    x = x0.detach().flatten(1).float()
    cosine = torch.nn.functional.cosine_similarity(e, x, dim=1, eps=1e-8)
    return {"sq_norm_per_dim": float(e.pow(2).mean()), "cosine_with_x0": float(cosine.mean())}


def _accepts_k(func: Callable) -> Callable:
    """`func(..., k=K)` is `func(..., num_candidates=K)` with a DeprecationWarning (K's name before)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "k" in kwargs:
            if "num_candidates" in kwargs:
                raise TypeError(f"{func.__qualname__}: give num_candidates, not both it and k")
            warnings.warn(f"{func.__qualname__}(k=...) is deprecated; use num_candidates=...", DeprecationWarning,
                          stacklevel=2)
            kwargs["num_candidates"] = kwargs.pop("k")
        return func(*args, **kwargs)

    return wrapper


def _check_num_candidates(num_candidates: int) -> None:
    if num_candidates < 1:
        raise SelectorError(f"num_candidates: the number of candidates must be >= 1, got {num_candidates}")


def _as_timesteps(t: Any, x0: torch.Tensor) -> torch.Tensor:
    """`t` as a tensor: a tensor as given, a sequence of ints (or an int array) as an int64 tensor on x0's
    device."""
    if isinstance(t, torch.Tensor):
        return t
    try:
        return torch.as_tensor(t, dtype=torch.int64, device=x0.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SelectorError(f"t: expected a tensor or a sequence of ints, got {type(t).__name__} ({exc})") from None


def _like(eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """`eps` with x0's dtype and memory format (channels-last stays channels-last, as with randn_like)."""
    if x0.is_contiguous() or x0.ndim != eps.ndim:
        return eps.to(dtype=x0.dtype)
    out = torch.empty_like(x0)
    out.copy_(eps)
    return out


def _gather(candidates: torch.Tensor, chosen: np.ndarray) -> torch.Tensor:
    """candidates[b, chosen[b]] for every b, as one index_select over the [B * K, ...] rows (a copy of the
    same values, cheaper than advanced indexing with two index tensors)."""
    batch, num = candidates.shape[:2]
    rows = torch.from_numpy(chosen).to(candidates.device) + torch.arange(0, batch * num, num, device=candidates.device)
    return candidates.reshape(batch * num, *candidates.shape[2:]).index_select(0, rows)


def distributed_rank() -> int | None:
    """This process's rank when torch.distributed is initialised, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


def stream_seed(seed: int, rank_distinct: bool = True) -> int:
    """The seed a `seed=` selector seeds its generators with: `seed + rank` when torch.distributed is
    initialised and `rank_distinct`, else `seed`."""
    rank = distributed_rank() if rank_distinct else None
    return seed if rank is None else seed + rank


def default_generator(device: torch.device | str) -> torch.Generator:
    """torch's global generator of `device` (the one `torch.randn(..., device=device)` draws from)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    raise SelectorError(f"device: no global generator known for {device}; give generator= or seed=")


def _check_objective(objective: str | None) -> None:
    if objective is not None and objective not in scoring.OBJECTIVES:
        raise SelectorError(f"objective: {objective!r} is not one of {', '.join(scoring.OBJECTIVES)}")


def _check_batch(x0: torch.Tensor, t: torch.Tensor) -> None:
    if x0.ndim < 1 or t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise SelectorError(f"t: shape {list(t.shape)} does not match x0's batch {list(x0.shape[:1])}")


class NoiseSelector:
    """Draws K candidate noises per sample and keeps the one the rater prefers (see module doc)."""

    @_accepts_k
    def __init__(self, backend: Any, num_candidates: int = 8, rule: str = "argmax", temperature: float = 1.0,
                 seed: int | None = None, fallback: LocalBackend | None = None, *,
                 generator: torch.Generator | None = None, rank_distinct: bool = True):
        if seed is not None and generator is not None:
            raise SelectorError("seed, generator: give one of them, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise SelectorError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        try:
            rule = Rule.parse(rule)
        except scoring.ScoringError as exc:
            raise SelectorError(str(exc)) from None
        _check_num_candidates(num_candidates)
        self.backend = backend
        self.num_candidates = num_candidates
        self.rule = rule
        self.temperature = temperature
        self.seed = seed
        self.generator = generator
        self.rank_distinct = rank_distinct
        self._seed_used: int | None = None  # seed + rank, fixed at the first selection
        self.fallback = fallback
        self.calls = 0
        self._counts = {"selections": 0, "fallback_local": 0, "fallback_gaussian": 0}
        self._unreported = 0
        self._reported_at = -LOG_EVERY_S
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last selection's (eps, x0)
        self._last_stats: dict[str, float] | None = None
        self._generators: dict[str, torch.Generator] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, int, Future] | None = None
        self._lock = threading.Lock()

    # -- constructors ---------------------------------------------------------------------------------
    @classmethod
    @_accepts_k
    def local(cls, onnx_path: str | Path, num_candidates: int = 8, rule: str = "argmax", temperature: float = 1.0,
              seed: int | None = None, device: str = "cpu", intra_op_threads: int = 0, *,
              generator: torch.Generator | None = None, rank_distinct: bool = True,
              objective: str | None = None) -> NoiseSelector:
        """Score in-process with onnxruntime (`device` picks its execution provider; `intra_op_threads`
        0 = onnxruntime's default pool, 1 = no pool, which is faster for small raters on a busy CPU).
        `seed`, `generator`, `rank_distinct`: where the candidates come from (see the module doc).
        `objective` ("eps" or "flow"), when given, must be the one the rater was trained for (a rater file
        that names none is an eps rater); SelectorError otherwise."""
        _check_objective(objective)
        backend = LocalBackend(onnx_path, device, intra_op_threads)
        Expectation("the job", objective=objective).check(backend.session.info, f"the rater {onnx_path}")
        return cls(backend, num_candidates, rule, temperature, seed, generator=generator,
                   rank_distinct=rank_distinct)

    @classmethod
    @_accepts_k
    def remote(cls, target: str | Sequence[str], model: str, dataset: str = "", num_candidates: int = 8,
               rule: str = "argmax", temperature: float = 1.0, seed: int | None = None, version: int = 0,
               timeout_s: float = 5.0, max_attempts: int = 4, fallback_onnx: str | Path | None = None,
               token: str | None = None, tls_root_cert: bytes | None = None, round_robin: bool = False,
               transport: str = "stream", data_shape: int | Sequence[int] | None = None,
               num_timesteps: int | None = None, connect_timeout_s: float = 2.0,
               breaker_failures: int = 2, generator: torch.Generator | None = None,
               rank_distinct: bool = True, objective: str | None = None) -> NoiseSelector:
        """Ask the rater server at `target` (one channel, kept open; several addresses, as a list or
        comma-separated, are balanced with gRPC's round_robin, see `noiserater.client.channel`). `version` 0
        = the server's default. `transport` "stream" sends every selection over one SelectNoiseStream
        (cheaper per request for both sides, see `noiserater.client.transports`; with several servers the
        stream goes to one of them, a retry's new stream perhaps to another); "unary" makes one SelectNoise
        call per selection, each balanced.

        Construction asks the server for the model within `connect_timeout_s` and raises SelectorError on
        a mistake (see the module doc); `data_shape` (x0's shape without the batch axis),
        `num_timesteps` and `objective` ("eps" or "flow": what the job's model predicts; a rater that names
        none is an eps rater), when given, must be the model's. `breaker_failures` outage failures in a row open
        the circuit breaker. `seed`, `generator`, `rank_distinct`: where the candidates come from (see the
        module doc)."""
        from noiserater.client.channel import ChannelError, RaterChannel
        from noiserater.client.transports import TRANSPORTS

        if transport not in TRANSPORTS:
            raise SelectorError(f"transport: {transport!r} is not one of {', '.join(TRANSPORTS)}")
        if breaker_failures < 1:
            raise SelectorError(f"breaker_failures: must be >= 1, got {breaker_failures}")
        _check_objective(objective)
        if isinstance(data_shape, int):
            data_shape = (data_shape,)
        job = Expectation("the job", None if data_shape is None else tuple(int(d) for d in data_shape),
                          num_timesteps, objective)
        fallback = LocalBackend(fallback_onnx) if fallback_onnx is not None else None
        expect = [job]
        if fallback is not None:
            job.check(fallback.session.info, f"the fallback_onnx rater {fallback_onnx}")
            info = fallback.session.info
            expect.append(Expectation("the fallback_onnx rater", info.data_shape, info.num_timesteps, info.objective))
        try:
            # The unary transport retries UNAVAILABLE at least once (gRPC's retry policy needs two attempts).
            channel = RaterChannel(target, token=token, tls_root_cert=tls_root_cert, timeout_s=timeout_s,
                                   max_attempts=max(2, max_attempts), round_robin=round_robin)
        except ChannelError as exc:
            raise SelectorError(str(exc)) from None
        backend = RemoteBackend(channel, model, dataset, version, max_attempts, transport, expect=expect,
                                connect_timeout_s=connect_timeout_s, breaker_failures=breaker_failures)
        return cls(backend, num_candidates, rule, temperature, seed, fallback, generator=generator,
                   rank_distinct=rank_distinct)

    @classmethod
    @_accepts_k
    def peer(cls, name: str, num_candidates: int = 8, seed: int | None = None, device: str = "cpu", *,
             generator: torch.Generator | None = None, rank_distinct: bool = True, **options: Any) -> NoiseSelector:
        """A peer method behind the selector's interface: the noise source registered as `name` in
        `noiserater.client.sources` (uniform, immiscible, immiscible-knn, min-snr, ...), built by
        `make_source` with a generator, `num_candidates` and `options` (min-snr takes `snr`, a function
        t -> snr(t), and `gamma`). The generator is `generator` if given, else one on `device` seeded with
        `seed` (+ rank under torch.distributed unless `rank_distinct=False`), else torch's global generator of
        `device`."""
        from noiserater.client import sources
        from noiserater.client.peer_selector import PeerSelector

        _check_num_candidates(num_candidates)
        if seed is not None and generator is not None:
            raise SelectorError("seed, generator: give one of them, not both")
        if generator is None:
            generator = (default_generator(device) if seed is None
                         else torch.Generator(device=device).manual_seed(stream_seed(seed, rank_distinct)))
        try:
            source = sources.make_source(name, generator=generator, num_candidates=num_candidates, **options)
        except sources.SourceError as exc:
            raise SelectorError(str(exc)) from None
        return PeerSelector(source, num_candidates, seed)

    @property
    def counters(self) -> dict[str, int]:
        """Selections made, `fallback_local` / `fallback_gaussian` (selections the fallback made) and, for a
        remote selector, `requests`, `served`, `outages`, `breaker_open`, `breaker_trips`, `probes` (see
        `RemoteBackend.counts`). A snapshot."""
        counts = getattr(self.backend, "counts", None)
        with self._lock:
            mine = dict(self._counts)
        return {**mine, **counts()} if counts is not None else mine

    def health(self) -> dict[str, Any]:
        """Where selections come from now: for a remote selector its target and model, `checked` (the
        model's metadata was checked), `serving` (selections go to the server), `breaker_open` with its
        `reason` and `open_for_s`, and a `problem` the next selection will raise; `fallback` ("local",
        "gaussian"); and the counters."""
        remote = getattr(self.backend, "health", None)
        state = remote() if remote is not None else {"serving": True}
        fallback = "local" if self.fallback is not None else "gaussian"
        return {**state, "fallback": fallback, "counters": self.counters}

    @property
    def is_remote(self) -> bool:
        """Whether selections go to a rater server (`NoiseSelector.remote`)."""
        return isinstance(self.backend, RemoteBackend)

    @property
    def session(self) -> scoring.RaterSession | None:
        """The in-process onnxruntime session (None for a remote selector)."""
        return getattr(self.backend, "session", None)

    @property
    def info(self) -> scoring.RaterInfo | None:
        """What the rater says about itself (`data_shape`, `num_timesteps`, `dataset`, `schedule`,
        `objective`): the local rater's; for a remote selector the server model's once checked, else the
        fallback rater's, else None; None for a peer."""
        session = self.session
        if session is not None:
            return session.info
        info = getattr(self.backend, "info", None)
        if info is None and self.fallback is not None:
            info = self.fallback.session.info
        return info

    # -- selection ------------------------------------------------------------------------------------
    @property
    def seed_used(self) -> int | None:
        """The seed this selector's generators are seeded with (`seed`, or `seed + rank` under
        torch.distributed); None when it draws from a generator. Fixed at the first selection."""
        if self.seed is None:
            return None
        if self._seed_used is None:
            self._seed_used = stream_seed(self.seed, self.rank_distinct)
        return self._seed_used

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The generator draws for x0 on `device` come from (the draws happen on its device); None: torch's
        global generator of `device`."""
        if self.generator is not None:
            return self.generator
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed_used)
        return self._generators[key]

    def _randn(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        gen = self._generator(device)
        on = device if gen is None else gen.device
        return torch.randn(tuple(shape), generator=gen, device=on, dtype=torch.float32).to(device)

    def _call_seed(self, device: torch.device) -> int:
        """The seed of this call's draw for rule "sample" (see the module doc); the caller counts the call."""
        if self.seed is not None:
            return (self.seed_used * 1_000_003 + self.calls) % (2**63)
        if self.rule is not Rule.SAMPLE:
            return self.calls  # unused: only "sample" draws, so the generator is left alone
        gen = self._generator(device)
        on = device if gen is None else gen.device
        return int(torch.randint(0, 2**63 - 1, (1,), generator=gen, device=on).item())

    def draw_candidates(self, x0: torch.Tensor, num_candidates: int) -> torch.Tensor:
        """[B, K, ...] standard Gaussian candidates on x0's device (float32), from the selector's generator."""
        return self._randn((x0.shape[0], num_candidates, *x0.shape[1:]), x0.device)

    def _start(self, x0: torch.Tensor, t: torch.Tensor, num_candidates: int | None) -> Callable[[], Any]:
        """Everything that must happen in call order (checks, drawing the candidates, the call's seed), and
        the rest as a function that `select` runs now or `prefetch` in the background; `_finish` takes
        its result."""
        t = _as_timesteps(t, x0)
        _check_batch(x0, t)
        num = 1 if self.rule is Rule.ASSIGN else (self.num_candidates if num_candidates is None else num_candidates)
        _check_num_candidates(num)
        admit = getattr(self.backend, "admit", None)
        if admit is not None and not admit(x0.shape) and self.fallback is None:
            # The breaker is open and there is no local rater: the step costs what torch.randn does. (The
            # generator then moves on by B noises instead of B x K candidates.)
            noise = self._randn(x0.shape, x0.device)
            self.calls += 1
            self._fell_back("fallback_gaussian", self.backend.outage)
            return lambda: (noise.unsqueeze(1), None)
        candidates = self.draw_candidates(x0, num)
        seed = self._call_seed(x0.device)
        self.calls += 1
        x0_np = x0.detach().to("cpu", torch.float32).numpy()
        t_np = t.detach().to("cpu", torch.int64).numpy()
        cand_np = candidates.cpu().numpy()
        return lambda: (candidates, self._choose(x0_np, t_np, cand_np, seed))

    def _choose(self, x0_np, t_np, cand_np, seed) -> np.ndarray | None:
        """Chosen indices, or None when plain Gaussian noise (the first candidate) must do."""
        try:
            plan = SelectionPlan(cand_np.shape[1], 1, self.rule, self.temperature)
            return self.backend.choose(plan, x0_np, t_np, cand_np, seed)
        except scoring.ScoringError as exc:
            raise SelectorError(str(exc)) from None
        except ServerOutage as outage:
            reason = str(outage)
        if self.fallback is not None:
            self._fell_back("fallback_local", reason)
            return self.fallback.choose(plan, x0_np, t_np, cand_np, seed)
        self._fell_back("fallback_gaussian", reason)
        return None

    def _fell_back(self, kind: str, reason: str) -> None:
        """Count a fallback; report them at most every LOG_EVERY_S."""
        now = time.monotonic()
        with self._lock:
            self._counts[kind] += 1
            self._unreported += 1
            if now - self._reported_at < LOG_EVERY_S:
                return
            count, self._unreported, self._reported_at = self._unreported, 0, now
        using = "the local rater" if kind == "fallback_local" else "plain Gaussian noise"
        log.warning("rater server unavailable (%s): %d selection(s) used %s since the last report (%d in all)",
                    reason, count, using, self._counts[kind])

    def _finish(self, x0: torch.Tensor, result: tuple[torch.Tensor, np.ndarray | None]) -> torch.Tensor:
        candidates, indices = result
        if indices is None:
            eps = candidates[:, 0]
        elif self.rule is Rule.ASSIGN:
            perm = torch.from_numpy(indices[:, 0]).to(candidates.device)
            eps = candidates[:, 0][perm]
        else:
            eps = _gather(candidates, indices[:, 0])
        return self._count(_like(eps, x0), x0)

    def _count(self, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._counts["selections"] += 1
        self._last, self._last_stats = (eps, x0), None
        return eps

    @property
    def last_stats(self) -> dict[str, float]:
        """`selection_stats` of the last selection (empty before the first). Computed when first read, so a
        training loop that never reads it pays nothing (and, on a GPU, waits for nothing); read from the
        selection's own tensors, so edits made to them in place before the read show in it."""
        if self._last_stats is None:
            self._last_stats = selection_stats(*self._last) if self._last is not None else {}
        return self._last_stats

    @_accepts_k
    def select(self, x0: torch.Tensor, t: torch.Tensor | Sequence[int], *,
               num_candidates: int | None = None) -> torch.Tensor:
        """One selected noise per sample: same shape, device, dtype and memory format as x0 (as
        `torch.randn_like(x0)`). `t` is a tensor of B timesteps or a sequence of B ints. `num_candidates`
        overrides K for this call."""
        with self._lock:
            pending = self._pending
            self._pending = None
        if pending is not None and pending[0] == id(x0) and pending[1] == id(t):
            return self._finish(x0, pending[2].result())
        if pending is not None:
            self._discard(pending[2])
        return self._finish(x0, self._start(x0, t, num_candidates)())

    def _discard(self, prefetched: Future) -> None:
        """A prefetch that `select` was not called for: its result is dropped, unwaited (its candidates
        were drawn when it started, so nothing later depends on it)."""

    @_accepts_k
    def prefetch(self, x0: torch.Tensor, t: torch.Tensor | Sequence[int], *,
                 num_candidates: int | None = None) -> None:
        """Start selecting for (x0, t) in the background; the next `select(x0, t)` with these very
        tensors returns that result, so the rater's round trip overlaps the current training step."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noise-prefetch")
        future = self._pool.submit(self._start(x0, t, num_candidates))
        with self._lock:
            self._pending = (id(x0), id(t), future)

    # -- the NoiseSource interface --------------------------------------------------------------------
    def sample(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        """`select(x0, t)` (`step` is not used: the draws come from the selector's generator)."""
        return self.select(x0, t)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return None

    @property
    def model_version(self) -> int:
        """The model version that answered the last remote selection (0 for a local selector)."""
        return self.backend.version

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if hasattr(self.backend, "close"):
            self.backend.close()

    def __enter__(self) -> NoiseSelector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
