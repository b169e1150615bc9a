"""`rater-server`: the command line. Errors are one line on stderr and a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from noiserater.server.config import ConfigError, add_serve_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rater-server",
        description="NoiseRater rater server: batched gRPC scoring of candidate noises with onnxruntime.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve every model of a repository over gRPC (v1 + KServe v2)",
                           description="Serve every <name>/<version>/model.onnx of a repository. Each flag "
                                       "falls back to an environment variable RATER_SERVER_<FLAG>. A model's "
                                       "<name>/config.pbtxt (Triton's format) overrides the batching flags for "
                                       "that model.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate an ONNX rater as a deploy would (checker, signature, warm-up)")
    check.add_argument("onnx", help="path of the ONNX file")
    check.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    check.set_defaults(func=cmd_check)
    health = sub.add_parser(
        "health", help="exit 0 when a rater server reports SERVING over grpc health (the image's HEALTHCHECK)",
        description="Ask a rater server's grpc.health.v1 Check; exit 0 when it answers SERVING, else print why "
                    "and exit 1. Reads the server's own environment: RATER_SERVER_PORT (and RATER_SERVER_HOST "
                    "unless it is a wildcard address) for the target, and speaks TLS when RATER_SERVER_TLS_CERT "
                    "is set, trusting that certificate and checking it for one of its own names.")
    health.add_argument("--target", default="", help="HOST:PORT (default 127.0.0.1:$RATER_SERVER_PORT, or 50051)")
    health.add_argument("--tls-cert", default=os.environ.get("RATER_SERVER_TLS_CERT", ""),
                        help="the server's PEM certificate: speak TLS (env RATER_SERVER_TLS_CERT)")
    health.add_argument("--tls-ca", default="", help="PEM roots to verify the server with (default: --tls-cert)")
    health.add_argument("--tls-server-name", default="",
                        help="name to check the certificate for (default: the certificate's first name)")
    health.add_argument("--service", default="", help="health service name; empty = the whole server")
    health.add_argument("--timeout-s", type=float, default=4.0, help="deadline of the check (default %(default)s)")
    health.set_defaults(func=cmd_health)
    return parser


WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def health_target() -> str:
    host = os.environ.get("RATER_SERVER_HOST", "")
    host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{os.environ.get('RATER_SERVER_PORT') or 50051}"


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from noiserater.server.tls import certificate_names

    target = args.target or health_target()
    if args.tls_cert:
        roots = args.tls_ca or args.tls_cert
        if not os.path.isfile(roots):
            raise ConfigError(f"{'--tls-ca' if args.tls_ca else '--tls-cert'}: no such file {roots}")
        with open(roots, "rb") as pem:
            credentials = grpc.ssl_channel_credentials(root_certificates=pem.read())
        names = [n for n in certificate_names(args.tls_cert) if "*" not in n]
        name = args.tls_server_name or (names[0] if names else "localhost")
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s).status
        except grpc.RpcError as exc:
            detail = (exc.details() or "").strip().splitlines()
            raise ConfigError(f"health: {target}: {exc.code().name}: {detail[0] if detail else ''}") from None
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{target}: {name}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from noiserater.server.validate import Limits, Validator, open_session

    path = Path(args.onnx)
    if not path.is_file():
        raise ConfigError(f"onnx: no such file {path}")
    data = path.read_bytes()
    asyncio.run(Validator(Limits()).check(data))  # in a separate, resource-limited process, as a deploy is
    session = open_session(data, device=args.device)
    info = session.info
    print(f"ok: {path} data_shape={list(info.data_shape)} num_timesteps={info.num_timesteps} "
          f"objective={info.objective} dataset={info.dataset or '-'} provider={session.provider}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from noiserater.server.workers import Supervisor, WorkerHandshake

    config = config_from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handshake = WorkerHandshake.from_environment()
    if config.workers > 1 and handshake is None:
        print(f"rater-server config: {config.describe()}", flush=True)
        return Supervisor(config).run()
    if handshake is None:
        print(f"rater-server config: {config.describe()}", flush=True)
    else:
        from noiserater.server import shared_slots

        shared_slots.configure(handshake.slots_dir)
    return asyncio.run(_serve(config, handshake))


async def _serve(config, handshake=None) -> int:
    """Serve until SIGTERM/SIGINT. A worker (`handshake`, see workers.py) reports SERVING only once the
    supervisor says every worker is up."""
    from noiserater.server.app import RaterServer

    # onnxruntime runs in worker threads that need the GIL for a moment before and after each run; with
    # the default 5 ms switch interval they wait behind the busy event loop for up to 5 ms each time,
    # which held every batch back (measured: 8.6 ms average queue time at 16 clients). 0.5 ms keeps the
    # handoffs short at a small cost in switching.
    sys.setswitchinterval(config.switch_interval_ms / 1000.0)

    server = RaterServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.start(serving=handshake is None)
    except ConfigError:
        raise
    except Exception as exc:  # bind failure, bad TLS files, ...: one line, not a traceback
        raise ConfigError(f"cannot start: {_first_line(exc)}") from None
    for problem in server.load_problems:
        print(f"rater-server warning: skipped {problem}", file=sys.stderr, flush=True)
    versions = [v for model in server.registry.list() for v in model.versions]
    loaded = [f"{v.name}:{v.version}" for v in versions]
    provider = {v.session.provider for v in versions}
    print(f"rater-server loaded {len(loaded)} model versions: {', '.join(loaded) or '-'} "
          f"(providers: {', '.join(sorted(provider)) or '-'})", flush=True)
    if handshake is None:
        print(f"rater-server listening on {config.host}:{port}", flush=True)
    else:
        handshake.ready()
        if await loop.run_in_executor(None, handshake.wait_go):
            await server.set_serving()
        else:  # the supervisor is gone
            stop.set()
    await stop.wait()
    print(f"rater-server draining (grace {config.grace_s:g}s)", flush=True)
    await server.stop()
    c = server.runtime.counters
    print(f"rater-server stopped: {c.received} inference requests received, {c.answered} answered, "
          f"{c.dropped} dropped", flush=True)
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every expected failure (config, files, validation) ends as one line
        print(f"rater-server: error: {_first_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
