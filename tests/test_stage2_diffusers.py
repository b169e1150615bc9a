"""The README's diffusers example (examples/diffusers_loop.py) runs a couple of steps when diffusers is installed,
for the eps objective (DDPMScheduler) and the flow objective (FlowMatchEulerDiscreteScheduler), logs its
progress, and refuses a rater that does not fit the loop's UNet, scheduler or objective before the first step."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "diffusers_loop.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("diffusers_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_image_rater(path, data_shape=(1, 8, 8), num_timesteps=1000, schedule="linear", objective="eps"):
    import torch

    from noiserater.trainer.stage1.export import export_rater
    from noiserater.trainer.stage1.rater import build_rater

    torch.manual_seed(0)
    export_rater(build_rater("conv", data_shape, num_timesteps), path, dataset="digits-image", schedule=schedule,
                 objective=objective)
    return path


def test_diffusers_loop_trains_on_selected_noise(tmp_path, example, capsys):
    from noiserater.client.selector import NoiseSelector

    onnx = export_image_rater(tmp_path / "digits-image.onnx")
    selector = NoiseSelector.local(onnx, num_candidates=4, rule="argmax")
    losses = example.train(selector, steps=3, batch_size=8, log_every=2)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert selector.counters["selections"] == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training 3 steps, batch 8, rule argmax, 4 candidates")
    assert [line.split(":")[0] for line in lines[1:]] == ["step 2/3", "step 3/3"]  # every 2 steps, and the last
    assert "ms/step" in lines[1]


def test_the_command_line_defaults_to_argmax_and_logs_every_n_steps(tmp_path, example, capsys, monkeypatch):
    onnx = export_image_rater(tmp_path / "digits-image.onnx")
    monkeypatch.setattr("sys.argv", ["diffusers_loop.py", "--rater", str(onnx), "--steps", "2", "--batch-size", "4",
                                     "--log-every", "1"])
    example.main()
    out = capsys.readouterr().out
    assert "rule argmax, 8 candidates per sample" in out
    assert "step 1/2:" in out and "step 2/2:" in out and "selector counters:" in out


def test_the_command_line_refuses_a_rater_of_another_shape_in_plain_words(tmp_path, example, monkeypatch):
    onnx = export_image_rater(tmp_path / "wide.onnx", data_shape=(1, 16, 16))
    monkeypatch.setattr("sys.argv", ["diffusers_loop.py", "--rater", str(onnx), "--steps", "2"])
    with pytest.raises(SystemExit, match="error: the rater scores 1x16x16 samples but the UNet takes 1x8x8"):
        example.main()


@pytest.mark.parametrize("kwargs, message", [
    (dict(data_shape=(3, 8, 8)), r"the rater scores 3x8x8 samples but the UNet takes 1x8x8 \(in_channels=1, "
                                 r"sample_size=8\)"),
    (dict(num_timesteps=100), "the rater was trained for 100 timesteps but the scheduler has "
                              "num_train_timesteps=1000"),
    (dict(schedule="cosine"), r"the rater was trained with the cosine noise schedule but the scheduler's "
                              r"\(beta_schedule='linear'.*squaredcos_cap_v2"),
])
def test_a_rater_that_does_not_fit_is_refused_before_the_first_step(tmp_path, example, kwargs, message):
    from diffusers import DDPMScheduler

    from noiserater.client.selector import NoiseSelector

    selector = NoiseSelector.local(export_image_rater(tmp_path / "rater.onnx", **kwargs), num_candidates=2)
    with pytest.raises(example.SetupError, match=message):
        example.check_rater(selector, example.build_unet(), DDPMScheduler(num_train_timesteps=1000))
    assert selector.counters["selections"] == 0


def test_a_matching_cosine_rater_passes(tmp_path, example):
    from diffusers import DDPMScheduler

    from noiserater.client.selector import NoiseSelector

    selector = NoiseSelector.local(export_image_rater(tmp_path / "rater.onnx", schedule="cosine"))
    example.check_rater(selector, example.build_unet(),
                        DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))


def test_flow_matching_sigmas_map_onto_the_raters_timesteps_and_interpolant(example):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from noiserater.trainer.substrate.diffusion import FlowSchedule

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    t = example.rater_timesteps(scheduler.sigmas, 1000)
    assert torch.equal(t, torch.arange(999, -1, -1))  # sigma = (t + 1) / T, every level once
    pick = torch.tensor([0, 1, 500, 998, 999])
    x0, noise = torch.rand(5, 1, 8, 8) * 2 - 1, torch.randn(5, 1, 8, 8)
    theirs = scheduler.scale_noise(x0, scheduler.timesteps[pick], noise)
    ours = FlowSchedule(1000).add_noise(x0, noise, t[pick])
    assert torch.allclose(theirs, ours, atol=1e-6)


def test_the_flow_loop_trains_on_selected_noise(tmp_path, example, capsys):
    from noiserater.client.selector import NoiseSelector

    onnx = export_image_rater(tmp_path / "flow.onnx", objective="flow")
    selector = NoiseSelector.local(onnx, num_candidates=2, objective="flow")
    losses = example.train(selector, steps=2, batch_size=4, log_every=1, objective="flow")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert selector.counters["selections"] == 2
    assert "objective flow" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("objective, scheduler, message", [
    ("eps", "FlowMatchEulerDiscreteScheduler", "the rater was trained for the eps objective but "
                                               "FlowMatchEulerDiscreteScheduler trains for flow; use DDPMScheduler"),
    ("flow", "DDPMScheduler", "the rater was trained for the flow objective but DDPMScheduler trains for eps; "
                              "use FlowMatchEulerDiscreteScheduler"),
])
def test_a_rater_of_the_other_objective_is_refused_before_the_first_step(tmp_path, example, objective, scheduler,
                                                                       message):
    import diffusers

    from noiserater.client.selector import NoiseSelector

    selector = NoiseSelector.local(export_image_rater(tmp_path / "rater.onnx", objective=objective))
    with pytest.raises(example.SetupError, match=message):
        example.check_rater(selector, example.build_unet(), getattr(diffusers, scheduler)(num_train_timesteps=1000))


def test_the_command_line_refuses_a_rater_of_the_other_objective_in_plain_words(tmp_path, example, monkeypatch):
    onnx = export_image_rater(tmp_path / "eps.onnx")
    monkeypatch.setattr("sys.argv", ["diffusers_loop.py", "--rater", str(onnx), "--objective", "flow",
                                     "--steps", "1"])
    with pytest.raises(SystemExit, match=r"error: objective: the rater .*eps.onnx was trained for the eps objective"):
        example.main()
