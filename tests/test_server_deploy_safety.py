"""What a deploy (and a start-up load) must survive: uploads that refer to files on the server (external
data), ONNX bombs (unbounded memory, endless warm-up) validated in a limited process, versions beyond the
bound, names with a trailing newline, activations that fail after the write, writers killed half-way; and
what it must tell: one audit line per admin call, no checkpoint paths to callers without the token."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from support import free_port
from support.server import ServerThread, make_repository

from noiserater.core import codec, repository
from noiserater.core.inference import grpc_service_pb2 as kserve_pb
from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig

TOKEN = "s3cret-token"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
SERVER_MEMORY = 4 << 30  # the address-space limit of a rater-server under test: a bomb that got in would hit it


# -- hand-made raters: a valid signature and metadata around whatever `nodes` compute into "extra" --------
def tiny_rater(nodes=(), initializers=()) -> onnx.ModelProto:
    x0 = helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", 4])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, ["N"])
    eps = helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["N", 4])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [*nodes, helper.make_node("ReduceSum", ["x0", "axes"], ["row"], keepdims=0),
         helper.make_node("Add", ["row", "extra"], ["score"])],
        "tiny", [x0, t, eps], [score], initializer=[axes, *initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for key, value in {"noiserater.data_shape": "[4]", "noiserater.num_timesteps": "10"}.items():
        model.metadata_props.add(key=key, value=value)
    return model


def plain_rater() -> bytes:
    return tiny_rater(initializers=[numpy_helper.from_array(np.array(0.5, np.float32), "extra")]).SerializeToString()


def external(tensor: TensorProto, location: str | None) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    if location is not None:
        tensor.external_data.add(key="location", value=location)
    return tensor


def external_initializer(location: str | None) -> bytes:
    weights = external(numpy_helper.from_array(np.zeros(4, np.float32), "stolen"), location)
    return tiny_rater([helper.make_node("ReduceSum", ["stolen"], ["extra"], keepdims=0)], [weights]).SerializeToString()


def external_in_subgraph(location: str) -> bytes:
    """The external tensor hides in a Constant node inside an If branch."""
    hidden = external(numpy_helper.from_array(np.zeros((), np.float32), "hidden"), location)
    branch = helper.make_graph([helper.make_node("Constant", [], ["value"], value=hidden)], "branch", [],
                               [helper.make_tensor_value_info("value", TensorProto.FLOAT, [])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["extra"], then_branch=branch, else_branch=branch)
    return tiny_rater([node], [cond]).SerializeToString()


def memory_bomb() -> bytes:
    """ConstantOfShape([2^32]): 16 GiB of float32 ones."""
    shape = numpy_helper.from_array(np.array([2**32], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("ReduceSum", ["big"], ["extra"], keepdims=0)]
    return tiny_rater(nodes, [shape]).SerializeToString()


def loop_bomb() -> bytes:
    """A Loop of 10^12 iterations."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])])
    inits = [numpy_helper.from_array(np.array(10**12, np.int64), "M"), numpy_helper.from_array(np.array(True), "cond"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    loop = helper.make_node("Loop", ["M", "cond", "zero"], ["extra"], body=body)
    return tiny_rater([loop], inits).SerializeToString()


def score_digits(stub, version: int = 0, timeout: float = 30) -> pb.ScoreResponse:
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 4, 64)).astype(np.float32)
    return stub.Score(pb.ScoreRequest(model=pb.ModelRef(name="digits", version=version), x0=codec.encode(x0),
                                      t=codec.encode(np.arange(4, dtype=np.int64)), eps=codec.encode(eps)),
                      timeout=timeout)


def deploy(stub, name: str, data: bytes, version: int = 0, timeout: float = 60) -> pb.DeployModelResponse:
    return stub.DeployModel(pb.DeployModelRequest(name=name, onnx=data, version=version), metadata=ADMIN,
                            timeout=timeout)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    return path


@pytest.fixture
def server(tmp_path, rater_onnx, token_file):
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, auth_token_file=str(token_file), device="cpu")
    with ServerThread(config) as running, grpc.insecure_channel(running.target) as channel:
        running.stub = pb_grpc.RaterServiceStub(channel)
        running.channel = channel
        yield running


# -- external data ------------------------------------------------------------------------------------
def test_uploads_with_external_data_are_refused_wherever_the_tensor_is(server, tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret bytes")
    monkeypatch.chdir(tmp_path)  # where onnxruntime would resolve a relative location of an in-memory model
    cases = {"initializer": external_initializer("secret.txt"), "absolute": external_initializer(str(secret)),
             "no location": external_initializer(None), "subgraph": external_in_subgraph("secret.txt")}
    for case, data in cases.items():
        err = refused(lambda data=data: deploy(server.stub, "thief", data))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.details())
        assert "external" in err.details() and ("stolen" in err.details() or "hidden" in err.details()), case
        assert len(err.details().splitlines()) == 1
    assert not (server.config.repository / "thief").exists() or not repository.versions_on_disk(
        server.config.repository, "thief")
    assert score_digits(server.stub).model.version == 1


def test_repository_models_read_external_data_only_from_their_version_folder(tmp_path, rater_onnx):
    secret = tmp_path / "secret.bin"
    repo = tmp_path / "repo"

    def with_external_weights(name: str) -> tuple[onnx.ModelProto, Path]:
        model = onnx.load(str(rater_onnx))
        folder = repo / name / "1"
        folder.mkdir(parents=True)
        onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="weights.bin", size_threshold=0)
        return onnx.load(str(folder / "model.onnx"), load_external_data=False), folder

    _, inside = with_external_weights("inside")
    escaping, folder = with_external_weights("escaping")
    (folder / "weights.bin").rename(secret)
    for tensor in escaping.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../secret.bin"
    (folder / "model.onnx").write_bytes(escaping.SerializeToString())
    _, linked = with_external_weights("linked")
    (linked / "weights.bin").unlink()
    (linked / "weights.bin").symlink_to(secret)
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")
    with ServerThread(config) as running, grpc.insecure_channel(running.target) as channel:
        listing = pb_grpc.RaterServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
        problems = running.server.load_problems
    assert [m.name for m in listing.models] == ["inside"]
    assert sorted(p.split(" ")[0] for p in problems) == ["escaping", "linked"], problems
    assert all("not a file inside the version folder" in p for p in problems), problems


# -- ONNX bombs, in a rater-server process with an address-space limit --------------------------------
def rater_server(repo: Path, *flags: str) -> tuple[subprocess.Popen, str, list[str]]:
    """A `rater-server serve` child limited to SERVER_MEMORY; its output lines collect in the list."""
    port = free_port()
    script = Path(sys.executable).parent / "rater-server"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "noiserater.server.main"]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (SERVER_MEMORY, SERVER_MEMORY))

    proc = subprocess.Popen([*command, "serve", "--repository", str(repo), "--host", "127.0.0.1", "--port",
                             str(port), "--device", "cpu", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=limit, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    lines: list[str] = []

    def collect() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=collect, daemon=True).start()
    deadline = time.monotonic() + 120
    try:
        while not any("listening on" in line for line in lines):
            assert proc.poll() is None, "rater-server exited during start-up:\n" + "\n".join(lines[-20:])
            assert time.monotonic() < deadline, "rater-server never started:\n" + "\n".join(lines[-20:])
            time.sleep(0.05)
    except BaseException:
        stop(proc)
        raise
    return proc, f"127.0.0.1:{port}", lines


def validating_children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_onnx_bombs_on_disk_and_uploaded_cost_their_validation_never_the_server(tmp_path, rater_onnx, token_file):
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    for name, data in (("disk-loop", loop_bomb()), ("disk-oom", memory_bomb())):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(data)
    proc, target, lines = rater_server(repo, "--auth-token-file", str(token_file), "--validate-timeout-s", "2")
    try:
        skipped = [line for line in lines if "skipped" in line]
        assert any("disk-loop version 1" in line and "exceeded 2 s" in line for line in skipped), lines
        assert any("disk-oom version 1" in line and "out of memory" in line for line in skipped), lines
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RaterServiceStub(channel)
            err = refused(lambda: deploy(stub, "oom", memory_bomb()))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "out of memory" in err.details() and "1024 MB" in err.details()
            # Endless warm-ups, as many at once as validations run: each is killed at its timeout, and scoring
            # never waits for them.
            outcomes: list[grpc.RpcError] = []

            def bomb() -> None:
                outcomes.append(refused(lambda: deploy(stub, "loop", loop_bomb())))

            bombs = [threading.Thread(target=bomb) for _ in range(2)]
            for bomb in bombs:
                bomb.start()
            while any(bomb.is_alive() for bomb in bombs):
                assert score_digits(stub, timeout=5).model.version == 1
                time.sleep(0.1)
            assert [e.code() for e in outcomes] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, outcomes
            assert all("warm-up exceeded 2 s" in e.details() for e in outcomes), [e.details() for e in outcomes]
            listing = stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert [m.name for m in listing.models] == ["digits"]
            assert deploy(stub, "plain", plain_rater()).model.version == 1
        assert sorted(p.name for p in repo.iterdir()) == ["digits", "disk-loop", "disk-oom", "plain"]
    finally:
        stop(proc)


def test_sigterm_stops_a_server_in_the_middle_of_a_validation(tmp_path, rater_onnx, token_file):
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    proc, target, lines = rater_server(repo, "--auth-token-file", str(token_file), "--validate-timeout-s", "60",
                                       "--grace-s", "1")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RaterServiceStub(channel)
            outcome: list[grpc.RpcError] = []
            bomb = threading.Thread(target=lambda: outcome.append(refused(lambda: deploy(stub, "loop", loop_bomb()))))
            bomb.start()
            deadline = time.monotonic() + 30
            while not (children := validating_children(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # well into the endless warm-up
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, "\n".join(lines[-20:])
            bomb.join(timeout=30)
        assert children, "the upload was never validated in a process of its own"
        assert outcome and outcome[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                                 grpc.StatusCode.RESOURCE_EXHAUSTED), outcome
        for child in children:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not Path(f"/proc/{child}").exists(), "the validating process outlived the server"
    finally:
        stop(proc)


# -- versions ----------------------------------------------------------------------------------------
def test_versions_are_bounded_and_out_of_range_folders_are_skipped(tmp_path, rater_onnx, token_file):
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, auth_token_file=str(token_file), device="cpu")
    data = rater_onnx.read_bytes()
    top = repository.MAX_VERSION
    with ServerThread(config) as running, grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.RaterServiceStub(channel)
        for version in (2**63 - 1, top + 1, -1):
            err = refused(lambda version=version: deploy(stub, "digits", data, version))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "version" in err.details(), err.details()
        assert deploy(stub, "digits", data, top).model.version == top
        err = refused(lambda: deploy(stub, "digits", data))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and str(top) in err.details(), err.details()
        assert score_digits(stub).model.version == top
        listing = stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert [(m.name, [v.version for v in m.versions]) for m in listing.models] == [("digits", [1, top])]
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", str(top)]
    # Folders that look like versions but are none are skipped with one line each; the rest loads.
    for stray in (str(2**63), "007", "0"):
        (repo / "digits" / stray).mkdir()
        (repo / "digits" / stray / "model.onnx").write_bytes(data)
    with ServerThread(config) as running, grpc.insecure_channel(running.target) as channel:
        listing = pb_grpc.RaterServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        problems = running.server.load_problems
    assert [[v.version for v in m.versions] for m in listing.models] == [[1, top]]
    assert sorted(p.split(":")[0] for p in problems) == ["digits/0", "digits/007", f"digits/{2**63}"], problems
    assert all("not a version" in p and "\n" not in p for p in problems)


def test_an_activation_that_fails_leaves_no_version_behind(server, rater_onnx_v2):
    registry = server.server.registry

    def broken(*args):
        raise RuntimeError("activation failed")

    registry._activate = broken
    err = refused(lambda: deploy(server.stub, "digits", rater_onnx_v2.read_bytes()))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert sorted(p.name for p in (server.config.repository / "digits").iterdir()) == ["1"]
    del registry._activate
    assert deploy(server.stub, "digits", rater_onnx_v2.read_bytes()).model.version == 2
    assert score_digits(server.stub).model.version == 2


def test_a_name_with_a_trailing_newline_creates_nothing(server, rater_onnx_v2):
    for name in ("evil\n", "digits\n", "a\nb"):
        err = refused(lambda name=name: deploy(server.stub, name, rater_onnx_v2.read_bytes()))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in err.details(), err.details()
    assert sorted(p.name for p in server.config.repository.iterdir()) == ["digits"]
    assert sorted(p.name for p in (server.config.repository / "digits").iterdir()) == ["1"]


# -- durable writes and what interrupted ones leave ----------------------------------------------------
def test_a_write_fsyncs_the_file_and_the_folders(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    version, path = repository.write_version(tmp_path, "m", b"model bytes", 0)
    assert version == 1 and path.read_bytes() == b"model bytes"
    assert "file" in synced and synced.count("dir") >= 2, synced
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


WRITER = """
import os, sys, time
from noiserater.core import repository
os.fsync = lambda fd: time.sleep(600)  # stalls the write half-way: the model bytes written, nothing renamed
repository.write_version(sys.argv[1], "digits", b"x" * (1 << 20), 5)
"""


def test_start_up_removes_what_a_killed_deploy_left_and_nothing_a_live_one_holds(tmp_path, rater_onnx, caplog):
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx]})
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(repo)])
    try:
        deadline = time.monotonic() + 60
        while not list((repo / "digits").glob(".upload-*/model.onnx")):
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
        (killed,) = (repo / "digits").glob(".upload-*")
        # While its writer lives, an upload is not stale.
        assert repository.remove_stale_uploads(repo) == [] and killed.exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    (repo / "digits" / "9").mkdir()
    old_style = repo / "digits" / "9" / ".upload-abc123"  # a temporary file inside a version folder
    old_style.write_bytes(b"half a model")
    live = repo / "digits" / ".upload-live"
    live.mkdir()
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")
        with caplog.at_level("WARNING", logger="rater-server.models"), ServerThread(config) as running:
            assert [m.name for m in running.server.registry.list()] == ["digits"]
    finally:
        os.close(lock)
    assert sorted(p.name for p in (repo / "digits").iterdir()) == [".upload-live", "1"]
    removed = [r.getMessage() for r in caplog.records if "interrupted deploy" in r.getMessage()]
    assert len(removed) == 3 and any(killed.name in m for m in removed), removed


# -- audit log and metadata --------------------------------------------------------------------------
def test_admin_calls_are_audited_one_line_each(server, rater_onnx_v2, caplog):
    import hashlib

    data = rater_onnx_v2.read_bytes()
    with caplog.at_level("INFO", logger="rater-server.audit"):
        deploy(server.stub, "digits", data)
        server.stub.SetDefaultVersion(pb.SetDefaultVersionRequest(model=pb.ModelRef(name="digits", version=1)),
                                      metadata=ADMIN, timeout=10)
        server.stub.UnloadModel(pb.UnloadModelRequest(model=pb.ModelRef(name="digits", version=2)), metadata=ADMIN,
                                timeout=30)
        refused(lambda: deploy(server.stub, "digits", b"not onnx"))
    lines = [r.getMessage() for r in caplog.records if r.name == "rater-server.audit"]
    assert len(lines) == 4 and all("\n" not in line for line in lines), lines
    deployed, pinned, unloaded, failed = lines
    assert deployed.startswith("deploy: model='digits'") and "serving version 2" in deployed
    assert f"sha256={hashlib.sha256(data).hexdigest()[:16]} size={len(data)}" in deployed
    assert pinned.startswith("set-default: model='digits' version=1")
    assert unloaded.startswith("unload: model='digits' version=2")
    assert failed.startswith("deploy refused:") and "INVALID_ARGUMENT" in failed and "size=8" in failed
    assert all("peer=ipv4:127.0.0.1:" in line and "auth=token" in line for line in lines), lines


def test_metadata_shows_the_full_provenance_only_to_an_authenticated_caller(server, rater_onnx):
    model = onnx.load(str(rater_onnx))
    provenance = {"checkpoint": "/home/alice/runs/secret-project/rater.pt", "stage": "stage1-meta", "steps": 3,
                  "config": {"data_dir": "/srv/data/secret"}, "trained_at": "2025-01-01T00:00:00Z"}
    for prop in model.metadata_props:
        if prop.key == "noiserater.provenance":
            prop.value = json.dumps(provenance)
    deploy(server.stub, "provenanced", model.SerializeToString())
    request = pb.GetModelMetadataRequest(model=pb.ModelRef(name="provenanced"))
    public = server.stub.GetModelMetadata(request, timeout=10).metadata
    assert "/home/alice" not in str(public) and "/srv/data" not in str(public)
    assert json.loads(public["noiserater.provenance"]) == {"stage": "stage1-meta", "steps": 3,
                                                           "trained_at": "2025-01-01T00:00:00Z"}
    for key in ("noiserater.data_shape", "noiserater.num_timesteps", "noiserater.schedule", "noiserater.dataset",
                "noiserater.format", "noiserater.exported_at"):
        assert key in public
    full = server.stub.GetModelMetadata(request, metadata=ADMIN, timeout=10).metadata
    assert json.loads(full["noiserater.provenance"]) == provenance
    kserve = kserve_grpc.GRPCInferenceServiceStub(server.channel)
    config = kserve.ModelConfig(kserve_pb.ModelConfigRequest(name="provenanced"), timeout=10).config
    assert "/home/alice" not in str(config.parameters) and "metadata.noiserater.data_shape" in config.parameters
    config = kserve.ModelConfig(kserve_pb.ModelConfigRequest(name="provenanced"), metadata=ADMIN, timeout=10).config
    assert "/home/alice" in config.parameters["metadata.noiserater.provenance"].string_value
