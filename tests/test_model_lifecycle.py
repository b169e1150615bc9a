"""A model's lifecycle as Triton users know it: `nrctl unload` and `nrctl set-default` (the rollback), the
version policy of config.pbtxt at start-up and after a deploy, and the KServe repository extension
(index, load, unload) through tritonclient, which runs in a subprocess (see test_server_kserve.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from support.server import ServerThread, make_repository
from test_cli_models import nrctl

from noiserater.core.inference import grpc_service_pb2 as kserve_pb
from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
from noiserater.core.inference import model_config_pb2 as config_pb
from noiserater.server.config import ServerConfig
from noiserater.server.model_config import VersionPolicy

TOKEN = "admin-token"


def serve(tmp_path, versions: list, policy: str = "", token: bool = False) -> ServerThread:
    repo = make_repository(tmp_path / "repo", {"digits": versions})
    if policy:
        (repo / "digits" / "config.pbtxt").write_text(policy)
    token_file = ""
    if token:
        (tmp_path / "token").write_text(TOKEN + "\n")
        token_file = str(tmp_path / "token")
    return ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu",
                                     auth_token_file=token_file))


def loaded(server: ServerThread) -> list[int]:
    return [v.version for v in server.server.registry.model("digits").versions]


def test_policy_selects_versions():
    assert VersionPolicy().select([3, 1, 2]) == [1, 2, 3]
    assert VersionPolicy("latest", num_versions=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy("specific", versions=(1, 3, 9)).select([3, 1, 2]) == [1, 3]


def test_nrctl_unload_and_set_default_roll_back(tmp_path, rater_onnx, rater_onnx_v2):
    with serve(tmp_path, [rater_onnx, rater_onnx_v2, rater_onnx], token=True) as server:
        refused = nrctl("set-default", "digits", "1", "--server", server.target, check=False)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        rolled = json.loads(nrctl("set-default", "digits", "2", "--server", server.target, "--token", TOKEN,
                                  "--json").stdout)
        assert rolled == {"name": "digits", "default_version": 2, "server": server.target}
        assert server.server.registry.model("digits").default_version == 2
        out = nrctl("unload", "digits", "--version", "3", "--server", server.target, "--token-file",
                    tmp_path / "token").stdout
        assert "unloaded digits version 3" in out and loaded(server) == [1, 2]
        assert (tmp_path / "repo" / "digits" / "3" / "model.onnx").is_file()  # the files stay
        missing = nrctl("set-default", "digits", "3", "--server", server.target, "--token", TOKEN, check=False)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1
        everything = json.loads(nrctl("unload", "digits", "--server", server.target, "--token", TOKEN,
                                      "--json").stdout)
        assert everything["version"] == "all" and server.server.registry.list() == ()


def test_latest_two_loads_two_and_a_deploy_keeps_two(tmp_path, rater_onnx, rater_onnx_v2):
    with serve(tmp_path, [rater_onnx, rater_onnx_v2, rater_onnx],
               policy="version_policy { latest { num_versions: 2 } }") as server:
        assert loaded(server) == [2, 3]
        registry = server.server.registry
        deployed = server.call(registry.deploy("digits", rater_onnx_v2.read_bytes()))
        assert deployed.version == 4 and loaded(server) == [3, 4]
        assert (tmp_path / "repo" / "digits" / "2" / "model.onnx").is_file()
        # An older version number would not be among the newest two: refused before anything is written.
        with pytest.raises(Exception, match="version policy is latest 2"):
            server.call(registry.deploy("digits", rater_onnx.read_bytes(), version=1))
        index = {(name, version): (state, reason) for name, version, state, reason in server.call(registry.index())}
        assert index[("digits", 4)] == ("READY", "")
        assert index[("digits", 1)] == ("UNAVAILABLE", "not selected by its version policy (latest 2)")


def test_specific_versions(tmp_path, rater_onnx, rater_onnx_v2):
    with serve(tmp_path, [rater_onnx, rater_onnx_v2, rater_onnx],
               policy="version_policy { specific { versions: [ 1, 3 ] } }") as server:
        assert loaded(server) == [1, 3]
        with pytest.raises(Exception, match="would not be served"):
            server.call(server.server.registry.deploy("digits", rater_onnx.read_bytes()))
        assert not (tmp_path / "repo" / "digits" / "4").exists()
        with grpc.insecure_channel(server.target) as channel:
            config = kserve_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
                kserve_pb.ModelConfigRequest(name="digits")).config
        assert config.version_policy == config_pb.ModelVersionPolicy(
            specific=config_pb.ModelVersionPolicy.Specific(versions=[1, 3]))


REPOSITORY_CLIENT = r"""
import json, sys
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

target, token = sys.argv[1], sys.argv[2]
admin = {"authorization": f"Bearer {token}"}
client = triton.InferenceServerClient(url=target)
out = {}
def index():
    return sorted((m["name"], m["version"], m["state"], m.get("reason", ""))
                  for m in client.get_model_repository_index(headers=admin, as_json=True).get("models", []))
try:
    client.get_model_repository_index()
except InferenceServerException as exc:
    out["refused"] = exc.status()
out["policy"] = client.get_model_config("digits", as_json=True)["config"]["version_policy"]
out["before"] = index()
client.unload_model("digits", headers=admin)
out["after_unload"] = index()
out["ready_after_unload"] = client.is_model_ready("digits")
client.load_model("digits", headers=admin)
out["after_load"] = index()
out["ready_after_load"] = client.is_model_ready("digits")
try:
    client.load_model("nope", headers=admin)
except InferenceServerException as exc:
    out["unknown"] = exc.status()
client.close()
print(json.dumps(out))
"""


def test_tritonclient_repository_index_unload_load(tmp_path, rater_onnx, rater_onnx_v2):
    with serve(tmp_path, [rater_onnx, rater_onnx_v2, rater_onnx],
               policy="version_policy { latest { num_versions: 2 } }", token=True) as server:
        result = subprocess.run([sys.executable, "-c", REPOSITORY_CLIENT, server.target, TOKEN],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["refused"] == "StatusCode.UNAUTHENTICATED"
    assert out["policy"] == {"latest": {"num_versions": 2}}
    policy = "not selected by its version policy (latest 2)"
    assert out["before"] == [["digits", "1", "UNAVAILABLE", policy], ["digits", "2", "READY", ""],
                             ["digits", "3", "READY", ""]]
    assert out["after_unload"] == [["digits", "1", "UNAVAILABLE", policy], ["digits", "2", "UNAVAILABLE", "unloaded"],
                                   ["digits", "3", "UNAVAILABLE", "unloaded"]]
    assert out["ready_after_unload"] is False
    assert out["after_load"] == out["before"] and out["ready_after_load"] is True
    assert out["unknown"] == "StatusCode.NOT_FOUND"
