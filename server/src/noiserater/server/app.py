"""Assembles one rater server (gRPC services, health, reflection, metrics, statistics) and runs it
until it is told to stop, then drains."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
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
from noiserater.server.client_errors import MalformedRequestInterceptor
from noiserater.server.config import ConfigError, ServerConfig
from noiserater.server.metrics import ServerMetrics, serve_http
from noiserater.server.models import ModelRegistry
from noiserater.server.rpc import RpcRuntime
from noiserater.server.service_kserve import InferenceServicer
from noiserater.server.service_v1 import RaterServicer
from noiserater.server.stats import MemoryStatsStore, RedisStatsStore, StatsRecorder
from noiserater.server.tls import check_server_pair
from noiserater.server.watch import RepositoryWatcher
from noiserater.server.workers import ADMIN_REFUSED

log = logging.getLogger("rater-server")

V1_SERVICE = v1_pb.DESCRIPTOR.services_by_name["RaterService"].full_name
KSERVE_SERVICE = kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


HELD_CALLS_S = 0.5


def grpc_options(max_message_mb: int, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The server's channel options. SO_REUSEPORT, on in gRPC by default, would let a second server bind the
    same port and share its traffic: off unless asked for, so that a port in use is an error."""
    size = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
            ("grpc.so_reuseport", int(reuse_port))]


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """ConfigError when another process listens on host:port. Checked before the models load so that a second
    server fails at once, with one line (gRPC's own bind failure comes later and logs several)."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except OSError:
        return  # an unresolvable host: gRPC's bind reports it
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"--port: {host}:{port} is already in use (another rater-server? "
                                      "--reuse-port lets servers share a port)") from None


def startup_warnings(config: ServerConfig) -> list[str]:
    """What an operator should know about an exposed configuration, logged at start."""
    warnings = []
    if config.insecure_admin:
        warnings.append("--insecure-admin: the admin RPCs (deploy, unload, set default) need no token; anyone "
                        f"who can reach {config.host}:{config.port} can replace the served models")
    if config.workers > 1 and not config.redis_url:
        warnings.append(f"--workers {config.workers} without --redis-url: each worker keeps the statistics of the "
                        "requests it served, and GetStats answers from one of them")
    if not config.tls_cert and not is_loopback(config.host):
        warnings.append(f"serving plaintext on {config.host}, which is not a loopback address: requests, "
                        "responses and bearer tokens cross the network unencrypted (use --tls-cert/--tls-key "
                        "or a TLS proxy)")
    return warnings


class RaterServer:
    def __init__(self, config: ServerConfig):
        import onnxruntime as ort

        # onnxruntime's own multi-line complaint about a missing CUDA library is replaced by one line
        # of ours and the nr_cpu_fallback metric (see models.py).
        ort.set_default_logger_severity(3)
        self.config = config
        self.metrics = ServerMetrics()
        self.runtime = RpcRuntime(self.metrics, config.max_stream_in_flight)
        if config.workers > 1:
            self.runtime.admin_refusal = ADMIN_REFUSED
        # Inference runs (one per batch, or one per request with batching off) and model loading.
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="onnxruntime")
        self.registry = ModelRegistry(config, self.executor, self.metrics)
        self.recorder: StatsRecorder | None = None
        self.watcher = RepositoryWatcher(self.registry, config.repository_poll_s) if config.repository_poll_s else None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.load_problems: list[str] = []
        self._metrics_http = None
        self._started = False

    async def start(self, serving: bool = True) -> int:
        """Load and warm up every model, then bind and serve. Returns the bound port. With `serving` False the
        server takes calls but health does not report SERVING until `set_serving` (a worker waiting for its
        siblings)."""
        config = self.config
        if config.tls_cert:
            check_server_pair(config.tls_cert, config.tls_key)
        if not config.reuse_port:
            check_port_free(config.host, config.port)
        store = RedisStatsStore(config.redis_url, config.stats_ttl_s) if config.redis_url else MemoryStatsStore()
        self.recorder = StatsRecorder(store, self.metrics, config.stats_flush_s, max_datasets=config.max_datasets)
        if self.watcher is not None:
            await self.watcher.baseline()  # before the load: what is written meanwhile is seen by the first poll
        self.load_problems = await self.registry.load_repository()
        interceptors: list[grpc.aio.ServerInterceptor] = []
        token = read_token(config.auth_token_file) if config.auth_token_file else None
        if token is not None or not config.insecure_admin:
            interceptors.append(TokenAuthInterceptor(token, config.auth_all, config.insecure_admin))
        if token is not None:
            self.runtime.authenticate = interceptors[-1].authenticated
        interceptors.append(MalformedRequestInterceptor())  # after auth: an unauthenticated call is refused unread
        self.server = grpc.aio.server(interceptors=interceptors,
                                      options=grpc_options(config.max_message_mb, config.reuse_port),
                                      maximum_concurrent_rpcs=config.max_concurrent_rpcs or None)
        v1_grpc.add_RaterServiceServicer_to_server(
            RaterServicer(self.registry, self.recorder, self.runtime), self.server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.registry, self.recorder, self.runtime), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (V1_SERVICE, KSERVE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # gRPC's "Failed to bind to address ..."
            self.port = 0
        if self.port == 0:
            raise ConfigError(f"--port: cannot bind {address} (in use? --reuse-port lets servers share a port)"
                              if config.port else f"--host: cannot bind {address}")
        for warning in startup_warnings(config):
            log.warning("%s", warning)
        await self.server.start()
        if config.metrics_port:
            try:
                self._metrics_http = serve_http(config.host, config.metrics_port, self.metrics.registry, self.ready)
            except OSError as exc:
                await self.server.stop(0)
                raise ConfigError(f"--metrics-port: cannot bind {config.host}:{config.metrics_port} "
                                  f"({exc.strerror or exc})") from None
        self.recorder.start()
        if config.redis_url:
            log.info("statistics: flushing into Redis as replica %s", self.recorder.replica_id)
        if self.watcher is not None:
            self.watcher.start()
        if serving:
            await self.set_serving()
        return self.port

    async def set_serving(self) -> None:
        """Report SERVING (health, /ready): every model on disk is loaded and warmed up by now."""
        for service in ("", V1_SERVICE, KSERVE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._started = True

    def ready(self) -> bool:
        """Whether the server takes inference requests: its models are loaded and it is not draining (read by
        the HTTP health thread: plain attribute reads only)."""
        return self._started and not self.runtime.draining

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, flush statistics."""
        grace = self.config.grace_s if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.runtime.start_draining()
        await self.health.enter_graceful_shutdown()
        # New inference calls now get UNAVAILABLE (which clients retry elsewhere) and idle streams end with it,
        # while the accepted requests finish; then gRPC stops without cancelling a call (RpcRuntime.stop_grpc).
        await self.runtime.drained(deadline)
        if self.server is not None:
            # At least a moment for the calls held while the stop begins, even when the grace period is spent.
            await self.runtime.stop_grpc(self.server.stop(max(HELD_CALLS_S, deadline - loop.time())))
        if self.watcher is not None:
            await self.watcher.close()
        await self.registry.close(grace)
        if self.recorder is not None:
            await self.recorder.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()  # waits for its thread's loop to end
            self._metrics_http.server_close()
        self.executor.shutdown(wait=True, cancel_futures=False)
