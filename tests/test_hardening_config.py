"""Hardening, configuration and start-up: secrets stay out of the log, the Redis URL can come from somewhere
other than the command line, an explicitly insecure admin set-up is announced, and a bad TLS key is named as
such. Each test starts `rater-server serve` as a child process."""

from __future__ import annotations

import shutil

import grpc
import pytest
from support import free_port
from support.hostile import (
    ServerProcess,
    call_code,
    new_flags,
    plain_rater_bytes,
    rater_stub,
    select_request,
    self_signed_cert,
    write_repository,
)

from noiserater.core.v1 import rater_service_pb2 as pb


@pytest.fixture
def repo(tmp_path):
    return write_repository(tmp_path / "repo", {"digits": plain_rater_bytes()})


def test_insecure_admin_serves_admin_rpcs_and_warns_at_start(repo):
    """With --insecure-admin (and no token file) DeployModel works without a token, and the server's output has
    a warning line about the open admin RPCs (written at start-up)."""
    with ServerProcess(repo, env=new_flags(insecure_admin=True)) as server:
        server.wait_serving()
        with server.channel() as channel:
            code = call_code(rater_stub(channel).DeployModel,
                             pb.DeployModelRequest(name="open", onnx=plain_rater_bytes()), timeout=60)
        output = server.output
    assert code == grpc.StatusCode.OK
    warnings = [line for line in output.splitlines() if "warn" in line.lower() and "admin" in line.lower()]
    assert warnings, output


def test_redis_password_is_not_logged(repo):
    """--redis-url redis://:p%40ss@127.0.0.1:PORT/0?password=secret shows neither password (decoded or not) nor
    the query's secret anywhere in the start-up output."""
    url = f"redis://:p%40ss@127.0.0.1:{free_port()}/0?password=secret"
    with ServerProcess(repo, "--redis-url", url) as server:
        server.wait_serving()
        output = server.output
    leaks = [s for s in ("secret", "p@ss", "p%40ss") if s in output]
    assert not leaks, [line for line in output.splitlines() if any(s in line for s in leaks)]


@pytest.mark.parametrize("source", [
    "env",
    "file",
])
def test_redis_url_from_environment_or_file(repo, tmp_path, redis_url, source):
    """The Redis URL can be kept off the command line: given as RATER_SERVER_REDIS_URL, or in a file named by
    --redis-url-file (RATER_SERVER_REDIS_URL_FILE); the statistics then land in that Redis."""
    import redis

    if source == "env":
        env = {"RATER_SERVER_REDIS_URL": redis_url}
    else:
        (tmp_path / "redis-url").write_text(redis_url + "\n")
        env = new_flags(redis_url_file=tmp_path / "redis-url")
    dataset = f"redis-url-from-{source}"
    with ServerProcess(repo, env=env) as server:
        server.wait_serving()
        with server.channel() as channel:
            stub = rater_stub(channel)
            stub.SelectNoise(select_request(2, 4, dataset=dataset), timeout=30)
            stub.GetStats(pb.GetStatsRequest(dataset=dataset), timeout=30)  # flushes first
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"nr:stats:{dataset}:*"))
    finally:
        client.close()


def test_bad_tls_key_is_reported_as_a_key_problem(repo, tmp_path):
    """A --tls-key file that holds no valid private key makes rater-server exit 1 with a one-line error about the
    key, not about binding the address."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, _ = self_signed_cert(tmp_path)
    bad_key = tmp_path / "bad-key.pem"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    with ServerProcess(repo, "--tls-cert", str(cert), "--tls-key", str(bad_key)) as server:
        code = server.wait_exit(60)
        output = server.wait_output()
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert code == 1, output[-2000:]
    assert len(errors) == 1 and "key" in errors[0].lower() and "bind" not in errors[0].lower(), errors
