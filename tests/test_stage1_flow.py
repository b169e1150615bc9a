"""The flow-matching objective through stage 1, export and serving: a tiny `--objective flow` run is exported
with its objective and time convention, served by a real server that reports them, selected from locally and
remotely with the same result, and refused by a selector that expects the other objective."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from support import tiny_stage1

from noiserater.core import scoring
from noiserater.trainer.stage1.rater import load_rater
from noiserater.trainer.stage1.train import CONFIG_FILE, ConfigMismatchError, TrainConfig, train_rater

TINY = tiny_stage1(batch_size=32)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train_rater(TrainConfig(dataset="digits", steps=2, objective="flow", **TINY), out)
    finally:
        torch.set_num_threads(before)
    return out, summary


@pytest.fixture(scope="module")
def flow_onnx(flow_run):
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    out, _ = flow_run
    path = out.parent / "flow.onnx"
    result = CliRunner().invoke(app, ["export", str(out), "--out", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return path


def test_a_flow_run_remembers_its_objective_and_resume_refuses_another(flow_run):
    out, summary = flow_run
    assert summary["steps"] == 2 and summary["last_quarter_points"] >= 1
    assert json.loads((out / CONFIG_FILE).read_text())["objective"] == "flow"
    _, info = load_rater(out)
    assert info["objective"] == "flow" and info["meta_objective"] == "soft-weights"
    with pytest.raises(ConfigMismatchError, match=r"objective='eps' \(run: 'flow'\)"):
        train_rater(TrainConfig(dataset="digits", steps=3, objective="eps", **TINY), out)


def test_the_flow_objective_takes_only_its_interpolant():
    with pytest.raises(ValueError, match="schedule 'cosine' does not apply to the flow objective"):
        TrainConfig(objective="flow", schedule="cosine").validate()
    with pytest.raises(ValueError, match="--objective must be one of eps, flow"):
        TrainConfig(objective="v").validate()


def test_export_writes_the_objective_and_its_time_convention(flow_onnx):
    metadata = {p.key: p.value for p in onnx.load(str(flow_onnx)).metadata_props}
    assert metadata["noiserater.objective"] == "flow"
    assert metadata["noiserater.time_convention"] == scoring.TIME_CONVENTIONS["flow"]
    assert metadata["noiserater.time_convention"].startswith("linear: s = (t + 1) / T, x_t = (1 - s) x0 + s eps")
    assert metadata["noiserater.meta_objective"] == "soft-weights"
    info = scoring.RaterSession(flow_onnx, device="cpu").info
    assert info.objective == "flow" and info.time_convention == scoring.TIME_CONVENTIONS["flow"]


def test_a_rater_file_without_an_objective_is_an_eps_rater():
    info = scoring.RaterInfo.from_metadata({scoring.META_DATA_SHAPE: "[64]", scoring.META_NUM_TIMESTEPS: "100"})
    assert info.objective == "eps" and info.time_convention.startswith("vp-ddpm: x_t = sqrt(abar_t) x0")
    assert info.reported_metadata()[scoring.META_OBJECTIVE] == "eps"


def _without_objective(source, target):
    model = onnx.load(str(source))
    kept = [(p.key, p.value) for p in model.metadata_props
            if p.key not in (scoring.META_OBJECTIVE, scoring.META_TIME_CONVENTION)]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(target))
    return target


def test_served_local_and_remote_selection_agree_and_a_mismatch_fails_closed(flow_onnx, rater_onnx, tmp_path):
    from support.server import ServerThread, make_repository
    from typer.testing import CliRunner

    from noiserater.cli.main import app
    from noiserater.client.selector import NoiseSelector, SelectorError
    from noiserater.core.inference import grpc_service_pb2 as kserve_pb
    from noiserater.core.inference import grpc_service_pb2_grpc as kserve_grpc
    from noiserater.core.v1 import rater_service_pb2 as pb
    from noiserater.server.config import ServerConfig

    legacy = _without_objective(rater_onnx, tmp_path / "legacy.onnx")
    repo = make_repository(tmp_path / "repo", {"flowy": [flow_onnx], "legacy": [legacy]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0)) as server:
        import grpc

        with grpc.insecure_channel(server.target) as channel:
            from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc

            stub = pb_grpc.RaterServiceStub(channel)
            public = stub.GetModelMetadata(pb.GetModelMetadataRequest(model=pb.ModelRef(name="flowy")), timeout=10)
            assert public.metadata["noiserater.objective"] == "flow"
            assert public.metadata["noiserater.time_convention"] == scoring.TIME_CONVENTIONS["flow"]
            old = stub.GetModelMetadata(pb.GetModelMetadataRequest(model=pb.ModelRef(name="legacy")), timeout=10)
            assert old.metadata["noiserater.objective"] == "eps"  # reported for a file that predates the key
            config = kserve_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
                kserve_pb.ModelConfigRequest(name="flowy"), timeout=10).config
            assert config.parameters["metadata.noiserater.objective"].string_value == "flow"

        listed = CliRunner().invoke(app, ["models", "--server", server.target, "--json"])
        assert listed.exit_code == 0, listed.output
        objectives = {m["name"]: [v["objective"] for v in m["versions"]] for m in json.loads(listed.stdout)["models"]}
        assert objectives == {"flowy": ["flow"], "legacy": ["eps"]}
        table = CliRunner().invoke(app, ["models", "--server", server.target])
        assert "1 (READY, flow)" in table.stdout

        x0 = torch.rand(6, 64) * 2 - 1
        t = torch.randint(0, 100, (6,))
        with NoiseSelector.local(flow_onnx, num_candidates=4, seed=7, objective="flow") as local, \
                NoiseSelector.remote(server.target, model="flowy", num_candidates=4, seed=7, objective="flow",
                                     data_shape=(64,), num_timesteps=100) as remote:
            assert remote.info.objective == "flow"
            assert torch.equal(local.select(x0, t), remote.select(x0, t))
            assert remote.counters["served"] == 1

        with pytest.raises(SelectorError, match=r"objective: model 'flowy' version 1 on .* was trained for the "
                                                r"flow objective \(linear: s = \(t \+ 1\) / T.*not eps .*as the job "
                                                r"expects; use a rater trained with `nrctl train-rater --objective "
                                                r"eps`"):
            NoiseSelector.remote(server.target, model="flowy", objective="eps")
        with pytest.raises(SelectorError, match=r"objective: model 'legacy' version 1 .* trained for the eps "
                                                r"objective"):
            NoiseSelector.remote(server.target, model="legacy", objective="flow")
        with pytest.raises(SelectorError, match=r"objective: model 'flowy' .* the fallback_onnx rater expects"):
            NoiseSelector.remote(server.target, model="flowy", fallback_onnx=legacy)
    with pytest.raises(SelectorError, match=r"objective: the rater .*flow.onnx was trained for the flow objective"):
        NoiseSelector.local(flow_onnx, objective="eps")
    with pytest.raises(SelectorError, match=r"objective: 'v' is not one of eps, flow"):
        NoiseSelector.local(flow_onnx, objective="v")
    assert NoiseSelector.local(legacy, objective="eps").info.objective == "eps"


def test_cli_flags_reach_the_run_and_a_changed_objective_is_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    runner = CliRunner()
    out = str(tmp_path / "run")
    first = runner.invoke(app, ["train-rater", "--dataset", "moons", "--out", out, "--population", "1", "--steps",
                                "1", "--objective", "flow", "--meta-objective", "through-selection",
                                "--selection-candidates", "3", "--selection-horizon", "2", "--device", "cpu",
                                "--json"])
    assert first.exit_code == 0, first.output
    assert "objective=flow meta-objective=through-selection K=3 H=2" in first.stderr
    saved = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert (saved["objective"], saved["meta_objective"], saved["selection_candidates"],
            saved["selection_horizon"]) == ("flow", "through-selection", 3, 2)
    refused = runner.invoke(app, ["train-rater", "--out", out, "--objective", "eps", "--steps", "2"])
    lines = refused.stderr.strip().splitlines()
    assert refused.exit_code == 1 and len(lines) == 1 and "objective='eps' (run: 'flow')" in lines[0]
    again = runner.invoke(app, ["train-rater", "--out", out, "--steps", "2", "--json"])  # the run's own settings
    assert again.exit_code == 0 and json.loads(again.stdout)["resumed_from"] == 1, again.output
