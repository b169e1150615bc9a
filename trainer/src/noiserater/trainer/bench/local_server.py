"""A real `rater-server serve` subprocess on a free loopback port, for what needs one (nrctl quickstart, the
serving benchmark). Started as a user would start it; ready once grpc health says SERVING."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(target: str, proc: subprocess.Popen | None = None, timeout_s: float = 120.0) -> None:
    """Return once the server at `target` reports SERVING; RuntimeError if `proc` exits or time runs out."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"rater-server for {target} exited with code {proc.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1, wait_for_ready=True)
            except grpc.RpcError:
                continue
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                return
    raise RuntimeError(f"rater-server at {target} did not report SERVING within {timeout_s:g}s")


class LocalServer(NamedTuple):
    target: str
    command: list[str]
    pid: int


def start_rater_server(stack: ExitStack, repository: Path, server_args: list[str] | tuple[str, ...] = (),
                       log_path: Path | None = None) -> LocalServer:
    """Serve `repository` until `stack` closes (SIGTERM, then kill after 30 s)."""
    port = free_port()
    script = shutil.which("rater-server") or str(Path(sys.executable).parent / "rater-server")
    base = [script] if Path(script).exists() else [sys.executable, "-m", "noiserater.server.main"]
    command = [*base, "serve", "--repository", str(repository), "--host", "127.0.0.1", "--port", str(port),
               *server_args]
    log_path = log_path or Path(repository) / "server.log"
    log = stack.enter_context(open(log_path, "w"))  # noqa: SIM115 - closed by the stack
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(stop)
    target = f"127.0.0.1:{port}"
    wait_serving(target, proc)
    return LocalServer(target, command, proc.pid)


def start_onnx_server(stack: ExitStack, onnx: Path, model: str, server_args: list[str]) -> LocalServer:
    """Serve one ONNX file as `model` (version 1) from a temporary repository until `stack` closes."""
    repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nr-bench-")))
    (repo / model / "1").mkdir(parents=True)
    shutil.copyfile(onnx, repo / model / "1" / "model.onnx")
    return start_rater_server(stack, repo, server_args)
