"""The server's one configuration source: command-line flags, each with a RATER_SERVER_* env fallback."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path

ENV_PREFIX = "RATER_SERVER_"


class ConfigError(ValueError):
    """A configuration that cannot be served; printed as one line."""


@dataclass(frozen=True)
class ServerConfig:
    repository: Path
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 0  # 0: no Prometheus endpoint
    redis_url: str = ""  # empty: statistics in process memory
    # Dynamic batching: at most max_batch triples per onnxruntime run, waiting at most max_delay_ms for
    # more requests once one is queued. max_batch 0 switches batching off (one run per request).
    max_batch: int = 8192
    max_delay_ms: float = 0.0  # Triton's default too: batch what queued up while the instances were busy
    max_queue: int = 1024  # requests waiting per model version before RESOURCE_EXHAUSTED
    instances: int = 1  # onnxruntime runs in flight at once per model version (batching on)
    inline_max_triples: int = 0  # runs this small execute on the event loop thread, not in a worker
    device: str = "auto"
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per core)
    graph_optimization: str = "all"
    auth_token_file: str = ""
    auth_all: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    max_message_mb: int = 64
    grace_s: float = 10.0
    switch_interval_ms: float = 0.5  # Python's GIL switch interval in the server process
    stats_flush_s: float = 0.5
    stats_ttl_s: int = 7 * 24 * 3600

    @property
    def batching(self) -> bool:
        return self.max_batch > 0

    def describe(self) -> str:
        items = asdict(self)
        items["repository"] = str(self.repository)
        if self.redis_url:
            items["redis_url"] = _redact(self.redis_url)
        return " ".join(f"{k}={v}" for k, v in items.items())


def _redact(url: str) -> str:
    """redis://user:secret@host -> redis://user:***@host."""
    if "@" in url and ":" in url.split("@", 1)[0].split("//", 1)[-1]:
        scheme, rest = url.split("//", 1) if "//" in url else ("", url)
        cred, host = rest.split("@", 1)
        return f"{scheme}//{cred.split(':', 1)[0]}:***@{host}"
    return url


def _env(name: str, default):
    return os.environ.get(ENV_PREFIX + name.upper(), default)


def _env_bool(name: str) -> bool:
    return str(_env(name, "")).lower() in ("1", "true", "yes", "on")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig(repository=Path("."))
    add = parser.add_argument
    add("--repository", default=_env("repository", None),
        help="model repository <repo>/<name>/<version>/model.onnx (env RATER_SERVER_REPOSITORY)")
    add("--host", default=_env("host", d.host), help="address to bind (default %(default)s)")
    add("--port", type=int, default=int(_env("port", d.port)), help="gRPC port (default %(default)s)")
    add("--metrics-port", type=int, default=int(_env("metrics_port", d.metrics_port)),
        help="Prometheus /metrics port; 0 = off (default %(default)s)")
    add("--redis-url", default=_env("redis_url", d.redis_url),
        help="Redis for the shared score statistics; empty = in process memory")
    add("--max-batch", type=int, default=int(_env("max_batch", d.max_batch)),
        help="max (x0,t,eps) triples per onnxruntime run; 0 switches batching off (default %(default)s)")
    add("--max-delay-ms", type=float, default=float(_env("max_delay_ms", d.max_delay_ms)),
        help="max time a queued request waits for others to join its batch (default %(default)s)")
    add("--max-queue", type=int, default=int(_env("max_queue", d.max_queue)),
        help="requests queued per model version before RESOURCE_EXHAUSTED (default %(default)s)")
    add("--instances", type=int, default=int(_env("instances", d.instances)),
        help="batches run at once per model version, like Triton's instance count (default %(default)s)")
    add("--inline-max-triples", type=int, default=int(_env("inline_max_triples", d.inline_max_triples)),
        help="runs of at most this many triples execute on the event loop, skipping the thread handoff; "
             "0 = never (default %(default)s)")
    add("--device", choices=("auto", "cpu", "cuda"), default=_env("device", d.device),
        help="onnxruntime execution provider: auto = CUDA when available (default %(default)s)")
    add("--intra-op-threads", type=int, default=int(_env("intra_op_threads", d.intra_op_threads)),
        help="onnxruntime intra-op threads; 0 = one per core (default %(default)s)")
    add("--graph-optimization", choices=("disable", "basic", "extended", "all"),
        default=_env("graph_optimization", d.graph_optimization), help="onnxruntime graph optimisation level")
    add("--auth-token-file", default=_env("auth_token_file", d.auth_token_file),
        help="file holding the bearer token that admin RPCs (deploy, unload, set default) require")
    add("--auth-all", action="store_true", default=_env_bool("auth_all"),
        help="require the token on every RPC (health checks excepted)")
    add("--tls-cert", default=_env("tls_cert", d.tls_cert), help="PEM certificate chain: serve TLS")
    add("--tls-key", default=_env("tls_key", d.tls_key), help="PEM private key for --tls-cert")
    add("--max-message-mb", type=int, default=int(_env("max_message_mb", d.max_message_mb)),
        help="max gRPC message size in MiB, both directions (default %(default)s)")
    add("--grace-s", type=float, default=float(_env("grace_s", d.grace_s)),
        help="on SIGTERM, time in-flight requests get to finish (default %(default)s)")
    add("--switch-interval-ms", type=float, default=float(_env("switch_interval_ms", d.switch_interval_ms)),
        help="Python GIL switch interval; short keeps onnxruntime threads from waiting (default %(default)s)")
    add("--stats-flush-s", type=float, default=float(_env("stats_flush_s", d.stats_flush_s)),
        help="interval of the background statistics flush (default %(default)s)")
    add("--stats-ttl-s", type=int, default=int(_env("stats_ttl_s", d.stats_ttl_s)),
        help="expiry of the statistics keys in Redis (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if not args.repository:
        raise ConfigError("--repository is required (or set RATER_SERVER_REPOSITORY)")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    for flag, value in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                        ("--auth-token-file", args.auth_token_file)):
        if value and not Path(value).is_file():
            raise ConfigError(f"{flag}: no such file {value}")
    if args.auth_all and not args.auth_token_file:
        raise ConfigError("--auth-all needs --auth-token-file")
    checks = (
        ("--port", 0 <= args.port < 65536), ("--metrics-port", 0 <= args.metrics_port < 65536),
        ("--max-batch", args.max_batch >= 0), ("--max-delay-ms", args.max_delay_ms >= 0),
        ("--max-queue", args.max_queue >= 1), ("--instances", args.instances >= 1),
        ("--inline-max-triples", args.inline_max_triples >= 0),
        ("--intra-op-threads", args.intra_op_threads >= 0),
        ("--max-message-mb", args.max_message_mb >= 1), ("--grace-s", args.grace_s >= 0),
        ("--switch-interval-ms", args.switch_interval_ms > 0),
        ("--stats-flush-s", args.stats_flush_s > 0), ("--stats-ttl-s", args.stats_ttl_s >= 1),
    )
    for flag, ok in checks:
        if not ok:
            raise ConfigError(f"{flag}: value {getattr(args, flag[2:].replace('-', '_'))} is out of range")
    return ServerConfig(
        repository=Path(args.repository), host=args.host, port=args.port, metrics_port=args.metrics_port,
        redis_url=args.redis_url, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
        max_queue=args.max_queue, instances=args.instances, device=args.device,
        inline_max_triples=args.inline_max_triples,
        intra_op_threads=args.intra_op_threads,
        graph_optimization=args.graph_optimization, auth_token_file=args.auth_token_file,
        auth_all=args.auth_all, tls_cert=args.tls_cert, tls_key=args.tls_key,
        max_message_mb=args.max_message_mb, grace_s=args.grace_s,
        switch_interval_ms=args.switch_interval_ms, stats_flush_s=args.stats_flush_s,
        stats_ttl_s=args.stats_ttl_s,
    )
