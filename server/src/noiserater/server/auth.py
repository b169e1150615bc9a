"""Bearer-token authentication as a grpc.aio server interceptor.

With a token configured, the admin RPCs (deploy, unload, set default; the KServe repository extension's
index, load and unload) always need
`authorization: Bearer <token>`; with --auth-all every RPC does, except grpc.health.v1 so that load
balancers and container health checks keep working without the secret.
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
STREAMING_PREFIXES = ("/grpc.reflection.",)


class AuthConfigError(ValueError):
    pass


def read_token(path: str) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise AuthConfigError(f"--auth-token-file: {path} is empty")
    return token



class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, protect_all: bool):
        self._expected = f"Bearer {token}".encode()
        self._protect_all = protect_all

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
        """Whether call metadata carries the right token."""
        return self._reason(metadata) is None

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        if self._protect_all or method in ADMIN_METHODS:
            reason = self._reason(handler_call_details.invocation_metadata)
            if reason is not None:
                return _denial(reason, method.startswith(STREAMING_PREFIXES))
        return await continuation(handler_call_details)


def _denial(reason: str, streaming: bool) -> grpc.RpcMethodHandler:
    async def deny_unary(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def deny_stream(request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # pragma: no cover - makes this an async generator, as stream handlers are

    if streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny_unary)
