"""RaterChannel: the one way a client reaches a rater server.

Every caller (the remote NoiseSelector, nrctl deploy / models / stats, nrctl quickstart, the serving bench)
builds its channel here, so the pieces that must agree are written once:

- the target: one address ("host:port", or any gRPC target such as "dns:///raters:50051") or several
  ("a:50051,b:50051", or a list). Several addresses are resolved once, here, and balanced with gRPC's
  round_robin; `round_robin=True` also balances the addresses one DNS name resolves to;
- the message size limit (both directions), TLS (a PEM root certificate) and the bearer token, sent as
  `authorization: Bearer <token>` metadata on every call;
- retries: with `max_attempts` >= 2, gRPC retries UNAVAILABLE on the RaterService's unary calls with
  exponential backoff (0.05 s doubling up to 1 s), also a call in flight on a server that dies (on another
  address, round_robin picking a connected one): the whole request is kept for that, up to the message size
  limit; `max_attempts=1` turns retries off. SelectNoiseStream is not retried by gRPC: the stream transport
  retries it itself;
- the default deadline `timeout_s` of `call`;
- reconnection: after a failed connection attempt gRPC waits 0.1 s, growing to at most 0.5 s (its own
  default grows to 120 s), so a client is back within about half a second of a server's return however
  long the outage lasted.

`health` reads the server's grpc health status (`SERVING` once every model is loaded, `NOT_SERVING` while
draining) without the grpcio-health-checking package; `tls_handshake` tells a client that could not
connect whether the server speaks TLS and whether its certificate is trusted.

The synchronous channel opens on first use. `aio_channel` builds a grpc.aio channel with the same target,
options and credentials (the bench's load generator runs its clients on one event loop).
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import grpc

SERVICE = "noiserater.v1.RaterService"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_ATTEMPTS = 4
RECONNECT_BACKOFF_MS = (100, 500)  # gRPC's wait after a failed connection attempt: initial, maximum
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus


class ChannelError(ValueError):
    """A target that names no address, or several addresses that cannot share one channel."""


def split_target(target: str | Sequence[str]) -> list[str]:
    """The addresses a target names: a list, or a comma-separated string. A target in gRPC's own syntax for
    several addresses ("ipv4:a:p,b:p", "ipv6:...") is one target."""
    if isinstance(target, str):
        parts = [target] if target.startswith(("ipv4:", "ipv6:")) else target.split(",")
    else:
        parts = list(target)
    addresses = [part.strip() for part in parts if part.strip()]
    if not addresses:
        raise ChannelError(f"target: no address in {target!r}")
    return addresses


def _resolve(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The host's IP address: a literal as is, a name by the system resolver (its first IPv4 address, if any)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ChannelError(f"target: cannot resolve {host!r} ({exc})") from None
    ips = [ipaddress.ip_address(info[4][0]) for info in found]
    return next((ip for ip in ips if ip.version == 4), ips[0])


def grpc_target(addresses: list[str]) -> str:
    """One gRPC target for `addresses`: the address itself, or an ipv4:/ipv6: list of the resolved ones."""
    if len(addresses) == 1:
        return addresses[0]
    resolved = []
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ChannelError(f"target: {address!r} is not HOST:PORT (several addresses each need a port)")
        resolved.append((_resolve(host.strip("[]")), port))
    versions = {ip.version for ip, _ in resolved}
    if len(versions) > 1:
        raise ChannelError(f"target: {', '.join(addresses)} mixes IPv4 and IPv6 addresses")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in resolved)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in resolved)


def service_config(max_attempts: int, round_robin: bool) -> dict[str, Any]:
    """gRPC service config: UNAVAILABLE retried with backoff (max_attempts >= 2) and round_robin balancing."""
    config: dict[str, Any] = {}
    if max_attempts >= 2:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }, {
            # The stream transport retries a failed stream itself; gRPC's retries under it would multiply
            # each of its attempts by max_attempts.
            "name": [{"service": SERVICE, "method": "SelectNoiseStream"}],
        }]
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    return config


class RaterChannel:
    """A channel to one rater server or several (see the module doc)."""

    def __init__(self, target: str | Sequence[str], *, token: str | None = None,
                 tls_root_cert: bytes | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 round_robin: bool = False):
        addresses = split_target(target)
        self.target = ",".join(addresses)  # as the user named it, for messages
        self.grpc_target = grpc_target(addresses)
        self.timeout_s = timeout_s
        self.metadata: tuple[tuple[str, str], ...] | None = (("authorization", f"Bearer {token}"),) if token else None
        self.tls_root_cert = tls_root_cert
        self.credentials = grpc.ssl_channel_credentials(tls_root_cert) if tls_root_cert is not None else None
        self.options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        ]
        config = service_config(max_attempts, round_robin or len(addresses) > 1)
        if max_attempts >= 2:
            # gRPC retries a call only while it still holds the whole request, by default 256 KiB of it: a
            # selection larger than that, in flight on a replica that dies, would fail instead of moving on.
            self.options += [("grpc.enable_retries", 1), ("grpc.per_rpc_retry_buffer_size", max_message_bytes)]
        if config:
            self.options.append(("grpc.service_config", json.dumps(config)))
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._lock = threading.Lock()

    @property
    def channel(self) -> grpc.Channel:
        """The synchronous channel, opened on first use."""
        with self._lock:
            if self._channel is None:
                if self.credentials is not None:
                    self._channel = grpc.secure_channel(self.grpc_target, self.credentials, self.options)
                else:
                    self._channel = grpc.insecure_channel(self.grpc_target, self.options)
            return self._channel

    @property
    def stub(self) -> Any:
        """A RaterServiceStub on `channel`."""
        if self._stub is None:
            from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc

            self._stub = pb_grpc.RaterServiceStub(self.channel)
        return self._stub

    def call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """One unary RaterService call (`method` as named in the proto) with the channel's metadata and
        deadline (`timeout_s` overrides it for this call)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)

    def health(self, timeout_s: float, wait_for_ready: bool = False) -> int:
        """The server's overall grpc health status (`SERVING` = 1, `NOT_SERVING` = 2; 0 = unknown);
        grpc.RpcError when the call fails. `wait_for_ready` waits (up to `timeout_s`) for the channel to
        connect instead of failing at once while it cannot."""
        check = self.channel.unary_unary(HEALTH_CHECK)  # bytes in, bytes out: HealthCheckRequest{service=""}
        return _health_status(check(b"", timeout=timeout_s, metadata=self.metadata, wait_for_ready=wait_for_ready))

    def aio_channel(self, *extra_options: tuple[str, Any]) -> grpc.aio.Channel:
        """A new grpc.aio channel with this target, options (plus `extra_options`, such as
        ("grpc.channel_id", i) to keep several apart) and credentials; pass `metadata` on its calls."""
        options = [*self.options, *extra_options]
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.grpc_target, self.credentials, options)
        return grpc.aio.insecure_channel(self.grpc_target, options)

    def close(self) -> None:
        with self._lock:
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def tls_handshake(self, timeout_s: float = 1.0) -> tuple[str, str]:
        """What one TLS handshake with the channel's address says, checking the server's certificate against
        `tls_root_cert` when the channel has one: ("tls", "") when it completes, ("plaintext", why) when the
        server answers with something that is not TLS, ("untrusted", why) when the certificate fails the
        check, ("unreachable", why) without a connection or a single HOST:PORT address, ("failed", why)
        otherwise. How a client tells a TLS mismatch, which gRPC reports as UNAVAILABLE, from an outage."""
        address = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:/\[\]]+):(\d+)", self.grpc_target)
        if address is None:
            return "unreachable", f"{self.grpc_target} is not one HOST:PORT address"
        host, port = (address[1], address[2]) if address[1] else (address[3], address[4])
        if self.tls_root_cert is None:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cadata=self.tls_root_cert.decode("ascii", "replace"))
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        except (OSError, ValueError) as exc:
            return "unreachable", str(exc)
        try:
            with sock, context.wrap_socket(sock, server_hostname=host):
                return "tls", ""
        except ssl.SSLCertVerificationError as exc:
            return "untrusted", exc.verify_message or str(exc)
        except ssl.SSLError as exc:
            return ("plaintext" if exc.reason == "WRONG_VERSION_NUMBER" else "failed"), str(exc)
        except OSError as exc:
            return "failed", str(exc)

    def __enter__(self) -> RaterChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _health_status(message: bytes) -> int:
    """The `status` (field 1, a varint) of a serialized grpc.health.v1.HealthCheckResponse."""
    if not message or message[0] != 0x08:
        return 0
    value, shift = 0, 0
    for byte in message[1:]:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    return 0
