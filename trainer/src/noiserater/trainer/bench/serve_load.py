"""The serving benchmark's load generator: `concurrency` closed-loop clients (grpc.aio, one event loop) send the
same request back to back, measured in windows (see serve_windows). The request and how it travels (the
transport):
- a SelectNoiseRequest, each client over its own SelectNoiseStream ("stream") or as unary SelectNoise calls
  ("unary"): the v1 API of rater-server;
- a KServe ModelInferRequest (make_kserve_request), as unary ModelInfer calls ("kserve") or each client over its
  own ModelStreamInfer ("kserve-stream"): what any KServe v2 server answers, Triton included."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from noiserater.trainer.bench.serve_windows import Level, Windows, measure_windows, summarise

MAX_CHANNELS = 4  # clients share this many channels (round robin)
TRANSPORTS = ("stream", "unary", "kserve", "kserve-stream")


def make_request(model: str, data_shape: tuple[int, ...], num_timesteps: int, batch: int, k: int, seed: int = 0):
    """A SelectNoiseRequest of `batch` samples x `k` candidates of random data, and its arrays (x0, t, candidates)."""
    from noiserater.core import codec
    from noiserater.core.v1 import rater_service_pb2 as pb

    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((batch, *data_shape)).astype(np.float32)
    t = rng.integers(0, num_timesteps, batch).astype(np.int64)
    candidates = rng.standard_normal((batch, k, *data_shape)).astype(np.float32)
    request = pb.SelectNoiseRequest(model=pb.ModelRef(name=model), dataset="bench-serve", x0=codec.encode(x0),
                                    t=codec.encode(t), candidates=codec.encode(candidates), keep=1)
    return request, (x0, t, candidates)


def make_kserve_request(model: str, inputs: dict[str, np.ndarray]):
    """A KServe ModelInferRequest of `inputs` (name -> array, FP32 or INT64) as raw contents, the layout
    perf_analyzer and Triton's own clients send."""
    from noiserater.core.inference import grpc_service_pb2 as kserve_pb

    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    request = kserve_pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatypes[array.dtype], shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def open_channels(target: str, count: int, token: str | None = None, tls_root_cert: bytes | None = None):
    """`count` grpc.aio channels to `target` (distinct, so they do not share one connection) and the call
    metadata that carries `token` as a bearer token (None without one); TLS when `tls_root_cert` is given.
    No retries while measuring."""
    from noiserater.client.channel import RaterChannel

    rater_channel = RaterChannel(target, token=token, max_attempts=1, max_message_bytes=256 << 20,
                                 tls_root_cert=tls_root_cert)
    channels = [rater_channel.aio_channel(("grpc.channel_id", i)) for i in range(count)]
    return channels, rater_channel.metadata


async def measure_server(target: str, request, concurrency: int, candidates: int, windows: Windows,
                         token: str | None = None, transport: str = "stream",
                         tls_root_cert: bytes | None = None, channels: int = MAX_CHANNELS) -> Level:
    """One concurrency level against the server at `target`; `candidates` scored per request. `request` is a
    SelectNoiseRequest for the transports "stream" and "unary", a ModelInferRequest for "kserve" and
    "kserve-stream". The clients share `channels` connections (round robin); as many as clients gives each its
    own, as separate client processes would have (a server whose processes share the port by connection sees
    the load spread as it would be)."""
    import grpc

    from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
    from noiserater.core.v1 import rater_service_pb2 as pb
    from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc

    if transport not in TRANSPORTS:
        raise ValueError(f"transport: {transport!r} is not one of {', '.join(TRANSPORTS)}")
    kserve = transport.startswith("kserve")
    opened, metadata = open_channels(target, max(1, min(channels, concurrency)), token, tls_root_cert)
    stubs = [(kserve_grpc.GRPCInferenceServiceStub if kserve else pb_grpc.RaterServiceStub)(c) for c in opened]
    done: list[tuple[float, float]] = []  # (finish time, latency)
    level = Level(concurrency)
    stop = asyncio.Event()

    def failed(text: str) -> None:
        level.errors += 1
        level.error_sample = level.error_sample or text
        if level.errors > 100:
            stop.set()

    async def stream_client(i: int) -> None:
        """One stream per client, one request in flight on it (closed loop)."""
        if kserve:
            message = type(request)()
            message.CopyFrom(request)
            message.id = str(i)
            call = stubs[i % len(stubs)].ModelStreamInfer(metadata=metadata)
        else:
            message = pb.SelectNoiseStreamRequest(request_id=str(i), request=request)
            call = stubs[i % len(stubs)].SelectNoiseStream(metadata=metadata)
        try:
            while not stop.is_set():
                started = time.perf_counter()
                await call.write(message)
                response = await call.read()
                if response is grpc.aio.EOF:
                    failed("stream ended by the server")
                    return
                if response.error_message or (not kserve and response.error_code):
                    failed(f"status {getattr(response, 'error_code', '')}: {response.error_message}")
                    continue
                finished = time.perf_counter()
                done.append((finished, finished - started))
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            failed(f"{exc.code().name}: {exc.details()}")

    async def unary_client(i: int) -> None:
        call = stubs[i % len(stubs)].ModelInfer if kserve else stubs[i % len(stubs)].SelectNoise
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await call(request, timeout=60, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                failed(f"{exc.code().name}: {exc.details()}")
                continue
            finished = time.perf_counter()
            done.append((finished, finished - started))

    client = stream_client if transport.endswith("stream") else unary_client
    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    try:
        await measure_windows(done, level, windows)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in opened:
            await channel.close()
    return summarise(level, candidates, windows)
