"""Every stage-2 method is a registered noise source: the training loop and `nrctl bench train` run any
registered name, a plugin's included, and know no method names."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from noiserater.client import peers
from noiserater.client.sources import REGISTRY, make_source, names, register
from noiserater.trainer.stage2.sources import Stage2Error, is_rater_method, needs_rater
from noiserater.trainer.stage2.training import Stage2Config, train_stage2
from noiserater.trainer.stage2.variants import windowed
from noiserater.trainer.substrate.data import load_dataset
from noiserater.trainer.substrate.diffusion import NoiseSchedule

RATER_METHODS = ("rater-argmax", "rater-sample", "rater-assign", "rater-kanneal")
PEER_METHODS = ("uniform", "immiscible", "immiscible-knn", "min-snr")
TINY = dict(batch_size=16, num_timesteps=100, eval_every=2, eval_repeats=1, quality=False,
            denoiser_kwargs={"hidden": 32, "depth": 1, "time_dim": 16})

PLUGIN = '''
import torch
from noiserater.client.sources import register


@register("reversed-gaussian")
class ReversedGaussian:
    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def sample(self, x0, t, step):
        return -torch.randn(x0.shape, generator=self.generator).to(x0.device, x0.dtype)

    def loss_weights(self, t):
        return None
'''


@pytest.fixture
def forget_sources():
    """Names a test registers are removed from the registry afterwards."""
    added: list[str] = []
    yield added
    for name in added:
        REGISTRY.pop(name, None)


def test_every_method_is_a_registered_source_and_only_the_rater_rules_need_a_rater(rater_onnx):
    assert set(RATER_METHODS + PEER_METHODS) <= set(names())
    assert [m for m in RATER_METHODS + PEER_METHODS if needs_rater(m)] == list(RATER_METHODS)
    schedule = NoiseSchedule(100)
    x0, t = torch.randn(6, 64), torch.randint(0, 100, (6,))
    for method in RATER_METHODS + PEER_METHODS:
        source = make_source(method, generator=torch.Generator().manual_seed(0), rater=rater_onnx, num_candidates=3,
                             steps=10, snr=schedule.snr)
        assert source.sample(x0, t, 0).shape == x0.shape
    with pytest.raises(Stage2Error, match="rater-sample.*needs a rater"):
        make_source("rater-sample", generator=torch.Generator())


def test_min_snr_weights_come_from_the_source_and_windows_fall_back_to_gaussian():
    schedule = NoiseSchedule(100)
    options = dict(generator=torch.Generator().manual_seed(2), snr=schedule.snr, steps=10)
    source = windowed(0.2, 0.5)(make_source("min-snr", **options), options)
    x0, t = torch.randn(4, 8), torch.tensor([0, 10, 50, 99])
    source.sample(x0, t, 1)
    assert source.loss_weights(t) is None  # outside [2, 5): plain Gaussian noise, unweighted
    source.sample(x0, t, 2)
    torch.testing.assert_close(source.loss_weights(t), peers.min_snr_weights(schedule.snr(t)))


def test_a_source_registered_here_trains_by_name(forget_sources):
    @register("zero-noise")
    def zero_noise():
        return type("Zero", (), {"sample": lambda self, x0, t, step: torch.zeros_like(x0),
                                 "loss_weights": lambda self, t: None})()

    forget_sources.append("zero-noise")
    result = train_stage2(load_dataset("digits"), "zero-noise", 2, seed=0, config=Stage2Config(**TINY))
    assert result.method == "zero-noise"
    assert result.metrics["noise_sq_norm_per_dim"] == 0.0
    with pytest.raises(Stage2Error, match="unknown 'no-such-noise'"):
        train_stage2(load_dataset("digits"), "no-such-noise", 2, seed=0, config=Stage2Config(**TINY))


def test_a_source_is_given_the_item_shape_and_a_rater_named_source_is_a_rater_method(forget_sources):
    seen = []

    @register("rater-shape-probe")
    def probe(data_shape=()):
        seen.append(data_shape)
        return type("Gauss", (), {"sample": lambda self, x0, t, step: torch.randn_like(x0),
                                  "loss_weights": lambda self, t: None})()

    forget_sources.append("rater-shape-probe")
    train_stage2(load_dataset("digits"), "rater-shape-probe", 1, seed=0, config=Stage2Config(**TINY))
    assert seen == [(64,)]
    assert is_rater_method("rater-shape-probe") and not needs_rater("rater-shape-probe")
    assert is_rater_method("rater-argmax") and not is_rater_method("immiscible")


def test_nrctl_bench_train_runs_a_plugin_source_by_name(tmp_path, forget_sources):
    from noiserater.cli.main import app

    plugin = tmp_path / "reversed.py"
    plugin.write_text(PLUGIN)
    forget_sources.append("reversed-gaussian")
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "train", "--plugin", str(plugin), "--methods", "reversed-gaussian",
                                      "--seeds", "2", "--steps", "3", "--batch-size", "8", "--no-quality",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["uniform", "reversed-gaussian"]
    # the same generator stream as uniform, negated: the cosine with x0 flips sign exactly
    assert report["reversed-gaussian"]["noise_cosine_with_x0"]["seeds"] == [
        -v for v in report["uniform"]["noise_cosine_with_x0"]["seeds"]]

    shown = CliRunner().invoke(app, ["bench", "train", "--plugin", str(plugin), "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0
    assert "--plugin" in shown.output
    for name in (*RATER_METHODS, *PEER_METHODS, "reversed-gaussian"):
        assert name in shown.output
    unknown = CliRunner().invoke(app, ["bench", "train", "--plugin", str(plugin), "--methods", "nope",
                                       "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 1 and "reversed-gaussian" in unknown.output and "rater-kanneal" in unknown.output
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('broken plugin')\n")
    failed = CliRunner().invoke(app, ["bench", "train", "--plugin", str(broken), "--out", str(tmp_path / "z")])
    assert failed.exit_code == 2 and "broken plugin" in failed.output
