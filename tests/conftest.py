"""Shared fixtures: a real redis-server on a free loopback port, and small exported raters. The helpers
they use live in tests/support/."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support import export_random_rater, free_port

# The models under test are tiny; with several processes (server, redis, pytest) on 2 cores, torch's
# and onnxruntime's thread pools oversubscribe the CPU and a 20-step run takes a minute instead of
# seconds. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (stage-1 runs are deterministic per thread count and faster so)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a redis-server started for this test session on a free port (stopped afterwards)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make test installs it with apt-get)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def rater_onnx(tmp_path_factory) -> Path:
    """A random (untrained) 64-D rater exported to ONNX with full metadata."""
    return export_random_rater(tmp_path_factory.mktemp("rater") / "model.onnx", seed=0)


@pytest.fixture(scope="session")
def rater_onnx_v2(tmp_path_factory) -> Path:
    """A second rater with other weights, for version swaps."""
    return export_random_rater(tmp_path_factory.mktemp("rater2") / "model.onnx", seed=1)


@pytest.fixture(scope="module")
def channel(server):
    """A plaintext channel to the module's `server` fixture (a support.server.ServerThread)."""
    import grpc

    with grpc.insecure_channel(server.target) as opened:
        yield opened
