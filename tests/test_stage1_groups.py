"""Candidate groups in stage 1: weights redistribute only between the noises of one (x0, t)."""

import math

import torch

from noiserater.trainer.stage1.meta import soft_weights
from noiserater.trainer.stage1.train import MetaTrainer, TrainConfig
from noiserater.trainer.substrate.data import load_dataset


def test_grouped_weights_have_mean_one_within_every_group():
    scores = torch.randn(64) * 5 + torch.arange(64.0)  # a strong trend across groups must not leak in
    w = soft_weights(scores, tau=1.0, group=8).reshape(8, 8)
    torch.testing.assert_close(w.mean(dim=1), torch.ones(8))
    assert (w > 0).all() and w.std() > 0
    # shifting a whole group's scores changes nothing: only the ranking inside a group matters
    shifted = scores.reshape(8, 8) + torch.arange(8.0)[:, None] * 100
    torch.testing.assert_close(soft_weights(shifted.reshape(-1), 1.0, 8).reshape(8, 8), w)


def test_grouped_batches_share_x0_and_t_within_a_group():
    cfg = TrainConfig(dataset="moons", steps=1, population=1, batch_size=32, val_batch_size=16, candidate_group=4,
                      num_timesteps=50)
    trainer = MetaTrainer(cfg, load_dataset("moons"), torch.device("cpu"))
    x0, t, eps = trainer._batch(trainer.train_x, 32, 4)
    assert torch.equal(x0.reshape(8, 4, -1), x0.reshape(8, 4, -1)[:, :1].expand(8, 4, -1))
    assert torch.equal(t.reshape(8, 4), t.reshape(8, 4)[:, :1].expand(8, 4))
    assert not torch.equal(eps.reshape(8, 4, -1)[:, 0], eps.reshape(8, 4, -1)[:, 1])
    row = trainer.step(evaluate=True)  # a meta step runs on grouped batches and logs the paired comparison
    assert math.isfinite(row["outer_loss_learned"]) and math.isfinite(row["outer_loss_uniform"])
    assert row["weight_std"] > 0
