"""`--workers N`: N rater-server processes behind one port.

One Python process serves gRPC from one event loop, so its front end (receiving, decoding, answering) uses one
core at most; under many concurrent clients requests wait there, before the batcher has seen them, and batches
stay small. With N workers the kernel spreads the incoming connections over N processes that each bind the
port with SO_REUSEPORT, and each worker batches what reaches it. Every worker is a whole server (its own model
sessions, batchers, statistics store and /metrics port: --metrics-port + its index; share statistics through
--redis-url), except that `--instances` counts a model version's runs in flight over all workers
(shared_slots.py), so that more workers add front-end capacity, not onnxruntime runs. Since a deploy, unload
or default change would reach one worker only, the admin RPCs are refused (FAILED_PRECONDITION) while N > 1:
change the repository and restart instead.

The supervisor (the process started by the user) starts the workers with its configuration in their
environment (RATER_SERVER_*, so a Redis password stays out of argv), waits until every one has loaded its
models and bound the port, and only then lets them report SERVING: a readiness probe that passes means
every worker takes connections, so clients that connect then are spread over all of them. SIGTERM or SIGINT
is passed on to every worker, which drains as a single server does; if one worker exits on its own, the
others are stopped too and the supervisor exits non-zero, for the process manager to restart it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from noiserater.server.config import ENV_PREFIX, ConfigError, ServerConfig

WORKER_ENV = ENV_PREFIX + "WORKER"  # "<index>,<ready fd>,<go fd>,<shared slots dir>" in a worker's environment
ADMIN_REFUSED = ("admin RPCs are refused while the server runs several workers (--workers), each with its own "
                 "models: change the repository (picked up with --repository-poll-s) or restart, or run one worker")


@dataclasses.dataclass(frozen=True)
class WorkerHandshake:
    """A worker's side of the start-up handshake: say ready on one pipe, wait for the go on the other."""

    index: int
    ready_fd: int
    go_fd: int
    slots_dir: Path  # the run slots shared by the workers (shared_slots.py)

    @classmethod
    def from_environment(cls) -> WorkerHandshake | None:
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            return None
        index, ready_fd, go_fd, slots_dir = raw.split(",", 3)
        return cls(int(index), int(ready_fd), int(go_fd), Path(slots_dir))

    def ready(self) -> None:
        os.write(self.ready_fd, b"r")
        os.close(self.ready_fd)

    def wait_go(self) -> bool:
        """Block until the supervisor says go (True), or is gone (False)."""
        go = os.read(self.go_fd, 1)
        os.close(self.go_fd)
        return go == b"g"


def worker_environment(config: ServerConfig, index: int) -> dict[str, str]:
    """The RATER_SERVER_* variables that give a worker the supervisor's configuration."""
    env = {}
    for field in dataclasses.fields(ServerConfig):
        value = getattr(config, field.name)
        env[ENV_PREFIX + field.name.upper()] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    env[ENV_PREFIX + "REDIS_URL_FILE"] = ""  # already read into REDIS_URL
    env[ENV_PREFIX + "REUSE_PORT"] = "1"
    env[ENV_PREFIX + "METRICS_PORT"] = str(config.metrics_port + index if config.metrics_port else 0)
    return env


class Supervisor:
    def __init__(self, config: ServerConfig):
        if config.port == 0:
            raise ConfigError("--workers: the workers share one port; give --port (not 0)")
        self.config = config
        self.procs: list[subprocess.Popen] = []
        self.stopping = False

    def _signal(self, signum: int, _frame) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def _stop_all(self, signal_them: bool = True) -> None:
        self.stopping = True
        if signal_them:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
        deadline = time.monotonic() + self.config.grace_s + 30
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self) -> int:
        from noiserater.server.app import check_port_free

        config = self.config
        if not config.reuse_port:
            check_port_free(config.host, config.port)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signal)
        pipes = []
        slots_dir = tempfile.mkdtemp(prefix="rater-server-slots-")
        for index in range(config.workers):
            ready_r, ready_w = os.pipe()
            go_r, go_w = os.pipe()
            env = {**os.environ, **worker_environment(config, index),
                   WORKER_ENV: f"{index},{ready_w},{go_r},{slots_dir}"}
            self.procs.append(subprocess.Popen([sys.executable, "-m", "noiserater.server.main", "serve"], env=env,
                                               pass_fds=(ready_w, go_r)))
            os.close(ready_w)
            os.close(go_r)
            pipes.append((ready_r, go_w))
        try:
            return self._serve(pipes)
        finally:
            shutil.rmtree(slots_dir, ignore_errors=True)

    def _serve(self, pipes: list[tuple[int, int]]) -> int:
        config = self.config
        try:
            for index, (ready_r, _) in enumerate(pipes):
                if os.read(ready_r, 1) != b"r":  # the worker exited before it was ready
                    code = self.procs[index].wait()
                    if self.stopping:
                        return self._finish()
                    self._stop_all()
                    raise ConfigError(f"worker {index} exited with code {code} before it served (see its error above)")
            for _, go_w in pipes:
                os.write(go_w, b"g")
        finally:
            for ready_r, go_w in pipes:
                os.close(ready_r)
                os.close(go_w)
        print(f"rater-server listening on {config.host}:{config.port} with {config.workers} workers "
              f"(pids {' '.join(str(p.pid) for p in self.procs)})", flush=True)
        while not self.stopping:
            for index, proc in enumerate(self.procs):
                if proc.poll() is not None and not self.stopping:
                    print(f"rater-server: worker {index} exited with code {proc.returncode}; stopping the others",
                          file=sys.stderr, flush=True)
                    self._stop_all()
                    return 1
            time.sleep(0.2)
        return self._finish()

    def _finish(self) -> int:
        """Wait for every worker to drain after the stop signal (passed on already: a second one could reach a
        worker that has left its event loop and kill it); the worst exit code."""
        self._stop_all(signal_them=False)
        codes = [proc.returncode for proc in self.procs]
        print(f"rater-server stopped: {len(codes)} workers exited with codes {codes}", flush=True)
        return max((abs(code) for code in codes), default=0)
