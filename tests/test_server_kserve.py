"""The KServe v2 / Triton protocol. tritonclient.grpc scores like the v1 Score RPC.

tritonclient registers the protobuf package `inference` in the default descriptor pool, as the server's
own KServe stubs do, so the two cannot be imported into one process: tritonclient runs in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from support.server import ServerThread, make_repository

from noiserater.core import codec
from noiserater.core.inference import grpc_service_pb2 as kserve_pb
from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig

TRITON_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

target, path = sys.argv[1], sys.argv[2]
data = np.load(path)
client = triton.InferenceServerClient(url=target)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready("digits"), "unknown_ready": client.is_model_ready("nope")}
inputs = []
for name, datatype in (("x0", "FP32"), ("t", "INT64"), ("eps", "FP32")):
    tensor = triton.InferInput(name, list(data[name].shape), datatype)
    tensor.set_data_from_numpy(data[name])
    inputs.append(tensor)
result = client.infer("digits", inputs, outputs=[triton.InferRequestedOutput("score")])
out["scores"] = result.as_numpy("score").tolist()
out["version"] = result.get_response().model_version
out["metadata"] = client.get_model_metadata("digits", as_json=True)
try:
    client.get_model_metadata("nope")
except InferenceServerException as exc:
    out["unknown_error"] = str(exc)
client.close()
print(json.dumps(out))
"""


def run_tritonclient(target: str, tmp_path, x0, t, eps) -> dict:
    path = tmp_path / "inputs.npz"
    np.savez(path, x0=x0, t=t, eps=eps)
    result = subprocess.run([sys.executable, "-c", TRITON_CLIENT, target, str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def server(tmp_path_factory, rater_onnx):
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits": [rater_onnx]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")) as running:
        yield running


def triples(n: int = 7, seed: int = 3):
    rng = np.random.default_rng(seed)
    x0, eps = rng.standard_normal((2, n, 64)).astype(np.float32)
    return x0, rng.integers(0, 100, n).astype(np.int64), eps


def test_tritonclient_infer_and_metadata_equal_v1(server, tmp_path):
    x0, t, eps = triples()
    out = run_tritonclient(server.target, tmp_path, x0, t, eps)
    assert out["live"] and out["ready"] and out["model_ready"] and not out["unknown_ready"]
    with grpc.insecure_channel(server.target) as channel:
        v1 = pb_grpc.RaterServiceStub(channel).Score(pb.ScoreRequest(
            model=pb.ModelRef(name="digits"), x0=codec.encode(x0), t=codec.encode(t), eps=codec.encode(eps)))
    np.testing.assert_array_equal(np.asarray(out["scores"], np.float32), codec.decode(v1.scores))
    assert out["version"] == "1"
    meta = out["metadata"]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("x0", "FP32", ["-1", "64"]), ("t", "INT64", ["-1"]), ("eps", "FP32", ["-1", "64"])]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [("score", "FP32", ["-1"])]
    assert "nope" in out["unknown_error"]


def test_typed_contents_and_bad_inputs(server):
    x0, t, eps = triples(n=3)
    tensor = kserve_pb.ModelInferRequest.InferInputTensor
    request = kserve_pb.ModelInferRequest(model_name="digits", inputs=[
        tensor(name="x0", datatype="FP32", shape=[3, 64], contents=kserve_pb.InferTensorContents(
            fp32_contents=x0.ravel().tolist())),
        tensor(name="t", datatype="INT64", shape=[3], contents=kserve_pb.InferTensorContents(
            int64_contents=t.tolist())),
        tensor(name="eps", datatype="FP32", shape=[3, 64], contents=kserve_pb.InferTensorContents(
            fp32_contents=eps.ravel().tolist())),
    ])
    with grpc.insecure_channel(server.target) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request)
        typed = np.frombuffer(response.raw_output_contents[0], "<f4")
        v1 = pb_grpc.RaterServiceStub(channel).Score(pb.ScoreRequest(
            model=pb.ModelRef(name="digits"), x0=codec.encode(x0), t=codec.encode(t), eps=codec.encode(eps)))
        np.testing.assert_array_equal(typed, codec.decode(v1.scores))

        missing = kserve_pb.ModelInferRequest(model_name="digits", inputs=request.inputs[:2])
        short = kserve_pb.ModelInferRequest(model_name="digits", inputs=[
            tensor(name=i.name, datatype=i.datatype, shape=i.shape) for i in request.inputs],
            raw_input_contents=[x0.tobytes()[:-4], t.tobytes(), eps.tobytes()])
        for bad, fragment in ((missing, "inputs: missing eps"), (short, "inputs[x0]: byte count")):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(kserve_pb.ModelInferRequest(model_name="digits", model_version="7",
                                                        inputs=request.inputs))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# Run both in this process (our stubs) and in a subprocess (tritonclient's): the two register the same
# protobuf package `inference` and cannot be imported into one process.
FIELDS_SOURCE = r"""
def fields(descriptor, prefix=""):
    out = {}
    for f in descriptor.fields:
        out[prefix + descriptor.name + "." + f.name] = [f.number, f.type, f.is_repeated]
    for nested in descriptor.nested_types:
        out.update(fields(nested, prefix + descriptor.name + "."))
    for enum in descriptor.enum_types:
        for v in enum.values:
            out[prefix + descriptor.name + "." + enum.name + "." + v.name] = [v.number]
    return out


def module_fields(module, names):
    out = {}
    for name in names:
        if name in module.DESCRIPTOR.message_types_by_name:
            out.update(fields(module.DESCRIPTOR.message_types_by_name[name]))
        else:
            out.update({name + "." + v.name: [v.number] for v in module.DESCRIPTOR.enum_types_by_name[name].values})
    return out
"""

FIELDS_OF = FIELDS_SOURCE + r"""
import json
from tritonclient.grpc import model_config_pb2, service_pb2

names = json.loads(input())
print(json.dumps({"service": module_fields(service_pb2, names["service"]),
                  "config": module_fields(model_config_pb2, names["config"])}))
"""


def test_field_numbers_equal_tritons():
    """Every message, field and enum value we declare exists in Triton's protocol with the same number and
    type; the messages we serve in full (requests, ModelInfer) have no field of Triton's missing."""
    from noiserater.core.inference import model_config_pb2 as config_pb

    namespace: dict = {}
    exec(FIELDS_SOURCE, namespace)
    module_fields = namespace["module_fields"]

    names = {"service": sorted(kserve_pb.DESCRIPTOR.message_types_by_name),
             "config": sorted([*config_pb.DESCRIPTOR.message_types_by_name, *config_pb.DESCRIPTOR.enum_types_by_name])}
    ours = {"service": module_fields(kserve_pb, names["service"]), "config": module_fields(config_pb, names["config"])}
    result = subprocess.run([sys.executable, "-c", FIELDS_OF], input=json.dumps(names), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    tritons = json.loads(result.stdout)
    for part in ("service", "config"):
        mismatched = {k: (v, tritons[part].get(k)) for k, v in ours[part].items() if tritons[part].get(k) != v}
        assert not mismatched, f"{part}: fields that differ from Triton's: {mismatched}"
    complete = ("ModelInferRequest", "ModelInferResponse", "ModelMetadataResponse", "ModelStreamInferResponse",
                "ModelConfigRequest", "ModelStatisticsRequest", "InferStatistics")
    missing = [k for k in tritons["service"] if k.split(".")[0] in complete and k not in ours["service"]]
    assert not missing, f"fields of Triton's that we do not declare: {missing}"
