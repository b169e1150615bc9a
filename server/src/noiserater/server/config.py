"""The server's one configuration source. Every option is declared once, as a ServerConfig field whose
metadata holds its help text, choices and range check; the `serve` flags (`--<name>`, falling back to the
environment variable RATER_SERVER_<NAME>) and their validation are generated from the fields."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "RATER_SERVER_"


class ConfigError(ValueError):
    """A configuration that cannot be served; printed as one line."""


def option(default: Any, help: str, choices: tuple[str, ...] | None = None,
           valid: Callable[[Any], bool] | None = None) -> Any:
    """A ServerConfig field that is also a `serve` flag; `valid` says which values are in range."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "valid": valid})


def at_least(low: float) -> Callable[[float], bool]:
    return lambda value: value >= low


def positive(value: float) -> bool:
    return value > 0


def valid_port(value: int) -> bool:
    return 0 <= value < 65536


@dataclass(frozen=True)
class ServerConfig:
    repository: Path = dataclasses.field(metadata={
        "help": "model repository <repo>/<name>/<version>/model.onnx (env RATER_SERVER_REPOSITORY)"})
    host: str = option("0.0.0.0", "address to bind (default %(default)s)")
    port: int = option(50051, "gRPC port (default %(default)s)", valid=valid_port)
    metrics_port: int = option(0, "Prometheus /metrics port; 0 = off (default %(default)s)", valid=valid_port)
    redis_url: str = option("", "Redis for the shared score statistics; empty = in process memory. Prefer "
                                "--redis-url-file or the environment to keep a password out of argv")
    redis_url_file: str = option("", "file holding the Redis URL (instead of --redis-url)")
    max_batch: int = option(8192, "max (x0,t,eps) triples per onnxruntime run; 0 switches batching off "
                                  "(default %(default)s)", valid=at_least(0))
    # 0, Triton's default too: batch what queued up while the instances were busy.
    max_delay_ms: float = option(0.0, "max time a queued request waits for others to join its batch "
                                      "(default %(default)s)", valid=at_least(0))
    max_queue: int = option(1024, "requests queued per model version before RESOURCE_EXHAUSTED "
                                  "(default %(default)s)", valid=at_least(1))
    # Limits of one request's and one queue's work, in (x0, t, eps) triples (the expanded rows, what memory and
    # onnxruntime time grow with).
    max_request_triples: int = option(65536, "max triples one request may score (Score: N; SelectNoise: B*K, "
                                             "or B*B for rule assign); beyond: RESOURCE_EXHAUSTED "
                                             "(default %(default)s)", valid=at_least(1))
    max_assign_batch: int = option(256, "max samples B of one rule-assign selection, which scores B*B triples; "
                                        "beyond: RESOURCE_EXHAUSTED (default %(default)s)", valid=at_least(1))
    max_queued_triples: int = option(1 << 20, "triples queued (or running) per model version before "
                                              "RESOURCE_EXHAUSTED; at least --max-request-triples "
                                              "(default %(default)s)", valid=at_least(1))
    max_datasets: int = option(1024, "distinct dataset ids whose statistics this process keeps; a request for "
                                     "a new one beyond it gets RESOURCE_EXHAUSTED (default %(default)s)",
                               valid=at_least(1))
    instances: int = option(1, "batches run at once per model version, like Triton's instance count "
                               "(default %(default)s)", valid=at_least(1))
    inline_max_triples: int = option(0, "runs of at most this many triples execute on the event loop, skipping "
                                        "the thread handoff; 0 = never (default %(default)s)", valid=at_least(0))
    device: str = option("auto", "onnxruntime execution provider: auto = CUDA when available "
                                 "(default %(default)s)", choices=("auto", "cpu", "cuda"))
    intra_op_threads: int = option(0, "onnxruntime intra-op threads; 0 = one per core (default %(default)s)",
                                   valid=at_least(0))
    graph_optimization: str = option("all", "onnxruntime graph optimisation level",
                                     choices=("disable", "basic", "extended", "all"))
    validate_memory_mb: int = option(1024, "address-space limit of the process that validates and warms up a model "
                                           "before it is served, in MiB (default %(default)s)", valid=at_least(256))
    validate_timeout_s: float = option(30.0, "wall-clock (and CPU-time) limit of one model's validation and "
                                             "warm-up, in seconds (default %(default)s)", valid=positive)
    auth_token_file: str = option("", "file holding the bearer token that admin RPCs (deploy, unload, set "
                                      "default) require")
    auth_all: bool = option(False, "require the token on every RPC (health checks excepted)")
    insecure_admin: bool = option(False, "allow the admin RPCs without a token (anyone who reaches the port can "
                                         "deploy and unload); without it or --auth-token-file they are refused")
    tls_cert: str = option("", "PEM certificate chain: serve TLS")
    tls_key: str = option("", "PEM private key for --tls-cert")
    max_message_mb: int = option(64, "max gRPC message size in MiB, both directions (default %(default)s)",
                                 valid=at_least(1))
    reuse_port: bool = option(False, "let several servers share --port (SO_REUSEPORT); off, a port in use is an "
                                     "error")
    workers: int = option(1, "server processes sharing --port (SO_REUSEPORT), each with its own batchers, sessions "
                             "and statistics (--instances counts over all); worker i serves /metrics on "
                             "--metrics-port + i; more than one refuses the admin RPCs (default %(default)s)",
                          valid=at_least(1))
    max_concurrent_rpcs: int = option(1024, "RPCs served at once (a stream counts as one); more get "
                                            "RESOURCE_EXHAUSTED; 0 = unlimited (default %(default)s)",
                                      valid=at_least(0))
    max_stream_in_flight: int = option(256, "unanswered requests per SelectNoiseStream; past it the server reads "
                                            "no more from that stream until answers are written "
                                            "(default %(default)s)", valid=at_least(1))
    grace_s: float = option(10.0, "on SIGTERM, time in-flight requests get to finish (default %(default)s)",
                            valid=at_least(0))
    switch_interval_ms: float = option(0.5, "Python GIL switch interval; short keeps onnxruntime threads from "
                                            "waiting (default %(default)s)", valid=positive)
    stats_flush_s: float = option(0.5, "interval of the background statistics flush (default %(default)s)",
                                  valid=positive)
    stats_ttl_s: int = option(7 * 24 * 3600, "expiry of the statistics keys in Redis (default %(default)s)",
                              valid=at_least(1))
    repository_poll_s: float = option(0.0, "rescan the repository every N seconds: load the versions written "
                                           "into it, unload those removed (as Triton's --model-control-mode=poll); "
                                           "0 = off (default %(default)s)", valid=at_least(0))

    def describe(self) -> str:
        items = asdict(self)
        items["repository"] = str(self.repository)
        if self.redis_url:
            items["redis_url"] = _redact(self.redis_url)
        return " ".join(f"{k}={v}" for k, v in items.items())


def _redact(url: str) -> str:
    """The URL with its secrets masked: the password of the userinfo (everything up to the last "@", so a
    password holding "@" is masked whole; a userinfo without ":" may be a password and is masked whole) and
    any password=... query parameter. redis://user:secret@host -> redis://user:***@host."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        userinfo, host = rest.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}:***@{host}" if colon else f"***@{host}"
    rest = re.sub(r"(?i)([?&;](?:password|pass|passwd|pwd)=)[^&;#]*", r"\1***", rest)
    return f"{scheme}{sep}{rest}"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_default(field: dataclasses.Field) -> Any:
    """The field's default, overridden by its RATER_SERVER_* variable when that is set."""
    default = None if field.default is dataclasses.MISSING else field.default
    raw = os.environ.get(ENV_PREFIX + field.name.upper())
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int | float):
        return type(default)(raw)
    return raw


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(ServerConfig):
        meta, default = field.metadata, _env_default(field)
        if isinstance(default, bool):
            parser.add_argument(_flag(field.name), action="store_true", default=default, help=meta["help"])
            continue
        kind = None if default is None or isinstance(default, str) else type(default)
        parser.add_argument(_flag(field.name), type=kind, default=default, choices=meta.get("choices"),
                            help=meta["help"])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if not args.repository:
        raise ConfigError("--repository is required (or set RATER_SERVER_REPOSITORY)")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    for name in ("tls_cert", "tls_key", "auth_token_file", "redis_url_file"):
        value = getattr(args, name)
        if value and not Path(value).is_file():
            raise ConfigError(f"{_flag(name)}: no such file {value}")
    if args.auth_all and not args.auth_token_file:
        raise ConfigError("--auth-all needs --auth-token-file")
    if args.insecure_admin and args.auth_token_file:
        raise ConfigError("--insecure-admin and --auth-token-file exclude each other (the token protects admin)")
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(ServerConfig)}
    if args.redis_url_file:
        values["redis_url"] = _read_redis_url(args.redis_url_file, args.redis_url)
    for field in dataclasses.fields(ServerConfig):
        valid = field.metadata.get("valid")
        if valid is not None and not valid(values[field.name]):
            raise ConfigError(f"{_flag(field.name)}: value {values[field.name]} is out of range")
    if args.max_queued_triples < args.max_request_triples:
        raise ConfigError("--max-queued-triples must be at least --max-request-triples (a queue that cannot take "
                          "one request of the largest size)")
    return ServerConfig(**{**values, "repository": Path(args.repository)})


def _read_redis_url(path: str, given: str) -> str:
    """The URL in --redis-url-file (first non-empty line), which keeps the password out of argv."""
    if given:
        raise ConfigError("--redis-url and --redis-url-file exclude each other")
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--redis-url-file: cannot read {path} ({type(exc).__name__})") from None
    if not lines:
        raise ConfigError(f"--redis-url-file: {path} is empty")
    return lines[0]
