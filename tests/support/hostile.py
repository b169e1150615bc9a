"""Helpers for the hardening tests: a real `rater-server` child process (optionally under a memory limit),
hand-built ONNX raters that are hostile in one way and valid in every other, and request builders.

Everything here talks to the server over the wire only (gRPC stubs, the process, its output, /metrics), so
the tests keep working while the server's internals change.

Configuration the tests need and today's server does not have is passed as RATER_SERVER_<FLAG> environment
variables (the fallback every `rater-server serve` flag has): today's server ignores them and shows the
defect; a server that implements the flag picks them up. `new_flags()` spells out flag and variable.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from noiserater.core import codec
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc

from . import DIGITS_SHAPE, TINY_TIMESTEPS, free_port

GIB = 1024**3
MIB = 1024**2
# The address-space limit of a server that may be fed a memory bomb: well above what a rater-server with a
# few tiny models maps (VmPeak about 0.8 GiB, mostly thread stacks and shared libraries).
DEFAULT_MEMORY_LIMIT = 2 * GIB
TOKEN = "hardening-token"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)


def server_command() -> list[str]:
    script = Path(sys.executable).parent / "rater-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "noiserater.server.main"]


def new_flags(**values) -> dict[str, str]:
    """RATER_SERVER_<NAME> variables for flags a hardened server is expected to have, e.g.
    new_flags(max_datasets=50) -> {"RATER_SERVER_MAX_DATASETS": "50"} for `--max-datasets 50`."""
    out = {}
    for name, value in values.items():
        out["RATER_SERVER_" + name.upper()] = "1" if value is True else str(value)
    return out


def _limit_memory(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not write a core the size of the limit

    return apply


class ServerProcess:
    """`rater-server serve` in a child process. Output is collected by a thread (so the pipe never fills);
    `wait_serving` polls the health service; leaving the `with` block kills whatever is still running."""

    def __init__(self, repository: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None,
                 memory_limit: int | None = DEFAULT_MEMORY_LIMIT, cwd: Path | None = None,
                 grace_s: float = 5.0, tls: bool = False):
        self.repository = Path(repository)
        self.port = port or free_port()
        self.args = ["serve", "--repository", str(repository), "--host", "127.0.0.1", "--port", str(self.port),
                     "--device", "cpu", "--intra-op-threads", "1", "--grace-s", f"{grace_s:g}", *args]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.memory_limit = memory_limit
        self.cwd = cwd
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------------------
    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [*server_command(), *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=self.env, cwd=self.cwd, preexec_fn=_limit_memory(self.memory_limit) if self.memory_limit else None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_serving(self, timeout: float = 60) -> ServerProcess:
        """Until the health service says SERVING; AssertionError with the output when the process exits."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.alive(), f"rater-server exited during start-up:\n{self.wait_output()[-3000:]}"
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5, wait_for_ready=True)
                except grpc.RpcError:
                    continue  # not listening yet: wait_for_ready waited up to the timeout
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return self
        raise AssertionError(f"rater-server never reported SERVING:\n{self.output[-3000:]}")

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status, or None when the process is still running after `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_output(self, timeout: float = 5) -> str:
        """The output, once the reader has seen the end of it (after the process exited)."""
        if self._reader is not None:
            self._reader.join(timeout)
        return self.output

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait; None when it did not exit within `timeout` (it is killed then)."""
        self.signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        if code is None:
            self.kill()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def rss_kb(self) -> int:
        """Resident set size (VmRSS) of the server process in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()

    # -- clients ----------------------------------------------------------------------------------------
    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=[("grpc.max_send_message_length", 256 * MIB),
                                                           ("grpc.max_receive_message_length", 256 * MIB)])


def rater_stub(channel: grpc.Channel) -> pb_grpc.RaterServiceStub:
    return pb_grpc.RaterServiceStub(channel)


def serves_a_selection(target: str, model: str = "digits", timeout: float = 10) -> bool:
    """Whether the server answers one small valid SelectNoise correctly within `timeout` seconds."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = rater_stub(channel).SelectNoise(select_request(4, 4, model=model), timeout=timeout)
        except grpc.RpcError:
            return False
    indices = codec.decode(response.indices)
    return indices.shape == (4, 1) and bool(((indices >= 0) & (indices < 4)).all())


def call_code(fn, *args, **kwargs) -> grpc.StatusCode:
    """The status code a unary call ends with (OK when it returns)."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def call_error(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a unary call; (OK, "") when it returns."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def raw_unary(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 10, metadata=None):
    """A unary call with `payload` sent as the request's bytes, whatever they are (no serializer)."""
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return call(payload, timeout=timeout, metadata=metadata)


# -- requests -------------------------------------------------------------------------------------------
def select_request(batch: int, k: int, keep: int = 1, model: str = "digits", dataset: str = "",
                   rule: int = pb.SELECTION_RULE_TOP_K, seed: int = 0, data_shape=DIGITS_SHAPE,
                   version: int = 0) -> pb.SelectNoiseRequest:
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((batch, *data_shape)).astype(np.float32)
    t = rng.integers(0, TINY_TIMESTEPS, batch).astype(np.int64)
    candidates = rng.standard_normal((batch, k, *data_shape)).astype(np.float32)
    return pb.SelectNoiseRequest(model=pb.ModelRef(name=model, version=version), dataset=dataset,
                                 x0=codec.encode(x0), t=codec.encode(t), candidates=codec.encode(candidates),
                                 keep=keep, rule=rule)


def assign_request(batch: int, **kw) -> pb.SelectNoiseRequest:
    """Batch-level assignment: K = keep = 1, B*B triples to score."""
    return select_request(batch, 1, 1, rule=pb.SELECTION_RULE_ASSIGN, **kw)


def score_request(n: int, model: str = "digits", dataset: str = "", seed: int = 0, data_shape=DIGITS_SHAPE,
                  x0: np.ndarray | None = None) -> pb.ScoreRequest:
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, *data_shape)).astype(np.float32) if x0 is None else x0
    eps = rng.standard_normal((n, *data_shape)).astype(np.float32)
    t = rng.integers(0, TINY_TIMESTEPS, n).astype(np.int64)
    return pb.ScoreRequest(model=pb.ModelRef(name=model), dataset=dataset, x0=codec.encode(x0),
                           t=codec.encode(t), eps=codec.encode(eps))


# -- hand-built raters ----------------------------------------------------------------------------------
def rater_metadata(data_shape: Sequence[int] = DIGITS_SHAPE, num_timesteps: int = TINY_TIMESTEPS,
                   dataset: str = "digits", provenance: dict | None = None) -> dict[str, str]:
    """The metadata `nrctl export` writes (noiserater.core.scoring.META_*)."""
    from noiserater.core import scoring

    return {
        scoring.META_FORMAT: scoring.FORMAT_VERSION,
        scoring.META_DATA_SHAPE: json.dumps(list(data_shape)),
        scoring.META_NUM_TIMESTEPS: str(num_timesteps),
        scoring.META_DATASET: dataset,
        scoring.META_SCHEDULE: "linear",
        scoring.META_PROVENANCE: json.dumps(provenance or {"test": True}, sort_keys=True),
        scoring.META_EXPORTED_AT: "2025-01-01T00:00:00Z",
    }


def build_rater(nodes: Iterable, initializers: Iterable = (), data_shape: Sequence[int] = DIGITS_SHAPE,
                metadata: dict[str, str] | None = None, opset: int = 18):
    """An onnx.ModelProto with the rater signature x0 [N, *data], t [N] int64, eps [N, *data] -> score [N].
    `nodes` must compute `score` from the inputs (and `initializers`)."""
    from onnx import TensorProto, helper

    data = ["N", *data_shape]
    graph = helper.make_graph(
        list(nodes), "hostile_rater",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, data),
         helper.make_tensor_value_info("t", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("eps", TensorProto.FLOAT, data)],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="hostile")
    model.ir_version = 9
    for key, value in (metadata or rater_metadata(data_shape)).items():
        model.metadata_props.add(key=key, value=value)
    return model


def _sum_nodes(source: str, out: str, prefix: str) -> list:
    """out [N] = sum of source [N, D] over axis 1."""
    from onnx import helper

    return [helper.make_node("Constant", [], [f"{prefix}_axes"], value_ints=[1]),
            helper.make_node("ReduceSum", [source, f"{prefix}_axes"], [out], keepdims=0)]


def plain_rater_bytes(metadata: dict[str, str] | None = None) -> bytes:
    """score = sum(x0 * eps): a valid rater, finite everywhere (`metadata` replaces the exporter's)."""
    from onnx import helper

    nodes = [helper.make_node("Mul", ["x0", "eps"], ["prod"]), *_sum_nodes("prod", "score", "s")]
    return build_rater(nodes, metadata=metadata).SerializeToString()


def external_data_rater_bytes(location: str, length: int = DIGITS_SHAPE[0]) -> bytes:
    """A rater whose weight w [64] (uint8: the first 64 bytes of `location`, a path relative to wherever the
    loader resolves it, stored as `data_location=EXTERNAL`) is the score: score = x0 @ float(w), so one-hot
    rows of x0 read the file back byte by byte. Otherwise valid: signature, metadata, finite (0) on zeros."""
    import onnx
    from onnx import TensorProto, helper

    weight = onnx.TensorProto()
    weight.name = "w"
    weight.data_type = TensorProto.UINT8
    weight.dims.append(length)
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    nodes = [helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x0", "wf"], ["score"])]
    return build_rater(nodes, [weight]).SerializeToString()


def constant_of_shape_bomb_bytes(elements: int = 2**32) -> bytes:
    """A few hundred bytes that make a float tensor of `elements` zeros (16 GiB for 2**32) and add its sum
    to the score: score = sum(x0 * eps) + sum(zeros(elements))."""
    from onnx import TensorProto, helper

    shape = helper.make_tensor("bomb_shape", TensorProto.INT64, [1], [elements])
    nodes = [
        helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=1),
        helper.make_node("Mul", ["x0", "eps"], ["prod"]), *_sum_nodes("prod", "s", "s"),
        helper.make_node("Add", ["s", "bomb_sum"], ["score"]),
    ]
    return build_rater(nodes, [shape]).SerializeToString()


def loop_bomb_bytes(trips: int = 10**12) -> bytes:
    """A rater whose score goes through a Loop of `trips` iterations (each adds 0 to a scalar): valid in
    every respect, but its first run never ends."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "zero_b"], ["acc_out"])],
        "loop_body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])],
        initializer=[helper.make_tensor("zero_b", TensorProto.FLOAT, [], [0.0])])
    nodes = [
        helper.make_node("Loop", ["trips", "cond", "acc0"], ["acc"], body=body),
        helper.make_node("Mul", ["x0", "eps"], ["prod"]), *_sum_nodes("prod", "s", "s"),
        helper.make_node("Add", ["s", "acc"], ["score"]),
    ]
    initializers = [helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
                    helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
                    helper.make_tensor("acc0", TensorProto.FLOAT, [], [0.0])]
    return build_rater(nodes, initializers).SerializeToString()


def inf_on_real_input_rater_bytes() -> bytes:
    """score = -log(float(sum(x0 * x0) == 0)): 0 on the all-zeros warm-up input, +Inf on any real x0."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", ["x0", "x0"], ["sq"]), *_sum_nodes("sq", "ss", "s"),
        helper.make_node("Equal", ["ss", "zero"], ["is_zero"]),
        helper.make_node("Cast", ["is_zero"], ["is_zero_f"], to=TensorProto.FLOAT),
        helper.make_node("Log", ["is_zero_f"], ["log_z"]),
        helper.make_node("Neg", ["log_z"], ["score"]),
    ]
    return build_rater(nodes, [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]).SerializeToString()


def padded_rater_bytes(pad_bytes: int) -> bytes:
    """A valid rater (score = sum(x0 * eps)) with an unused initializer of `pad_bytes` bytes: a large upload."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Mul", ["x0", "eps"], ["prod"]), *_sum_nodes("prod", "score", "s")]
    pad = helper.make_tensor("unused_padding", TensorProto.UINT8, [pad_bytes], b"\x01" * pad_bytes, raw=True)
    return build_rater(nodes, [pad]).SerializeToString()


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for CN=localhost, made with the openssl command line."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def scrape(port: int, timeout: float = 5) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        return response.read().decode()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds have passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)


def sigterm_and_wait(server: ServerProcess, timeout: float) -> tuple[int | None, float]:
    """(exit status or None, seconds from SIGTERM to exit)."""
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    code = server.wait_exit(timeout)
    return code, time.monotonic() - started


def write_repository(root: Path, models: dict[str, bytes | list[bytes]]) -> Path:
    """<root>/<name>/<i+1>/model.onnx for each ONNX file's bytes listed under a name."""
    for name, files in models.items():
        for i, data in enumerate([files] if isinstance(files, bytes) else files, start=1):
            target = root / name / str(i) / "model.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    root.mkdir(parents=True, exist_ok=True)
    return root


def stream_codes(stub: pb_grpc.RaterServiceStub, requests: Sequence[pb.SelectNoiseRequest], timeout: float = 60,
                 metadata=None) -> list[int]:
    """Send every request on one SelectNoiseStream at once, then read the answers: their error codes (0 = OK),
    in arrival order. A stream that ends early raises grpc.RpcError."""
    messages = [pb.SelectNoiseStreamRequest(request_id=str(i), request=r) for i, r in enumerate(requests)]
    responses = stub.SelectNoiseStream(iter(messages), timeout=timeout, metadata=metadata)
    return [response.error_code for response in responses]


class IdleStream:
    """A client-streaming or bidirectional call opened and left without messages until `close`."""

    def __init__(self, method, timeout: float, metadata=None):
        import queue

        self._outbox: queue.Queue = queue.Queue()
        self.call = method(iter(self._outbox.get, None), timeout=timeout, metadata=metadata)

    def close(self) -> None:
        self._outbox.put(None)
        self.call.cancel()

    def __enter__(self) -> IdleStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
