"""CircuitBreaker: how the remote selector stops paying for an outage at every training step.

Closed, every selection asks the server. After `failures` consecutive outage failures (each one already
the transport's whole retry budget) it opens: selections go straight to the fallback, without an RPC,
while a background thread probes the server (`probe()`, every `interval_s`) and closes the breaker when
the probe says the server is back. The first selection after that is a trial: one more outage failure
reopens the breaker at once, and the probe then waits twice as long before its first try (up to
`MAX_HOLD_S`), so a server that answers probes but not selections costs a step's deadline only now and
then; a served selection resets both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("noiserater.selector")

MAX_HOLD_S = 30.0


class CircuitBreaker:
    def __init__(self, probe: Callable[[], bool], name: str, failures: int = 2, interval_s: float = 0.25):
        if failures < 1:
            raise ValueError(f"breaker_failures: must be >= 1, got {failures}")
        self._probe = probe
        self.name = name
        self.failures = failures
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consecutive = 0
        self._hold_s = interval_s
        self._trial = False  # closed by a probe, and no selection served since
        self.opened_at = 0.0
        self.is_open = False
        self.reason = ""
        self.trips = 0
        self.probes = 0

    def counts(self) -> dict[str, int]:
        return {"breaker_open": int(self.is_open), "breaker_trips": self.trips, "probes": self.probes}

    def succeeded(self) -> None:
        with self._lock:
            self._consecutive, self._trial = 0, False
            self._hold_s = self.interval_s

    def failed(self, reason: str) -> None:
        """One outage failure of a selection; opens the breaker at the `failures`-th in a row."""
        with self._lock:
            self._consecutive += 1
            if self.is_open or self._consecutive < self.failures:
                return
        self.open(reason)

    def open(self, reason: str) -> None:
        """Open now (also how a selector starts when the server cannot be reached) and start probing."""
        with self._lock:
            if self.is_open or self._stop.is_set():
                return
            if self._trial:  # the probe said the server was back, but the first selection failed
                self._hold_s = min(MAX_HOLD_S, self._hold_s * 2)
            self.is_open, self.reason, self.opened_at = True, reason, time.monotonic()
            self.trips += 1
            hold = self._hold_s
            self._thread = threading.Thread(target=self._run, args=(hold,), name="rater-probe", daemon=True)
            self._thread.start()
        log.warning("rater server at %s unavailable (%s): selections use the fallback, without calling it, "
                    "until a probe finds it serving", self.name, reason)

    def _run(self, hold_s: float) -> None:
        if self._stop.wait(hold_s):
            return
        while True:
            with self._lock:
                self.probes += 1
            try:
                healthy = self._probe()
            except Exception:  # a probe must never end the thread with the breaker open
                log.exception("rater server probe failed")
                healthy = False
            if healthy:
                self._close()
                return
            if self._stop.wait(self.interval_s):
                return

    def _close(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self.is_open, self._trial = False, True
            self._consecutive = self.failures - 1  # one more outage failure reopens the breaker
            outage_s = time.monotonic() - self.opened_at
        log.warning("rater server at %s is serving again after %.1f s: selections are sent to it", self.name,
                    outage_s)

    def close(self) -> None:
        """Stop probing (the selector is closing); `join` waits for a probe in flight."""
        self._stop.set()

    def join(self, timeout_s: float = 5.0) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout_s)
