"""Hardening, model uploads: what DeployModel accepts decides what the server later runs, reads and writes, so an
upload that reads the server's files, scores non-finitely or carries a malformed name must be refused, and every
change to the served models leaves an audit line. One `rater-server` child process with an admin token, started
in a working directory that holds a file the uploads must never reach."""

from __future__ import annotations

import hashlib
import re

import grpc
import numpy as np
import pytest
from support.hostile import (
    ADMIN,
    TOKEN,
    ServerProcess,
    call_code,
    external_data_rater_bytes,
    inf_on_real_input_rater_bytes,
    padded_rater_bytes,
    plain_rater_bytes,
    rater_stub,
    score_request,
    select_request,
    wait_for,
    write_repository,
)

from noiserater.core import codec
from noiserater.core.v1 import rater_service_pb2 as pb

SECRET = b"0123456789abcdef-this-is-the-servers-own-file-do-not-leak-it-!!!"  # 64 bytes


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    (workdir / "secret.txt").write_bytes(SECRET)
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    repo = write_repository(workdir / "repo", {"digits": plain_rater_bytes()})
    with ServerProcess(repo, "--auth-token-file", str(token_file), cwd=workdir) as server:
        yield server.wait_serving()


def deploy(server: ServerProcess, name: str, onnx: bytes, version: int = 0) -> grpc.StatusCode:
    with server.channel() as channel:
        return call_code(rater_stub(channel).DeployModel, pb.DeployModelRequest(name=name, version=version, onnx=onnx),
                         timeout=60, metadata=ADMIN)


def test_deploy_refuses_external_data_that_reads_the_servers_files(admin_server):
    """An uploaded rater whose weight is external data at a relative location ('secret.txt', a file in the
    server's working directory) is refused with INVALID_ARGUMENT; the file's bytes never come back in scores."""
    assert len(SECRET) == 64
    code = deploy(admin_server, "leak", external_data_rater_bytes("secret.txt"))
    if code == grpc.StatusCode.OK:
        request = score_request(64, model="leak", x0=np.eye(64, dtype=np.float32))
        with admin_server.channel() as channel:
            scores = codec.decode(rater_stub(channel).Score(request, timeout=30).scores)
        leaked = bytes(np.clip(scores, 0, 255).astype(np.uint8))
        assert leaked != SECRET, f"Score returned the server's file: {leaked!r}"
    assert code == grpc.StatusCode.INVALID_ARGUMENT, code


def test_non_finite_scores_fail_the_request_and_stay_out_of_the_statistics(admin_server):
    """A rater that is finite on the all-zeros warm-up input but scores +Inf on real input deploys (or is refused
    at deploy, which is also correct); SelectNoise and Score on real input then end with an error instead of OK
    with Inf, and GetStats for their dataset stays finite."""
    code = deploy(admin_server, "infinite", inf_on_real_input_rater_bytes())
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return  # refusing such a rater up front is correct too
    assert code == grpc.StatusCode.OK
    with admin_server.channel() as channel:
        stub = rater_stub(channel)
        select = call_code(stub.SelectNoise, select_request(4, 4, model="infinite", dataset="inf-ds"), timeout=30)
        score = call_code(stub.Score, score_request(4, model="infinite", dataset="inf-ds"), timeout=30)
        buckets = stub.GetStats(pb.GetStatsRequest(dataset="inf-ds"), timeout=30).buckets
    values = [v for b in buckets for v in (b.mean, b.m2, b.min, b.max)]
    assert np.isfinite(values).all(), f"statistics of inf-ds: {values}"
    assert select != grpc.StatusCode.OK and score != grpc.StatusCode.OK, (select, score)


def test_deploy_refuses_a_name_with_a_trailing_newline(admin_server):
    """DeployModel with the name 'evil\\n' is refused with INVALID_ARGUMENT and creates no repository entry
    whose name contains a newline."""
    code = deploy(admin_server, "evil\n", plain_rater_bytes())
    entries = [p.name for p in admin_server.repository.iterdir()]
    assert not [e for e in entries if "\n" in e], entries
    assert code == grpc.StatusCode.INVALID_ARGUMENT, code


def audit_lines(server: ServerProcess, name: str, digest: str) -> list[str]:
    """Output lines naming the model and a prefix (8+ hex digits) of the upload's sha256."""
    return [line for line in server.output.splitlines()
            if name in line and any(digest.startswith(run) for run in re.findall(r"[0-9a-f]{8,64}", line))]


def test_deploy_and_unload_each_write_one_audit_line(admin_server):
    """A deploy and an unload each write one log line with the model name, its version and a prefix of the
    upload's sha256 digest (the unload's line says 'unload')."""
    data = padded_rater_bytes(1024)
    digest = hashlib.sha256(data).hexdigest()
    assert deploy(admin_server, "audited", data) == grpc.StatusCode.OK
    wait_for(lambda: audit_lines(admin_server, "audited", digest), timeout=3)
    lines = audit_lines(admin_server, "audited", digest)
    assert len(lines) == 1 and re.search(r"\b1\b", lines[0]), lines
    with admin_server.channel() as channel:
        rater_stub(channel).UnloadModel(pb.UnloadModelRequest(model=pb.ModelRef(name="audited", version=1)),
                                        timeout=30, metadata=ADMIN)
    wait_for(lambda: len(audit_lines(admin_server, "audited", digest)) >= 2, timeout=3)
    lines = audit_lines(admin_server, "audited", digest)
    assert len(lines) == 2 and "unload" in lines[1].lower() and re.search(r"\b1\b", lines[1]), lines
