"""Transport: TLS with --tls-cert/--tls-key (the client and nrctl --tls-ca), and the max message size (oversized ->
RESOURCE_EXHAUSTED)."""

from __future__ import annotations

import json
import shutil
import subprocess

import grpc
import numpy as np
import pytest
from support.server import ServerThread, make_repository
from typer.testing import CliRunner

from noiserater.client.channel import RaterChannel
from noiserater.core import codec
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig


def score_request(n: int) -> pb.ScoreRequest:
    rng = np.random.default_rng(n)
    x0, eps = rng.standard_normal((2, n, 64)).astype(np.float32)
    return pb.ScoreRequest(model=pb.ModelRef(name="digits"), x0=codec.encode(x0),
                           t=codec.encode(rng.integers(0, 100, n)), eps=codec.encode(eps))


def test_tls(tmp_path, rater_onnx):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu", tls_cert=str(cert),
                          tls_key=str(key))
    with ServerThread(config) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
            assert pb_grpc.RaterServiceStub(channel).Score(score_request(3)).model.version == 1
        with RaterChannel(f"localhost:{server.port}", tls_root_cert=cert.read_bytes(), timeout_s=10) as channel:
            assert channel.call("Score", score_request(3)).model.version == 1
        # nrctl's commands that talk to a server take --tls-ca; without it they cannot talk to a TLS server
        from noiserater.cli.main import app

        runner = CliRunner()
        listed = runner.invoke(app, ["models", "--server", f"localhost:{server.port}", "--tls-ca", str(cert), "--json"])
        assert listed.exit_code == 0, listed.output
        assert json.loads(listed.stdout)["models"][0]["name"] == "digits"
        plain = runner.invoke(app, ["models", "--server", f"localhost:{server.port}"])
        assert plain.exit_code == 1 and "UNAVAILABLE" in plain.output
        # and so does bench serve's load generator (--tls-ca)
        import asyncio

        from noiserater.trainer.bench.serve_load import make_request, measure_server
        from noiserater.trainer.bench.serve_windows import Windows

        request, _ = make_request("digits", (64,), 100, 2, 4)
        level = asyncio.run(measure_server(f"localhost:{server.port}", request, 2, 8, Windows(0.05, 0.1, 3, 1.0),
                                           tls_root_cert=cert.read_bytes()))
        assert level.requests > 0 and level.errors == 0
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.RaterServiceStub(channel).Score(score_request(3), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_oversized_message_is_refused_and_the_server_keeps_serving(tmp_path, rater_onnx):
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu", max_message_mb=1)
    with ServerThread(config) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(score_request(4096))  # 2 x 4096 x 64 x 4 bytes = 2 MiB
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Score(score_request(16)).model.version == 1
