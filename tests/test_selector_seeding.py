"""Where a NoiseSelector's randomness comes from: by default torch's global generator (as torch.randn_like),
so each process's own seeding applies and two ranks do not draw the same noise; `generator=` explicitly;
`seed=N` for reproducible standalone use, N + rank under torch.distributed unless rank_distinct=False."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from support import export_random_rater

from noiserater.client.selector import NoiseSelector, SelectorError

# One rank: joins a 2-process gloo group through a file store, then selects on the SAME batch every way.
WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from noiserater.client.selector import NoiseSelector

    onnx, store, rank, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(1234 + rank)  # the rank's own seeding (accelerate's set_seed(..., device_specific=True))
    gen = torch.Generator().manual_seed(7)
    x0, t = torch.rand(32, 64, generator=gen) * 2 - 1, torch.randint(0, 100, (32,), generator=gen)
    results = {}
    for name, kwargs in [("default", {}), ("seed", {"seed": 0}), ("shared", {"seed": 0, "rank_distinct": False})]:
        selector = NoiseSelector.local(onnx, num_candidates=8, rule="sample", **kwargs)
        pool = selector.draw_candidates(x0, 8)
        results[name] = {"pool": pool, "selected": selector.select(x0, t), "seed_used": selector.seed_used}
    torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
""")


def identical_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(0, -2) if a.ndim > 2 else a, b.flatten(0, -2) if b.ndim > 2 else b
    return float((a == b).all(dim=1).float().mean())


def batch(b=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, 64, generator=gen) * 2 - 1, torch.randint(0, 100, (b,), generator=gen)


def test_two_ranks_draw_distinct_noise(tmp_path, rater_onnx):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(rater_onnx), str(tmp_path / "store"), str(r),
                               str(outs[r])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    rank0, rank1 = (torch.load(out, weights_only=False) for out in outs)
    for name in ("default", "seed"):
        assert identical_rows(rank0[name]["pool"], rank1[name]["pool"]) < 0.05, name
        assert identical_rows(rank0[name]["selected"], rank1[name]["selected"]) < 0.05, name
    assert (rank0["seed"]["seed_used"], rank1["seed"]["seed_used"]) == (0, 1)  # seed + rank
    # Opting out: every rank draws the stream seed=0 gives, the same noise.
    assert rank0["shared"]["seed_used"] == rank1["shared"]["seed_used"] == 0
    assert torch.equal(rank0["shared"]["pool"], rank1["shared"]["pool"])
    assert torch.equal(rank0["shared"]["selected"], rank1["shared"]["selected"])


@pytest.mark.parametrize("rule", ["argmax", "sample", "assign"])
def test_without_a_seed_the_global_generator_governs(rater_onnx, rule):
    x0, t = batch()
    torch.manual_seed(1)
    first = NoiseSelector.local(rater_onnx, num_candidates=4, rule=rule)
    second = NoiseSelector.local(rater_onnx, num_candidates=4, rule=rule)
    a, b = first.select(x0, t), second.select(x0, t)
    assert identical_rows(a, b) < 0.05  # two selectors continue one stream: different noise
    torch.manual_seed(1)  # re-seeding replays both
    torch.testing.assert_close(NoiseSelector.local(rater_onnx, num_candidates=4, rule=rule).select(x0, t), a,
                               rtol=0, atol=0)
    torch.testing.assert_close(NoiseSelector.local(rater_onnx, num_candidates=4, rule=rule).select(x0, t), b,
                               rtol=0, atol=0)
    torch.manual_seed(1)
    if rule != "sample":  # argmax and assign draw exactly what torch.randn draws
        num = 1 if rule == "assign" else 4
        pool = torch.randn(16, num, 64)
        chosen = {tuple(r) for r in pool.flatten(0, 1).tolist()}
        assert all(tuple(r) in chosen for r in a.tolist())


def test_sample_seeds_its_draw_from_the_generator(rater_onnx):
    """Rule "sample": the call's seed comes from the generator, so two streams differ in it too; the same
    generator state gives the same noise, and a generator passed in is used."""
    x0, t = batch()
    picks = []
    for seed in (3, 4):
        selector = NoiseSelector.local(rater_onnx, num_candidates=8, rule="sample",
                                       generator=torch.Generator().manual_seed(seed))
        picks.append(selector._call_seed(x0.device))
    assert picks[0] != picks[1]
    one = NoiseSelector.local(rater_onnx, num_candidates=8, rule="sample", generator=torch.Generator().manual_seed(3))
    two = NoiseSelector.local(rater_onnx, num_candidates=8, rule="sample", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(one.select(x0, t), two.select(x0, t), rtol=0, atol=0)
    with pytest.raises(SelectorError, match="seed, generator"):
        NoiseSelector.local(rater_onnx, seed=1, generator=torch.Generator())
    with pytest.raises(SelectorError, match="generator: expected a torch.Generator"):
        NoiseSelector.local(rater_onnx, generator=3)


def test_explicit_seed_without_distributed_is_the_seed(rater_onnx):
    x0, t = batch()
    selector = NoiseSelector.local(rater_onnx, num_candidates=4, seed=5)
    want = torch.randn((16, 4, 64), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(selector.draw_candidates(x0, 4), want, rtol=0, atol=0)
    assert selector.seed_used == 5


@pytest.fixture(scope="module")
def image_rater(tmp_path_factory):
    return export_random_rater(tmp_path_factory.mktemp("image") / "image.onnx", data_shape=(3, 4, 4))


@pytest.mark.parametrize("rule", ["argmax", "assign"])
def test_noise_keeps_x0s_memory_format(image_rater, rule):
    """As torch.randn_like: a channels-last x0 gets channels-last noise, the same values as for the
    contiguous x0."""
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    t = torch.randint(0, 100, (6,))
    last = x0.to(memory_format=torch.channels_last)
    assert not last.is_contiguous()
    got = NoiseSelector.local(image_rater, num_candidates=4, rule=rule, seed=0).select(last, t)
    want = NoiseSelector.local(image_rater, num_candidates=4, rule=rule, seed=0).select(x0, t)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == x0.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    half = NoiseSelector.local(image_rater, num_candidates=4, rule=rule, seed=0).select(last.half(), t)
    assert half.dtype == torch.float16 and half.is_contiguous(memory_format=torch.channels_last)
    peer = NoiseSelector.peer("uniform", seed=0).select(last, t)
    assert peer.is_contiguous(memory_format=torch.channels_last)


def test_t_may_be_a_list_of_ints(rater_onnx):
    x0, t = batch(b=6)
    got = NoiseSelector.local(rater_onnx, num_candidates=4, seed=0).select(x0, t.tolist())
    want = NoiseSelector.local(rater_onnx, num_candidates=4, seed=0).select(x0, t)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    peer = NoiseSelector.peer("uniform", seed=0)
    assert peer.select(x0, tuple(t.tolist())).shape == x0.shape
    with pytest.raises(SelectorError, match="t: expected a tensor or a sequence of ints"):
        NoiseSelector.local(rater_onnx, seed=0).select(x0, ["a"] * 6)
    with pytest.raises(SelectorError, match="t: shape"):
        NoiseSelector.local(rater_onnx, seed=0).select(x0, [1, 2])
