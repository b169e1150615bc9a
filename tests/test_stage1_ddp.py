"""Stage 1 under torchrun: two gloo processes on CPU all-reduce the rater's gradients and end with the
same rater (while their inner models, trained on different data streams, differ)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from noiserater.trainer.stage1.train import CHECKPOINT_FILE


def test_two_process_run_leaves_identical_raters(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "noiserater.cli.main", "train-rater", "--dataset", "digits", "--out", str(out), "--steps", "3",
           "--population", "1", "--device", "cpu", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(out / CHECKPOINT_FILE, weights_only=False)
    rank1 = torch.load(out / "checkpoint-rank1.pt", weights_only=False)
    assert rank0["world"] == rank1["world"] == 2 and rank0["step"] == rank1["step"] == 3
    for key, value in rank0["rater"].items():
        assert torch.equal(value, rank1["rater"][key]), key
    saved = torch.load(out / "rater.pt", weights_only=True)["state_dict"]  # rank 0 wrote it
    for key, value in rank0["rater"].items():
        assert torch.equal(value, saved[key]), key
    member0, member1 = rank0["members"][0]["model"], rank1["members"][0]["model"]
    assert any(not torch.equal(member0[k], member1[k]) for k in member0)
