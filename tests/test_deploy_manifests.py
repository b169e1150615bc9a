"""The Kubernetes manifests (deploy/k8s) render, are valid Kubernetes objects, and keep their contract with the
server, the client, the trainer and the Dockerfile.

Every overlay is rendered by tests/support/kustomize.py (the kustomize subset the manifests use; where kubectl
is installed, its built-in kustomize must produce the very same objects) and every object is validated against
the Kubernetes JSON schemas that the kubernetes-validate package ships, strictly (an unknown field fails), for
the oldest Kubernetes the manifests need and the newest the package knows. No cluster, no network."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from support import free_port
from support.kustomize import key_of, render
from torch.distributed.run import get_args_parser

from noiserater.client.channel import RaterChannel
from noiserater.server import config as server_config
from noiserater.server.metrics import ServerMetrics
from noiserater.trainer.stage1.train import CHECKPOINT_FILE

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
SERVING = [name for name in OVERLAYS if not name.startswith("train-")]
TRAINING = [name for name in OVERLAYS if name.startswith("train-")]
# grpc probes went GA in 1.27: the oldest Kubernetes these manifests can run on.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} objects"
    return found[0]


def container_of(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def secret_file(pod_spec: dict, container: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file `path` inside the container, which must come from a secret volume."""
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    for mount in container["volumeMounts"]:
        if os.path.dirname(path) == mount["mountPath"]:
            secret = volumes[mount["name"]]["secret"]
            (item,) = [item for item in secret["items"] if item["path"] == os.path.basename(path)]
            return secret["secretName"], item["key"]
    raise AssertionError(f"{path}: no secret volume mounted at its folder")


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions of each Dockerfile stage, continuation lines joined, comments dropped."""
    stages: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        current.append(line)
    return stages


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_to_valid_kubernetes_objects(rendered, overlay):
    objects = rendered[overlay]
    assert objects
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)
    namespaced = [obj for obj in objects if obj["kind"] != "Namespace"]
    assert {obj["metadata"]["namespace"] for obj in namespaced} == {"noiserater"}


def test_schema_validation_catches_a_misspelt_field(rendered):
    deployment = copy.deepcopy(one(rendered["gpu"], "Deployment", "rater-server"))
    container_of(deployment)["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_matches_kubectl_kustomize(rendered, overlay):
    proc = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = {key_of(obj): obj for obj in yaml.safe_load_all(proc.stdout) if obj}
    assert {key_of(obj): obj for obj in rendered[overlay]} == theirs


def serve_args(env: dict[str, str], monkeypatch) -> argparse.Namespace:
    """What `rater-server serve` makes of these RATER_SERVER_* variables, by the server's own parser."""
    for name in [n for n in os.environ if n.startswith(server_config.ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    server_config.add_serve_arguments(parser)
    return parser.parse_args([])


@pytest.mark.parametrize("overlay", SERVING)
def test_server_deployment_contract(rendered, overlay, monkeypatch):
    objects = rendered[overlay]
    deployment = one(objects, "Deployment", "rater-server")
    pod = deployment["spec"]["template"]
    spec, container = pod["spec"], container_of(deployment)
    env = env_of(container)
    assert deployment["spec"]["replicas"] == 3
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])

    # Every variable names a server option (a renamed flag breaks this), with a value the server takes.
    options = {server_config.ENV_PREFIX + f.name.upper(): f for f in dataclasses.fields(server_config.ServerConfig)}
    names = {name for name in env if name.startswith(server_config.ENV_PREFIX)}
    assert names <= set(options), names - set(options)
    assert env["RATER_SERVER_REPOSITORY_POLL_S"]["value"] == "10"
    args = serve_args({n: env[n]["value"] for n in names if "value" in env[n] and n in options}, monkeypatch)
    for name in names & set(options):
        field = options[name]
        value = getattr(args, field.name)
        assert field.metadata.get("choices") is None or value in field.metadata["choices"], (name, value)
        assert field.metadata.get("valid") is None or field.metadata["valid"](value), (name, value)

    # Probes: native gRPC on the port the server listens on.
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == args.port == 50051 and ports["metrics"] == args.metrics_port == 9464
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": ports["grpc"]}, probe
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])

    # Locked down: non-root (the image's uid), read-only root, no capabilities, no escalation, seccomp.
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]} and context["runAsNonRoot"] is True
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])

    # Volumes: a writable /tmp, the shared repository at the image's --repository, secrets as files.
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]
    entrypoint = [line for line in dockerfile_stages()["rater-server"] if line.startswith("ENTRYPOINT")][-1]
    repository = re.search(r'"--repository", "([^"]+)"', entrypoint).group(1)
    claim = one(objects, "PersistentVolumeClaim", mounts[repository]["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert secret_file(spec, container, args.auth_token_file) == ("rater-server-auth", "token")
    assert secret_file(spec, container, args.redis_url_file) == ("rater-redis", "url")
    assert not args.insecure_admin and not args.redis_url  # admin needs the token; the URL stays in its file

    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "cpu":
        assert args.device == "cpu" and gpus is None and container["image"].endswith("-cpu")
        assert "nvidia.com/gpu" not in yaml.safe_dump_all(objects)
    else:
        assert args.device == "cuda" and gpus == container["resources"]["requests"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("overlay", SERVING)
def test_services_autoscaler_and_budget_point_at_the_server(rendered, overlay):
    objects = rendered[overlay]
    deployment = one(objects, "Deployment", "rater-server")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {port["name"]: port["containerPort"] for port in container_of(deployment)["ports"]}

    headless = one(objects, "Service", "rater-server-headless")
    assert headless["spec"]["clusterIP"] == "None" and selects(headless["spec"]["selector"], labels)
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(ports["grpc"], "grpc")]
    admin = one(objects, "Service", "rater-server")
    assert admin["spec"].get("type", "ClusterIP") == "ClusterIP" and "clusterIP" not in admin["spec"]
    assert selects(admin["spec"]["selector"], labels)
    assert {p["targetPort"]: p["port"] for p in admin["spec"]["ports"]} == ports

    hpa = one(objects, "HorizontalPodAutoscaler", "rater-server")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"], "kind": "Deployment",
                                             "name": "rater-server"}
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    exported = {m.name: m.type for m in ServerMetrics().registry.collect()}
    assert exported.get(metric["pods"]["metric"]["name"]) == "gauge"

    pdb = one(objects, "PodDisruptionBudget", "rater-server")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    policy = one(objects, "NetworkPolicy", "rater-server")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == set(ports.values())


@pytest.mark.parametrize("overlay", SERVING)
def test_redis_in_cluster_or_external(rendered, overlay):
    objects = rendered[overlay]
    redis = [obj for obj in objects if obj["metadata"]["name"] == "rater-redis"]
    if overlay == "external-redis":
        assert redis == []
        return
    statefulset = one(objects, "StatefulSet", "rater-redis")
    service = one(objects, "Service", statefulset["spec"]["serviceName"])
    assert selects(service["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"])
    container = container_of(statefulset)
    config = container["args"][container["args"].index("--include") + 1]
    assert secret_file(statefulset["spec"]["template"]["spec"], container, config) == ("rater-redis", "redis.conf")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def torchrun_options() -> set[str]:
    return {"PET_" + action.dest.upper() for action in get_args_parser()._actions}


@pytest.mark.parametrize("overlay", TRAINING)
def test_training_job_contract(rendered, overlay):
    objects = rendered[overlay]
    job = one(objects, "Job", "rater-train")
    pod, container = job["spec"]["template"], container_of(job)
    env = env_of(container)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["PET_NNODES"]["value"])
    assert {name for name in env if name.startswith("PET_")} <= torchrun_options()
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # Rank 0's DNS name, through the headless Service named by the pods' subdomain.
    service = one(objects, "Service", pod["spec"]["subdomain"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    assert env["PET_MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert [p["port"] for p in service["spec"]["ports"]] == [int(env["PET_MASTER_PORT"]["value"])]
    assert container["command"] == ["torchrun"] and container["args"][:3] == ["-m", "noiserater.cli.main",
                                                                               "train-rater"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    out = container["args"][container["args"].index("--out") + 1]
    assert {"/tmp", "/dev/shm"} <= mounts and any(out.startswith(m + "/") for m in mounts)
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (None if overlay == "train-cpu" else int(env["PET_NPROC_PER_NODE"]["value"]))


def test_training_job_command_trains_as_two_nodes(rendered, tmp_path):
    """The Job's own command and torchrun variables, run as two "nodes" (two torchrun agents, node ranks 0
    and 1, static rendezvous) on this machine with rank 0's address replaced by loopback: both end with the
    same rater, as they would in the cluster."""
    job = one(rendered["train-cpu"], "Job", "rater-train")
    container = container_of(job)
    args = list(container["args"])
    args[args.index("--out") + 1] = str(tmp_path / "run")
    args += ["--steps", "2", "--population", "1", "--device", "cpu"]
    env = {name: item["value"] for name, item in env_of(container).items() if "value" in item}
    env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(free_port()), MPLCONFIGDIR=str(tmp_path / "mpl"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    torchrun = Path(sys.executable).parent / container["command"][0]
    nodes = [subprocess.Popen([str(torchrun), *args], env={**os.environ, **env, "PET_NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(int(env["PET_NNODES"]))]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    import torch

    rank0 = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=False)
    rank1 = torch.load(tmp_path / "run" / "checkpoint-rank1.pt", weights_only=False)
    assert rank0["world"] == rank1["world"] == 2 and rank0["step"] == rank1["step"] == 2
    assert all(torch.equal(value, rank1["rater"][key]) for key, value in rank0["rater"].items())


def test_readme_matches_the_manifests(rendered):
    """The apply commands name real overlays, the secrets the pods read are the ones the README creates, and
    the client target it shows is the headless Service, which RaterChannel balances with round_robin."""
    readme = (K8S / "README.md").read_text() + (ROOT / "README.md").read_text()
    for path in set(re.findall(r"kubectl apply -k (deploy/k8s/[\w./-]+)", readme)):
        assert (ROOT / path / "kustomization.yaml").is_file(), path
    assert {f"deploy/k8s/overlays/{name}" for name in OVERLAYS} <= set(re.findall(r"-k (deploy/k8s/[\w./-]+)", readme))
    secrets = set()
    for objects in rendered.values():
        for obj in objects:
            for volume in obj.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
                if "secret" in volume:
                    secrets |= {(volume["secret"]["secretName"], item["key"]) for item in volume["secret"]["items"]}
    for name, key in secrets:
        # The command with its continuation lines.
        creation = re.search(rf"create secret generic {name} ((?:[^\n]*\\\n)*[^\n]*)", readme)
        assert creation and re.search(rf"--from-(file|literal)=\"?{re.escape(key)}=", creation.group(1)), (name, key)
    target = "dns:///rater-server-headless.noiserater.svc.cluster.local:50051"
    assert target in readme and "round_robin=True" in readme
    channel = RaterChannel(target, round_robin=True)
    assert channel.grpc_target == target
    assert '"loadBalancingConfig": [{"round_robin": {}}]' in dict(channel.options)["grpc.service_config"]


def test_pods_configuration_serves(rendered, tmp_path, rater_onnx):
    """The CPU overlay's pods on this machine: Redis started with the StatefulSet's arguments and the password
    file the README's Secret holds, then the image's entrypoint with the Deployment's environment (files and
    ports moved into the test's folder and onto loopback). The server answers the probe's health check, serves,
    flushes its statistics into the password-protected Redis, exports the autoscaler's metric, and stops
    cleanly on SIGTERM within the pod's grace period."""
    import redis

    password = "s3cret-for-the-test"
    objects = rendered["cpu"]
    redis_container = container_of(one(objects, "StatefulSet", "rater-redis"))
    redis_args = list(redis_container["args"])
    conf = tmp_path / "redis.conf"
    conf.write_text(f"requirepass {password}\n")
    redis_args[redis_args.index("--include") + 1] = str(conf)
    redis_args[redis_args.index("--dir") + 1] = str(tmp_path)
    redis_port = free_port()
    redis_proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", *redis_args[1:], "--port",
                                   str(redis_port), "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)

    deployment = one(objects, "Deployment", "rater-server")
    container = container_of(deployment)
    env = {name: item["value"] for name, item in env_of(container).items()}
    (tmp_path / "token").write_text("admin-token\n")
    (tmp_path / "url").write_text(f"redis://:{password}@127.0.0.1:{redis_port}/0\n")
    port, metrics_port = free_port(), free_port()
    env.update(RATER_SERVER_AUTH_TOKEN_FILE=str(tmp_path / "token"), RATER_SERVER_REDIS_URL_FILE=str(tmp_path / "url"),
               RATER_SERVER_PORT=str(port), RATER_SERVER_METRICS_PORT=str(metrics_port), RATER_SERVER_HOST="127.0.0.1")
    entrypoint = yaml.safe_load([line for line in dockerfile_stages()["rater-server"]
                                 if line.startswith("ENTRYPOINT")][-1].removeprefix("ENTRYPOINT"))
    entrypoint[0] = str(Path(sys.executable).parent / entrypoint[0])
    entrypoint[entrypoint.index("--repository") + 1] = str(tmp_path / "models")
    (tmp_path / "models" / "digits" / "1").mkdir(parents=True)
    shutil.copyfile(rater_onnx, tmp_path / "models" / "digits" / "1" / "model.onnx")
    server = subprocess.Popen(entrypoint, env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        import numpy as np

        from noiserater.core import codec
        from noiserater.core.v1 import rater_service_pb2 as pb

        channel = RaterChannel(f"127.0.0.1:{port}")
        assert channel.health(timeout_s=120, wait_for_ready=True) == 1  # what the kubelet's grpc probe asks
        rng = np.random.default_rng(0)
        request = pb.SelectNoiseRequest(model=pb.ModelRef(name="digits"), dataset="k8s", keep=1,
                                        x0=codec.encode(rng.standard_normal((2, 64)).astype(np.float32)),
                                        t=codec.encode(rng.integers(0, 100, 2)),
                                        candidates=codec.encode(rng.standard_normal((2, 4, 64)).astype(np.float32)))
        assert codec.decode(channel.call("SelectNoise", request).indices).shape == (2, 1)
        channel.close()
        store = redis.Redis(host="127.0.0.1", port=redis_port, password=password)
        deadline = time.monotonic() + 30
        while not store.keys("*k8s*") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.keys("*k8s*"), "no statistics reached Redis"
        store.close()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'nr_pending_triples{model="digits",version="1"} 0.0' in metrics
        assert "nr_redis_flush_errors_total 0.0" in metrics
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
        assert server.returncode == 0, output[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
