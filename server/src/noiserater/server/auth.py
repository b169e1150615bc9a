"""Who may call what, as a grpc.aio server interceptor.

The admin RPCs (deploy, unload, set default; the KServe repository extension's index, load and unload)
are refused with PERMISSION_DENIED unless the server has a
token (`--auth-token-file`: they then need `authorization: Bearer <token>`) or was started with
`--insecure-admin`, like Triton's model control, which is off unless asked for. With --auth-all every RPC
needs the token, except grpc.health.v1 so that load balancers and container health checks keep working
without the secret.

A refusal is decided from the call's metadata alone, before any request message is read, and answered with
a handler of the method's own kind: a stream whose client sends nothing is refused at once too.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

ADMIN_METHODS = frozenset({
    "/noiserater.v1.RaterService/DeployModel",
    "/noiserater.v1.RaterService/UnloadModel",
    "/noiserater.v1.RaterService/SetDefaultVersion",
    "/inference.GRPCInferenceService/RepositoryIndex",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
})
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_DISABLED = ("admin RPCs are disabled on this server: start it with --auth-token-file FILE (then send "
                  "'authorization: Bearer <token>') or --insecure-admin")


class AuthConfigError(ValueError):
    pass


def read_token(path: str) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise AuthConfigError(f"--auth-token-file: {path} is empty")
    return token


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """`token` None: no token configured; the admin RPCs are then refused unless `insecure_admin`."""

    def __init__(self, token: str | None, protect_all: bool = False, insecure_admin: bool = False):
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._protect_all = protect_all and token is not None
        self._insecure_admin = insecure_admin

    def _reason(self, metadata) -> str | None:
        """None when the call carries the right token, else why not."""
        for item in metadata or ():
            key, value = item[0], item[1]
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return None
                return "authorization: invalid bearer token"
        return "authorization: missing bearer token (metadata 'authorization: Bearer <token>')"

    def authenticated(self, metadata) -> bool:
        """Whether call metadata carries the right token (never, when no token is configured)."""
        return self._expected is not None and self._reason(metadata) is None

    def _refusal(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        if method.startswith(OPEN_PREFIXES):
            return None
        admin = method in ADMIN_METHODS
        if self._expected is None:
            if admin and not self._insecure_admin:
                return grpc.StatusCode.PERMISSION_DENIED, ADMIN_DISABLED
            return None
        if self._protect_all or admin:
            reason = self._reason(metadata)
            if reason is not None:
                return grpc.StatusCode.UNAUTHENTICATED, reason
        return None

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        refusal = self._refusal(handler_call_details.method, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:  # None: an unknown method, which gRPC answers UNIMPLEMENTED
            return handler
        return _denial(handler, *refusal)


def _denial(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, reason: str) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that ends the call with `code` without reading a request message (a
    streaming request is never iterated; a unary one is the message gRPC already received)."""

    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, reason)

    async def deny_streaming(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, reason)
        yield  # pragma: no cover - makes this an async generator, as response-streaming handlers are

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_streaming)
    return grpc.unary_unary_rpc_method_handler(deny)
