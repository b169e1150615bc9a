"""Stage 1's training loop: the meta-objective works on a short digits run, runs resume exactly, and the
nrctl command writes a complete RUN_DIR and fails with one line."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = {"batch_size": 32, "val_batch_size": 64, "population": 2, "num_timesteps": 100,
        "denoiser_kwargs": {"hidden": 32, "depth": 1}, "rater_kwargs": {"hidden": 16}, "log_every": 1,
        "checkpoint_every": 100}


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
    ["--dataset", "digits", "--meta-grad", "second-order"],
    ["--dataset", "digits", "--steps", "0"],
])
def test_cli_errors_are_one_line(tmp_path, args):
    from typer.testing import CliRunner

    from noiserater.cli.main import app

    result = CliRunner().invoke(app, ["train-rater", "--out", str(tmp_path / "bad"), *args])
    assert result.exit_code == 1
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in result.output
