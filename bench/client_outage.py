"""What an outage of the rater server costs a training job, per transport: the steps before the circuit
breaker opens, a step once it is open (select() with the Gaussian fallback against plain torch.randn of the
batch, and with the local ONNX fallback against NoiseSelector.local itself, in interleaved pairs), and the
time from the restarted server being healthy (its "listening" line, printed once grpc health is SERVING)
to the first selection it serves. Outages: the server killed (SIGKILL; connections refused) and frozen
(SIGSTOP; connections open, nothing answers). Prints JSON. Not a test.

    .venv/bin/python bench/client_outage.py [--restarts 5] [--pairs 300]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from noiserater.client.selector import NoiseSelector  # noqa: E402
from noiserater.trainer.bench.local_server import free_port  # noqa: E402
from noiserater.trainer.stage1.export import export_rater  # noqa: E402
from noiserater.trainer.stage1.rater import build_rater  # noqa: E402

WORKLOADS = {"digits": ((64,), 128), "image": ((3, 32, 32), 64)}  # name: (data shape, batch)
K = 8
T = 1000


class Server:
    """`rater-server serve` on a fixed port, restartable; `healthy_at` is when it printed its listening line."""

    def __init__(self, repo: Path, port: int):
        script = Path(sys.executable).parent / "rater-server"
        self.command = [str(script), "serve", "--repository", str(repo), "--host", "127.0.0.1", "--port", str(port),
                        "--device", "cpu", "--intra-op-threads", "1", "--grace-s", "1"]
        self.proc: subprocess.Popen | None = None
        self.healthy_at = 0.0
        self.ready = threading.Event()

    def start(self) -> None:
        self.ready.clear()
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if "listening on" in line and not self.ready.is_set():
                self.healthy_at = time.monotonic()
                self.ready.set()

    def wait_ready(self) -> None:
        if not self.ready.wait(120):
            raise RuntimeError("rater-server did not start")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def freeze(self, frozen: bool) -> None:
        self.proc.send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)


def ms(seconds: list[float]) -> dict[str, float]:
    values = np.array(seconds) * 1000
    return {"median_ms": round(float(np.median(values)), 4), "p99_ms": round(float(np.percentile(values, 99)), 4),
            "max_ms": round(float(values.max()), 4)}


def batch(shape: tuple[int, ...], b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, *shape, generator=gen) * 2 - 1, torch.randint(0, T, (b,), generator=gen)


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def until_open(selector: NoiseSelector, x0, t) -> list[float]:
    """The cost of each step until the breaker opens."""
    costs = []
    while not selector.counters["breaker_open"]:
        costs.append(timed(lambda: selector.select(x0, t)))
    return costs


def pairs(n: int, first, second) -> tuple[list[float], list[float]]:
    a, b = [], []
    for _ in range(n):
        a.append(timed(first))
        b.append(timed(second))
    return a, b


def recovery(server: Server, selector: NoiseSelector, x0, t, restarts: int) -> list[float]:
    """Seconds from the server's health to the first selection it serves, over `restarts` kill/start cycles
    (the breaker open at each start; steps run back to back, as fast as the open breaker allows)."""
    times = []
    for _ in range(restarts):
        assert selector.counters["breaker_open"]
        server.start()
        first_served(selector, x0, t)  # steps 1 ms apart: a very short training step
        times.append(time.monotonic() - server.healthy_at)
        server.kill()
        until_open(selector, x0, t)
    return times


def measure(server: Server, transport: str, name: str, onnx: Path, restarts: int, n_pairs: int) -> dict:
    """One workload over one transport; the server is serving on entry and on return."""
    shape, b = WORKLOADS[name]
    x0, t = batch(shape, b, 0)
    target = server.command[server.command.index("--port") + 1]
    gaussian = NoiseSelector.remote(f"127.0.0.1:{target}", model=name, num_candidates=K, transport=transport)
    local_fallback = NoiseSelector.remote(f"127.0.0.1:{target}", model=name, num_candidates=K, transport=transport,
                                          fallback_onnx=onnx)
    local = NoiseSelector.local(onnx, num_candidates=K)
    served = [timed(lambda: gaussian.select(x0, t)) for _ in range(50)][10:]
    server.kill()
    row = {"batch": [b, *shape], "served_select": ms(served),
           "steps_before_open_s": [round(c, 3) for c in until_open(gaussian, x0, t)],
           "steps_before_open_local_s": [round(c, 3) for c in until_open(local_fallback, x0, t)]}
    gen = torch.Generator().manual_seed(1)
    randn, select = pairs(n_pairs, lambda: torch.randn(x0.shape, generator=gen), lambda: gaussian.select(x0, t))
    row["open_gaussian"] = {"select": ms(select), "torch_randn": ms(randn),
                            "overhead_median_ms": round((np.median(select) - np.median(randn)) * 1000, 4)}
    own, select = pairs(n_pairs // 3, lambda: local.select(x0, t), lambda: local_fallback.select(x0, t))
    row["open_local"] = {"select": ms(select), "local_selector": ms(own),
                         "overhead_median_ms": round((np.median(select) - np.median(own)) * 1000, 4)}
    assert gaussian.counters["requests"] == 50 + len(row["steps_before_open_s"])  # no RPC while open
    if name == "digits":
        times = recovery(server, gaussian, x0, t, restarts)
        row["recovery_after_restart_s"] = {"each": [round(v, 3) for v in times],
                                           "median": round(float(np.median(times)), 3), "max": round(max(times), 3)}
    server.start()
    server.wait_ready()
    for selector in (gaussian, local_fallback):
        first_served(selector, x0, t)
    if name == "digits":  # frozen: connections stay open, nothing answers until SIGCONT
        server.freeze(True)
        frozen = until_open(gaussian, x0, t)
        thawed = time.monotonic()
        server.freeze(False)
        first_served(gaussian, x0, t)
        row["frozen"] = {"steps_before_open_s": [round(c, 3) for c in frozen],
                         "first_served_after_sigcont_s": round(time.monotonic() - thawed, 3)}
    gaussian.close()
    local_fallback.close()
    return row


def first_served(selector: NoiseSelector, x0, t) -> None:
    served = selector.counters["served"]
    while selector.counters["served"] == served:
        selector.select(x0, t)
        time.sleep(0.001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="nr-outage-"))
    defaults = inspect.signature(NoiseSelector.remote).parameters
    out: dict = {"machine": f"{os.cpu_count()} CPU cores, CPU execution provider", "K": K,
                 **{name: defaults[name].default for name in ("breaker_failures", "timeout_s", "max_attempts")}}
    try:
        onnx = {}
        for name, (shape, _) in WORKLOADS.items():
            torch.manual_seed(0)
            onnx[name] = root / f"{name}.onnx"
            export_rater(build_rater("mlp", shape, T), onnx[name], dataset=name, schedule="linear")
            (root / "repo" / name / "1").mkdir(parents=True)
            shutil.copyfile(onnx[name], root / "repo" / name / "1" / "model.onnx")
        server = Server(root / "repo", free_port())
        server.start()
        server.wait_ready()
        for transport in ("stream", "unary"):
            out[transport] = {name: measure(server, transport, name, onnx[name], args.restarts, args.pairs)
                              for name in WORKLOADS}
        server.kill()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
