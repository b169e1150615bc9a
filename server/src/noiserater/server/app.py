"""Assembles one rater server (gRPC services, health, reflection, metrics, statistics) and runs it
until it is told to stop, then drains."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from noiserater.core.inference import grpc_service_pb2 as kserve_pb
from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
from noiserater.core.v1 import rater_service_pb2 as v1_pb
from noiserater.core.v1 import rater_service_pb2_grpc as v1_grpc
from noiserater.server.auth import TokenAuthInterceptor, read_token
from noiserater.server.config import ServerConfig
from noiserater.server.metrics import ServerMetrics
from noiserater.server.models import ModelRegistry
from noiserater.server.rpc import RpcRuntime
from noiserater.server.service_kserve import InferenceServicer
from noiserater.server.service_v1 import RaterServicer
from noiserater.server.stats import MemoryStatsStore, RedisStatsStore, StatsRecorder

log = logging.getLogger("rater-server")

V1_SERVICE = v1_pb.DESCRIPTOR.services_by_name["RaterService"].full_name
KSERVE_SERVICE = kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def grpc_options(max_message_mb: int) -> list[tuple[str, int]]:
    size = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


class RaterServer:
    def __init__(self, config: ServerConfig):
        import onnxruntime as ort

        # onnxruntime's own multi-line complaint about a missing CUDA library is replaced by one line
        # of ours and the nr_cpu_fallbacks metric (see models.py).
        ort.set_default_logger_severity(3)
        self.config = config
        self.metrics = ServerMetrics()
        self.runtime = RpcRuntime(self.metrics)
        # Inference runs (one per batch, or one per request with batching off) and model loading.
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="onnxruntime")
        self.registry = ModelRegistry(config, self.executor, self.metrics)
        self.recorder: StatsRecorder | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.load_problems: list[str] = []
        self._metrics_http = None

    async def start(self) -> int:
        """Load and warm up every model, then bind and serve. Returns the bound port."""
        config = self.config
        store = RedisStatsStore(config.redis_url, config.stats_ttl_s) if config.redis_url else MemoryStatsStore()
        self.recorder = StatsRecorder(store, self.metrics, config.stats_flush_s)
        self.load_problems = await self.registry.load_repository()
        interceptors = []
        if config.auth_token_file:
            interceptors.append(TokenAuthInterceptor(read_token(config.auth_token_file), config.auth_all))
        self.server = grpc.aio.server(interceptors=interceptors, options=grpc_options(config.max_message_mb))
        v1_grpc.add_RaterServiceServicer_to_server(
            RaterServicer(self.registry, self.recorder, self.runtime), self.server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.registry, self.recorder, self.runtime), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (V1_SERVICE, KSERVE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        await self.server.start()
        if config.metrics_port:
            from prometheus_client import start_http_server

            self._metrics_http = start_http_server(config.metrics_port, addr=config.host,
                                                   registry=self.metrics.registry)
        self.recorder.start()
        # Every model on disk is loaded and warmed up by now: the server is ready.
        for service in ("", V1_SERVICE, KSERVE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, flush statistics."""
        grace = self.config.grace_s if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.runtime.start_draining()
        await self.health.enter_graceful_shutdown()
        # New inference calls now get UNAVAILABLE (which clients retry elsewhere) and idle streams end with it,
        # while the accepted requests finish; gRPC shuts down only once calls stopped arriving, since its stop
        # cancels (rather than refuses) a call that reached it but not yet the runtime.
        await self.runtime.drained(deadline)
        if self.server is not None:
            await self.server.stop(max(0.0, deadline - loop.time()))
        await self.registry.close(grace)
        if self.recorder is not None:
            await self.recorder.close()
        if self._metrics_http is not None:
            http_server, thread = self._metrics_http
            http_server.shutdown()
            http_server.server_close()
            thread.join(timeout=5)
        self.executor.shutdown(wait=True, cancel_futures=False)
