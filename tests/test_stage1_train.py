"""Stage 1's training loop: the meta-objective works on a short digits run, runs resume exactly, and the
nrctl command writes a complete RUN_DIR and fails with one line."""

from __future__ import annotations

import json

import pytest
import torch
from support import tiny_stage1

from noiserater.trainer.stage1.rater import RATER_FILE, load_rater
from noiserater.trainer.stage1.train import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    TrainConfig,
    last_quarter_summary,
    read_metrics,
    train_rater,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add contention
TINY = tiny_stage1(batch_size=32)


# A short digits run (about 10 s on one free core): small proxy denoiser, a faster-learning rater.
SHORT_STEPS = 150
SHORT = {"population": 2, "batch_size": 64, "val_batch_size": 128, "denoiser_kwargs": {"hidden": 64, "depth": 2},
         "rater_kwargs": {"hidden": 32}, "rater_lr": 1e-2, "log_every": 1, "reset_every": 150}


def test_learned_weights_beat_uniform_on_a_short_digits_run(tmp_path):
    cfg = TrainConfig(dataset="digits", steps=SHORT_STEPS, **SHORT)
    summary = train_rater(cfg, tmp_path / "run")
    assert summary["last_quarter_learned"] < summary["last_quarter_uniform"], summary
    rows = read_metrics(tmp_path / "run")
    for key in ("outer_loss_learned", "outer_loss_uniform", "inner_loss", "weight_std", "weight_ess",
                "seconds_per_step"):
        assert all(key in r for r in rows)
    assert last_quarter_summary(rows)["last_quarter_points"] >= 1


def test_resume_reproduces_the_next_step_exactly(tmp_path):
    cfg = TrainConfig(dataset="digits", steps=4, **TINY)
    straight = train_rater(cfg, tmp_path / "straight")
    first = train_rater(TrainConfig(dataset="digits", steps=4, **TINY), tmp_path / "resumed", stop_after=3)
    assert first["steps"] == 3
    second = train_rater(TrainConfig(dataset="digits", steps=4, **TINY), tmp_path / "resumed")
    assert second["resumed_from"] == 3 and second["steps"] == straight["steps"] == 4
    a = torch.load(tmp_path / "straight" / CHECKPOINT_FILE, weights_only=False)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=False)
    for key in a["rater"]:
        assert torch.equal(a["rater"][key], b["rater"][key]), key
    for ma, mb in zip(a["members"], b["members"], strict=True):
        for key in ma["model"]:
            assert torch.equal(ma["model"][key], mb["model"][key]), key
    assert read_metrics(tmp_path / "straight")[-1]["outer_loss_learned"] == \
        read_metrics(tmp_path / "resumed")[-1]["outer_loss_learned"]


def test_exact_route_and_unrolled_steps_train(tmp_path):
    cfg = TrainConfig(dataset="digits-image", steps=2, meta_grad="exact", inner_steps=2,
                      **{**TINY, "denoiser_kwargs": {"channels": 8}, "rater_kwargs": {"channels": 8}})
    summary = train_rater(cfg, tmp_path / "img")
    rater, info = load_rater(tmp_path / "img" / RATER_FILE)
    assert info["kind"] == "conv" and tuple(rater.data_shape) == (1, 8, 8)
    assert summary["steps"] == 2


def test_cli_writes_a_complete_run_dir_and_resumes(tmp_path):
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["train-rater", "--dataset", "moons", "--out", str(out), "--steps", "3",
                                 "--population", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 3
    for name in (RATER_FILE, CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, PLOT_FILE):
        assert (out / name).is_file(), name
    _, info = load_rater(out / RATER_FILE)
    assert info["provenance"]["steps"] == 3 and info["provenance"]["config"]["dataset"] == "moons"
    again = runner.invoke(app, ["train-rater", "--dataset", "moons", "--out", str(out), "--steps", "4",
                                "--population", "1", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["resumed_from"] == 3


def test_cli_corrupt_checkpoint_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    out = tmp_path / "corrupt"
    out.mkdir()
    (out / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(app, ["train-rater", "--dataset", "moons", "--out", str(out), "--steps", "2"])
    assert result.exit_code == 1 and "cannot read the checkpoint" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args", [
    ["--dataset", "no-such-dataset"],
    ["--dataset", "digits", "--steps", "0"],
])
def test_cli_errors_are_one_line(tmp_path, args):
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    result = CliRunner().invoke(app, ["train-rater", "--out", str(tmp_path / "bad"), *args])
    assert result.exit_code == 1
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in result.output


def test_cli_choice_outside_the_enum_is_a_usage_error(tmp_path):
    """--meta-grad (like --device) is a choice: Typer refuses other values before anything runs, naming them."""
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    result = CliRunner().invoke(app, ["train-rater", "--out", str(tmp_path / "bad"), "--meta-grad", "second-order"])
    assert result.exit_code == 2 and "'second-order'" in result.output and "'exact', 'fast'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "bad").exists()


def test_resume_refuses_changed_settings_unless_told(tmp_path):
    from noiserater.trainer.stage1.train import ConfigMismatchError

    out = tmp_path / "run"
    train_rater(TrainConfig(dataset="moons", steps=2, **TINY), out)
    changed = {**TINY, "population": 1}
    with pytest.raises(ConfigMismatchError, match=r"holds a run with other settings: population=1 \(run: 2\), "
                                                  r"tau=0.5 \(run: 1.0\); pass --resume"):
        train_rater(TrainConfig(dataset="moons", steps=3, tau=0.5, **changed), out)
    kept = train_rater(TrainConfig(dataset="moons", steps=3, tau=0.5, **TINY), out, existing="resume")
    assert kept["resumed_from"] == 2 and kept["steps"] == 3
    assert json.loads((out / CONFIG_FILE).read_text())["tau"] == 1.0
    fresh = train_rater(TrainConfig(dataset="moons", steps=2, tau=0.5, **TINY), out, existing="overwrite")
    assert fresh["resumed_from"] == 0 and json.loads((out / CONFIG_FILE).read_text())["tau"] == 0.5
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    # steps and device may change without a flag: the run is extended
    assert train_rater(TrainConfig(dataset="moons", steps=3, tau=0.5, device="cpu", **TINY), out)["steps"] == 3


def test_cli_resume_refuses_changed_flags_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    runner = CliRunner()
    out = str(tmp_path / "run")
    base = ["train-rater", "--dataset", "moons", "--out", out, "--population", "1", "--device", "cpu", "--json"]
    first = runner.invoke(app, [*base, "--steps", "2"])
    assert first.exit_code == 0, first.output
    assert "meta steps" in first.stderr and json.loads(first.stdout)["steps"] == 2  # progress on stderr under --json
    refused = runner.invoke(app, ["train-rater", "--out", out, "--tau", "0.5", "--steps", "3"])
    assert refused.exit_code == 1 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "tau=0.5 (run: 1.0)" in lines[0] and "--resume" in lines[0]
    resumed = runner.invoke(app, ["train-rater", "--out", out, "--tau", "0.5", "--steps", "3", "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 2 and "not applied: tau=0.5" in resumed.stderr
    again = runner.invoke(app, ["train-rater", "--out", out, "--steps", "4", "--json"])  # flags left out: the run's
    assert again.exit_code == 0 and json.loads(again.stdout)["resumed_from"] == 3, again.output
    both = runner.invoke(app, ["train-rater", "--out", out, "--resume", "--overwrite"])
    assert both.exit_code == 1 and "at most one of --resume and --overwrite" in both.stderr
    over = runner.invoke(app, ["train-rater", "--out", out, "--dataset", "gaussians", "--population", "1",
                               "--steps", "1", "--overwrite", "--json"])
    assert over.exit_code == 0 and json.loads(over.stdout)["resumed_from"] == 0, over.output
    assert json.loads((tmp_path / "run" / CONFIG_FILE).read_text())["dataset"] == "gaussians"


def test_cli_user_data_lines_and_key(tmp_path):
    """A uint8 channel-last image array in an .npz beside another array: --key picks it, and the scaling, the
    transpose and the tiny-data warning are one line each on stderr."""
    import numpy as np
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", imgs=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), other=np.zeros((12, 2)))
    runner = CliRunner()
    args = ["train-rater", "--dataset", str(tmp_path / "data.npz"), "--out", str(tmp_path / "run"), "--steps", "1",
            "--population", "1", "--device", "cpu", "--json"]
    ambiguous = runner.invoke(app, args)
    assert ambiguous.exit_code == 1 and len(ambiguous.stderr.strip().splitlines()) == 1
    assert "holds arrays imgs, other; choose the data with --key NAME" in ambiguous.stderr
    result = runner.invoke(app, [*args, "--key", "imgs"])
    assert result.exit_code == 0, result.output
    assert "info: data.npz: uint8 values scaled from [0, 255] to [-1, 1]" in result.stderr
    assert "info: data.npz: channel-last (N, H, W, C) [12, 8, 8, 3] transposed to (N, C, H, W) [12, 3, 8, 8]" \
        in result.stderr
    assert "warning: dataset data: 8 training items (of 12), fewer than a batch of 128" in result.stderr
    _, info = load_rater(tmp_path / "run")
    assert info["data_shape"] == [3, 8, 8]


def test_tensorboard_and_safetensors_next_to_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from noiserater.trainer.stage1.rater import PRETRAINED_DIR, WEIGHTS_FILE
    from noiserater.trainer.stage1.train import TENSORBOARD_DIR

    out = tmp_path / "run"
    train_rater(TrainConfig(dataset="moons", steps=3, **TINY), out, log_with="tensorboard")
    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    scalars = events.Scalars("stage1/outer_loss_learned")
    assert [e.step for e in scalars] == [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert scalars[-1].value == pytest.approx(read_metrics(out)[-1]["outer_loss_learned"], rel=1e-5)
    assert (out / PRETRAINED_DIR / WEIGHTS_FILE).is_file()
    from_folder, _ = load_rater(out / PRETRAINED_DIR)
    from_pickle, _ = load_rater(out / RATER_FILE)
    for key, value in from_pickle.state_dict().items():
        assert torch.equal(from_folder.state_dict()[key], value), key
    with pytest.raises(ValueError, match="--log-with: wandb is not one of tensorboard"):
        train_rater(TrainConfig(dataset="moons", steps=4, **TINY), out, log_with="wandb")
