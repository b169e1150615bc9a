"""Triton Inference Server for `nrctl bench serve-vs-triton`: its Python environment, made on demand, and a
running server (triton_server.py) on free loopback ports.

PyTriton (the `nvidia-pytriton` wheel, which ships a `tritonserver` binary with the Python backend) cannot
live in the project's environment: it needs numpy < 2, protobuf 6 and tritonclient 2.5x where the project
pins numpy 2, protobuf 7 and tritonclient 2.41. So it gets a virtual environment of its own, by default next
to the running one (`<venv>-pytriton`, about 0.7 GB), made from the same base interpreter with
nvidia-pytriton and the project's onnxruntime-gpu version, the first time the bench needs it (pip's own
environment applies: PIP_NO_INDEX=1 PIP_FIND_LINKS=<wheelhouse> makes it offline). Where the running
environment has no onnxruntime-gpu (an image with its own onnxruntime), the new environment sees the
interpreter's packages and uses that onnxruntime. The project's own code reaches it as a copy of
noiserater.core (scoring and selection need numpy alone).

Two things the server needs that PyTriton does not arrange: its Python backend stub loads libpython, and
must find the environment's own (LD_LIBRARY_PATH) when that interpreter is not the system's; and a
workspace of its own (the Unix sockets between tritonserver and the Python process live there).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from noiserater.trainer.bench.local_server import free_port

PYTRITON_VERSION = "0.7.0"
READY_TIMEOUT_S = 240.0


class TritonUnavailable(RuntimeError):
    pass


def default_env_dir() -> Path:
    """`<the running venv>-pytriton`, beside the project's environment."""
    prefix = Path(sys.prefix)
    return prefix.with_name(prefix.name + "-pytriton")


def env_python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def _env_works(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import pytriton, onnxruntime, numpy"], capture_output=True,
                           timeout=120)
    return probe.returncode == 0


def ensure_env(env_dir: Path, say=lambda text: None) -> Path:
    """The PyTriton environment's interpreter, creating (or completing) the environment when it does not work."""
    python = env_python(env_dir)
    if _env_works(python):
        return python
    base = getattr(sys, "_base_executable", "") or sys.executable
    try:
        onnxruntime = [f"onnxruntime-gpu=={metadata.version('onnxruntime-gpu')}"]
        venv = [base, "-m", "venv", str(env_dir)]
    except metadata.PackageNotFoundError:  # an interpreter with its own onnxruntime (a device image): reuse it
        onnxruntime = []
        venv = [base, "-m", "venv", "--system-site-packages", str(env_dir)]
    say(f"creating the PyTriton environment {env_dir} (nvidia-pytriton=={PYTRITON_VERSION} "
        f"{' '.join(onnxruntime)}; about a minute and 0.7 GB, once) ...")
    steps = [venv, [str(python), "-m", "pip", "install", "-q", f"nvidia-pytriton=={PYTRITON_VERSION}", *onnxruntime]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise TritonUnavailable(f"cannot make the PyTriton environment ({' '.join(step[:4])} ...): "
                                    f"{lines[-1] if lines else done.returncode}")
    if not _env_works(python):
        raise TritonUnavailable(f"the PyTriton environment {env_dir} was made but cannot import pytriton")
    return python


def core_copy(where: Path) -> Path:
    """A copy of the noiserater.core package under `where` (a PYTHONPATH entry), so the PyTriton environment
    imports the project's scoring and selection without the project's own environment on its path."""
    import noiserater.core

    source = Path(noiserater.core.__file__).parent
    shutil.copytree(source, where / "noiserater" / "core", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def libpython_dir(python: Path) -> str:
    done = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
                          capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


class TritonServer(NamedTuple):
    target: str  # HOST:PORT of its KServe gRPC endpoint
    command: list[str]
    pid: int  # the PyTriton process; tritonserver and its backend stubs are its descendants
    score_model: str
    select_model: str


def start_triton(stack: ExitStack, python: Path, onnx: Path, model: str, k: int, instances: int, threads: int,
                 max_batch: int, max_delay_us: int, work: Path) -> TritonServer:
    """Serve `onnx` with Triton until `stack` closes (SIGINT, then the process group is killed after 30 s)."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    script = Path(__file__).with_name("triton_server.py")
    command = [str(python), str(script), "--onnx", str(onnx), "--model", model, "--k", str(k),
               "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
               "--instances", str(instances), "--threads", str(threads), "--max-batch", str(max_batch),
               "--max-delay-us", str(max_delay_us), "--workspace", str(work / "workspace")]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(core_copy(work / "site"))
    libdir = libpython_dir(python)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    log_path = work / "triton.log"
    log = stack.enter_context(open(log_path, "w"))  # noqa: SIM115 - closed by the stack
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # tritonserver and the backend stubs, should any outlive the PyTriton process
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    stack.callback(stop)
    target = f"127.0.0.1:{grpc_port}"
    server = TritonServer(target, command, proc.pid, model, f"{model}_select")
    wait_models_ready(target, [server.score_model, server.select_model], proc, log_path)
    return server


def wait_models_ready(target: str, models: list[str], proc: subprocess.Popen | None = None,
                      log_path: Path | None = None, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Return once every model reports ready over KServe ModelReady; TritonUnavailable if `proc` exits or
    time runs out (with the log's last error line)."""
    import grpc

    from noiserater.core.inference import grpc_service_pb2 as kserve_pb
    from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise TritonUnavailable(f"Triton exited with code {proc.returncode}{_last_error(log_path)}")
            try:
                if all(stub.ModelReady(kserve_pb.ModelReadyRequest(name=name), timeout=2).ready for name in models):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TritonUnavailable(f"Triton at {target} did not serve {', '.join(models)} within {timeout_s:g}s"
                            f"{_last_error(log_path)}")


def _last_error(log_path: Path | None) -> str:
    if log_path is None or not log_path.exists():
        return ""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if "rror" in ln]
    return f": {lines[-1][:300]}" if lines else f" (log: {log_path})"
