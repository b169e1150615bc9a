"""How much could any choice of noise help? The per-sample gradient variance of a denoiser, split into the
parts due to the timestep, the data item and the noise, and the ceiling that importance sampling over the noise
puts on the variance reduction (`nrctl bench variance`).

The per-sample gradient g(x0, t, eps) = grad_theta loss(theta; x0, t, eps), with t uniform on [0, T), x0 uniform
on the training split and eps ~ N(0, I), is what a minibatch averages. Its variance (the trace of its
covariance, E||g - Eg||^2) splits by the law of total variance:

    Var g = Var_t E[g | t] + E_t Var_x0 E[g | x0, t] + E_{x0,t} Var_eps(g | x0, t)
          =      t part    +        x0 part          +          eps part

Noise selection can only act on the eps part. Any unbiased importance sampling of eps given (x0, t), i.e.
eps ~ q and the gradient weighted by p(eps) / q(eps), keeps E[g | x0, t] and so the t and x0 parts; the best q,
q ∝ p ||g||, lowers the second moment from E_p||g||^2 to (E_p||g||)^2, so the eps part falls by at most
E_{x0,t} Var_eps(||g|| | x0, t). `total / (total - that)` is the ceiling on the variance reduction and hence on
the effective batch-size gain of any noise selection that leaves the gradient unbiased. With K candidates per
sample, one chosen with probability ∝ w and weighted by mean(w) / w (self-normalised resampling), the second
moment given the candidates is mean(w) * mean(||g||^2 / w) >= mean(||g||)^2 (Cauchy-Schwarz, equal for w = ||g||),
whose expectation is (E||g||)^2 + Var(||g||) / K: the eps part falls by at most (1 - 1/K) E Var_eps(||g||).
Selection that is not reweighted (a rater's argmax) changes E[g] and so the objective; these ceilings do not
describe it. Schemes that couple the noises of several samples (antithetic pairs, assigning noises to items)
are not importance sampling and are not bounded by these ceilings; the most any of them could do is remove
the whole eps part, `total / (t + x0)` (`eps_removed`). For context, importance sampling over (t, x0, eps)
jointly could reach (E||g||)^2 - ||Eg||^2.

The design is balanced and nested: n_t timesteps stratified over [0, T) (one uniform draw in each of n_t equal
strata), for each an independent draw of n_x0 training items (uniform, with replacement), for each pair n_eps
Gaussian noises. With a = n_t, b = n_x0, c = n_eps and the sums of squares of the nested analysis of variance
(SS_A between timesteps, SS_B between items within a timestep, SS_E between noises within a pair, with squared
norms for vectors), MS_B = SS_B / (a (b - 1)) and MS_E = SS_E / (a b (c - 1)), the estimators are

    eps = MS_E,   x0 = (MS_B - MS_E) / c,   t = (SS_A - (a - 1) MS_B) / (a b c).

eps and x0 are the unbiased ANOVA estimators. t is the one for stratified timesteps: its expectation is
Var_t E[g|t] less the spread of E[g|t] within a stratum over a, which is small when E[g|t] changes little across
T / n_t timesteps (the textbook (MS_A - MS_B) / (b c), unbiased for independent timesteps, would overstate it by
up to Var_t / (n_t - 1) here). The three add up exactly to the total estimated directly as
mean||g||^2 - (||mean g||^2 - MS_B / (a b c)), the second term being ||E g||^2. E Var_eps(||g||) is the mean
within-pair unbiased sample variance of ||g||. The standard errors are delete-one-timestep jackknife ones
(approximate for a stratified design). The same decomposition of the scalar loss is a cheap cross-check. The
training run clips the batch gradient's norm; these are the gradients before clipping.

    model, trained = train_denoiser(load_dataset("digits"), "eps", steps=2000, seed=0)
    result = measure_variance(model, make_schedule(1000, "linear", "eps"), data.train, VarianceConfig())
    result["gradient"]["fractions"], result["gradient"]["is_noise"]["ratio"]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from noiserater.trainer.stage2.training import Stage2Config, train_stage2
from noiserater.trainer.substrate.data import DataSplits
from noiserater.trainer.substrate.denoisers import build_denoiser
from noiserater.trainer.substrate.diffusion import Schedule, make_schedule, per_sample_loss

VARIANCE_JSON = "variance.json"
VARIANCE_MD = "variance.md"
MODEL_FILE = "denoiser.pt"
PARTS = ("t", "x0", "eps")


@dataclass
class VarianceConfig:
    n_t: int = 40  # timesteps, one per stratum of [0, T)
    n_x0: int = 16  # training items per timestep
    n_eps: int = 16  # noises per (item, timestep)
    buckets: int = 10  # equal ranges of t in the breakdown
    k: Sequence[int] = (2, 4, 8, 16)  # candidates per sample for the K-candidate ceilings
    chunk: int = 32  # per-sample gradients held at once (memory: about 2 x chunk x parameters x 4 bytes)
    seed: int = 0

    def check(self) -> None:
        for name in ("n_t", "n_x0", "n_eps"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: must be >= 2 (a variance needs two draws)")
        if not 1 <= self.buckets <= self.n_t:
            raise ValueError(f"buckets: must be in 1..n_t ({self.n_t})")
        if self.chunk < 1:
            raise ValueError("chunk: must be >= 1")
        if any(int(k) < 1 for k in self.k):
            raise ValueError("k: every K must be >= 1")


# ---------------------------------------------------------------------------------------------- the estimators


class GroupMoments:
    """Per-group count, mean and sum of squared deviations of vectors given as column blocks (a model's
    parameters), merged chunk by chunk (Chan et al.): a group's spread comes from deviations, never from a
    difference of large sums, so identical vectors give exactly zero. Everything is float64; the temporaries
    are one block (one parameter tensor of one chunk) in size, small enough for the allocator to reuse."""

    def __init__(self, groups: int, widths: Sequence[int]):
        self.groups = groups
        self.count = torch.zeros(groups, dtype=torch.float64)
        self.means = [torch.zeros(groups, w, dtype=torch.float64) for w in widths]
        self.m2 = torch.zeros(groups, dtype=torch.float64)

    def add(self, blocks: Sequence[torch.Tensor], group: torch.Tensor) -> None:
        """Rows of `blocks` ([n, width] each, float32) belong to the groups `group` ([n])."""
        n_b = torch.bincount(group, minlength=self.groups).to(torch.float64)
        present = n_b > 0
        n = self.count + n_b
        weight = torch.where(present, n_b / n.clamp(min=1), 0.0)
        m2_b = torch.zeros_like(self.m2)
        between = torch.zeros_like(self.m2)
        for block, mean in zip(blocks, self.means, strict=True):
            block = block.reshape(len(group), -1).to(torch.float64, copy=True)  # changed in place below
            sums = torch.zeros(self.groups, block.shape[1], dtype=torch.float64).index_add_(0, group, block)
            mean_b = sums / n_b.clamp(min=1)[:, None]
            deviation = block.sub_(mean_b[group])
            m2_b.index_add_(0, group, deviation.pow_(2).sum(1, dtype=torch.float64))
            delta = torch.where(present[:, None], mean_b - mean, 0.0)
            between += delta.pow(2).sum(1)
            mean += delta * weight[:, None]
        self.m2 += m2_b + between * self.count * weight
        self.count = n

    def spread_of_means(self) -> float:
        """Sum over groups of the squared distance of the group's mean to the mean of the group means."""
        return sum(float((m - m.mean(0)).pow(2).sum()) for m in self.means)


def nested_parts(ss_a: float, ss_b: float, ss_e: float, a: int, b: int, c: int) -> dict[str, float]:
    """The variance components of a balanced nested design with stratified top level (a strata, b subgroups
    each, c draws per subgroup) from its sums of squares (module docstring), and `mean_var`, the variance of
    the grand mean."""
    ms_b, ms_e = ss_b / (a * (b - 1)), ss_e / (a * b * (c - 1))
    return {"t": (ss_a - (a - 1) * ms_b) / (a * b * c), "x0": (ms_b - ms_e) / c, "eps": ms_e,
            "mean_var": ms_b / (a * b * c)}


def _fractions(parts: dict[str, float]) -> dict[str, float]:
    total = sum(parts[p] for p in PARTS)
    return {p: parts[p] / total if total > 0 else float("nan") for p in PARTS}


def _ratio(total: float, minimum: float) -> float:
    return total / minimum if minimum > 0 else float("inf")


def summarise(per_t: Sequence[dict[str, float]], gram: torch.Tensor, b: int, c: int,
              ks: Sequence[int]) -> dict[str, Any]:
    """The decomposition and the ceilings from per-timestep statistics (see `measure_variance`) and the Gram
    matrix of the per-timestep mean gradients."""
    a = len(per_t)
    mean_of = lambda key: sum(r[key] for r in per_t) / a  # noqa: E731
    gram = gram.to(torch.float64)
    mean_grad_sq = float(gram.sum()) / a**2  # ||mean g||^2
    ss_a = b * c * (float(gram.diagonal().sum()) - a * mean_grad_sq)
    grad = nested_parts(ss_a, sum(r["ss_b"] for r in per_t), sum(r["ss_e"] for r in per_t), a, b, c)
    total = sum(grad[p] for p in PARTS)
    mean_sq_norm = mean_of("mean_sq_norm")  # E||g||^2
    signal = mean_grad_sq - grad["mean_var"]  # ||E g||^2
    norm_var = mean_of("norm_var")  # E_{x0,t} Var_eps(||g||)

    norms_mean = mean_of("norm_mean")
    norm_ss_a = b * c * sum((r["norm_mean"] - norms_mean) ** 2 for r in per_t)
    norm_parts = nested_parts(norm_ss_a, sum(r["norm_ss_b"] for r in per_t), sum(r["norm_ss_e"] for r in per_t),
                              a, b, c)
    mean_norm_sq = norms_mean**2 - norm_parts["mean_var"]  # (E||g||)^2
    joint_min = mean_norm_sq - signal

    loss_mean = mean_of("loss_mean")
    loss_ss_a = b * c * sum((r["loss_mean"] - loss_mean) ** 2 for r in per_t)
    loss = nested_parts(loss_ss_a, sum(r["loss_ss_b"] for r in per_t), sum(r["loss_ss_e"] for r in per_t), a, b, c)

    def ceiling(reduction: float) -> dict[str, float]:
        minimum = total - reduction
        return {"reduction": reduction, "min_total": minimum, "ratio": _ratio(total, minimum)}

    return {
        "gradient": {
            **{p: grad[p] for p in PARTS},
            "total": total,
            "total_direct": mean_sq_norm - signal,
            "fractions": _fractions(grad),
            "mean_sq_norm": mean_sq_norm,
            "mean_grad_sq_norm": signal,
            "eps_norm_var": norm_var,
            "is_noise": ceiling(norm_var),
            "is_noise_k": {str(k): ceiling((1 - 1 / k) * norm_var) for k in ks},
            "is_joint": {"min_total": joint_min, "ratio": _ratio(total, joint_min)},
            "eps_removed": ceiling(grad["eps"]),
        },
        "loss": {**{p: loss[p] for p in PARTS}, "total": sum(loss[p] for p in PARTS), "mean": loss_mean,
                 "fractions": _fractions(loss)},
    }


def jackknife(per_t: Sequence[dict[str, float]], gram: torch.Tensor, b: int, c: int, ks: Sequence[int],
              pick: Callable[[dict[str, Any]], dict[str, float]]) -> dict[str, float]:
    """Delete-one-timestep jackknife standard errors of the figures `pick(summary)` returns."""
    a = len(per_t)
    values: list[dict[str, float]] = []
    for drop in range(a):
        keep = [i for i in range(a) if i != drop]
        values.append(pick(summarise([per_t[i] for i in keep], gram[keep][:, keep], b, c, ks)))
    out = {}
    for key in values[0]:
        xs = [v[key] for v in values]
        if not all(math.isfinite(x) for x in xs):
            out[key] = float("nan")
            continue
        mean = sum(xs) / a
        out[key] = math.sqrt((a - 1) / a * sum((x - mean) ** 2 for x in xs))
    return out


def _headline(summary: dict[str, Any]) -> dict[str, float]:
    g = summary["gradient"]
    return {**{f"fraction_{p}": g["fractions"][p] for p in PARTS}, "ratio": g["is_noise"]["ratio"],
            **{f"ratio_k{k}": v["ratio"] for k, v in g["is_noise_k"].items()},
            **{f"loss_fraction_{p}": summary["loss"]["fractions"][p] for p in PARTS}}


def bucket_breakdown(per_t: Sequence[dict[str, float]], gram: torch.Tensor, b: int, c: int, num_timesteps: int,
                     buckets: int) -> list[dict[str, Any]]:
    """The same figures within equal ranges of t: where the eps part sits and what the ceiling is there (the
    t part of a bucket is the spread of E[g | t] within it)."""
    eps_all = sum(r["ss_e"] for r in per_t) / (len(per_t) * b * (c - 1))
    rows = []
    for k in range(buckets):
        lo, hi = k * num_timesteps // buckets, (k + 1) * num_timesteps // buckets
        idx = [i for i, r in enumerate(per_t) if lo <= r["t"] < hi]
        if not idx:
            continue
        sub = [per_t[i] for i in idx]
        n = len(sub)
        eps = sum(r["ss_e"] for r in sub) / (n * b * (c - 1))
        x0 = (sum(r["ss_b"] for r in sub) / (n * (b - 1)) - eps) / c
        t_part = 0.0
        if n > 1:
            g = gram[idx][:, idx].to(torch.float64)
            ss_a = b * c * (float(g.diagonal().sum()) - float(g.sum()) / n)
            t_part = nested_parts(ss_a, sum(r["ss_b"] for r in sub), sum(r["ss_e"] for r in sub), n, b, c)["t"]
        total = t_part + x0 + eps
        norm_var = sum(r["norm_var"] for r in sub) / n
        loss_eps = sum(r["loss_ss_e"] for r in sub) / (n * b * (c - 1))
        loss_x0 = (sum(r["loss_ss_b"] for r in sub) / (n * (b - 1)) - loss_eps) / c
        rows.append({
            "t_lo": lo, "t_hi": hi, "timesteps": n, "t": t_part, "x0": x0, "eps": eps, "total": total,
            "eps_fraction": eps / total if total > 0 else float("nan"),
            "eps_share_of_all": eps * n / (len(per_t) * eps_all) if eps_all > 0 else float("nan"),
            "is_noise_ratio": _ratio(total, total - norm_var),
            "mean_sq_norm": sum(r["mean_sq_norm"] for r in sub) / n,
            "loss_mean": sum(r["loss_mean"] for r in sub) / n,
            "loss_eps_fraction": loss_eps / (loss_eps + loss_x0) if loss_eps + loss_x0 > 0 else float("nan"),
        })
    return rows


# ------------------------------------------------------------------------------------------ the measurement


def stratified_timesteps(n: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """One integer timestep in each of n equal strata of [0, T): floor(T (i + u_i) / n), u_i ~ U[0, 1); each is
    marginally uniform on {0, ..., T-1}."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = ((torch.arange(n, dtype=torch.float64) + u) * num_timesteps / n).floor().long()
    return t.clamp(max=num_timesteps - 1)


def per_sample_gradients(model: nn.Module,
                         schedule: Schedule) -> Callable[..., tuple[list[torch.Tensor], torch.Tensor]]:
    """f(x0, t, eps) -> (per-sample gradients of `per_sample_loss`, one [n, numel] block per parameter in
    `model.parameters()` order, [n] losses)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, x0, t, eps):
        net = lambda x, tt: functional_call(model, (p, buffers), (x, tt))  # noqa: E731
        return per_sample_loss(net, schedule, x0[None], t[None], eps[None])[0]

    batched = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0, 0))

    def run(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grads, losses = batched(params, x0, t, eps)
        return [g.reshape(len(x0), -1) for g in grads.values()], losses

    return run


def _gram(means: torch.Tensor, block: int = 1 << 16) -> torch.Tensor:
    """<m_i, m_j> in float64 for the rows of `means`, in column blocks to bound memory; computed about the
    rows' mean (and the mean's part added back exactly), so the differences that SS_A takes stay accurate."""
    centre = means.to(torch.float64).mean(0)
    centred = torch.zeros(len(means), len(means), dtype=torch.float64)
    cross = torch.zeros(len(means), dtype=torch.float64)
    for lo in range(0, means.shape[1], block):
        d = means[:, lo:lo + block].to(torch.float64) - centre[lo:lo + block]
        centred += d @ d.T
        cross += d @ centre[lo:lo + block]
    return centred + cross[:, None] + cross[None, :] + float(centre.pow(2).sum())


def measure_variance(model: nn.Module, schedule: Schedule, train: torch.Tensor, config: VarianceConfig | None = None,
                     progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Draw the nested design on the training items `train`, compute every per-sample gradient (chunked, with
    torch.func) and return the decomposition, the ceilings, the per-bucket breakdown and the per-timestep
    statistics. `progress(n)` is called with the number of per-sample gradients just computed."""
    cfg = config or VarianceConfig()
    cfg.check()
    a, b, c, T = cfg.n_t, cfg.n_x0, cfg.n_eps, schedule.num_timesteps
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    timesteps = stratified_timesteps(a, T, gen)
    grads_of = per_sample_gradients(model, schedule)
    widths = [p.numel() for p in model.parameters()]
    dim = sum(widths)
    means = torch.zeros(a, dim, dtype=torch.float32)  # E[g | t_i] estimates, for the t part and the jackknife
    per_t: list[dict[str, float]] = []
    started = time.perf_counter()
    cell = torch.arange(b).repeat_interleave(c)  # sample -> its item within the timestep
    for i, t_value in enumerate(timesteps.tolist()):
        x0 = train[torch.randint(0, len(train), (b,), generator=gen)].repeat_interleave(c, dim=0)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.full((b * c,), t_value, dtype=torch.long)
        g_mom, n_mom, l_mom = GroupMoments(b, widths), GroupMoments(b, [1]), GroupMoments(b, [1])
        sq_norm = 0.0
        for lo in range(0, b * c, cfg.chunk):
            sl = slice(lo, lo + cfg.chunk)
            g, loss = grads_of(x0[sl].to(device), t[sl].to(device), eps[sl].to(device))
            g, loss = [block.detach().cpu() for block in g], loss.detach().cpu()
            squares = sum(block.to(torch.float64, copy=True).pow_(2).sum(1) for block in g)
            g_mom.add(g, cell[sl])
            n_mom.add([squares.sqrt()], cell[sl])
            l_mom.add([loss.to(torch.float64)], cell[sl])
            sq_norm += float(squares.sum())
            if progress is not None:
                progress(len(loss))
        means[i] = torch.cat([m.mean(0) for m in g_mom.means]).to(torch.float32)
        n_means, l_means = n_mom.means[0][:, 0], l_mom.means[0][:, 0]
        per_t.append({
            "t": t_value,
            "ss_e": float(g_mom.m2.sum()),
            "ss_b": c * g_mom.spread_of_means(),
            "mean_sq_norm": sq_norm / (b * c),
            "norm_var": float(n_mom.m2.sum()) / (b * (c - 1)),
            "norm_mean": float(n_means.mean()),
            "norm_ss_e": float(n_mom.m2.sum()),
            "norm_ss_b": c * float((n_means - n_means.mean()).pow(2).sum()),
            "loss_mean": float(l_means.mean()),
            "loss_ss_e": float(l_mom.m2.sum()),
            "loss_ss_b": c * float((l_means - l_means.mean()).pow(2).sum()),
        })
    seconds = time.perf_counter() - started
    gram = _gram(means)
    summary = summarise(per_t, gram, b, c, cfg.k)
    summary["gradient"]["se"] = jackknife(per_t, gram, b, c, cfg.k, _headline)
    return {
        **summary,
        "buckets": bucket_breakdown(per_t, gram, b, c, T, cfg.buckets),
        "per_t": per_t,
        "design": {"n_t": a, "n_x0": b, "n_eps": c, "samples": a * b * c, "parameters": dim,
                   "num_timesteps": T, "objective": schedule.objective, "seed": cfg.seed, "k": list(cfg.k),
                   "buckets": cfg.buckets},
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------- the model it measures


def train_denoiser(data: DataSplits, objective: str, steps: int, seed: int, *, config: Stage2Config | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A denoiser trained by stage 2 on uniform (Gaussian) noise for `objective`, and what describes it (the
    record `save_denoiser` keeps). Sampling quality is not measured (`quality` off) unless `config` asks."""
    cfg = config or Stage2Config(quality=False)
    kind = cfg.denoiser if cfg.denoiser != "auto" else ("unet" if len(data.data_shape) == 3 else "mlp")
    cfg = dataclasses.replace(cfg, denoiser=kind, objective=objective)
    result = train_stage2(data, "uniform", steps, seed, config=cfg, keep_model=True, progress=progress)
    info = {"dataset": data.name, "objective": objective, "steps": int(steps), "seed": int(seed),
            "denoiser": cfg.denoiser, "denoiser_kwargs": dict(cfg.denoiser_kwargs),
            "num_timesteps": cfg.num_timesteps, "schedule": cfg.schedule, "data_shape": list(data.data_shape),
            "val_loss": result.metrics["val_loss"], "test_loss": result.metrics["test_loss"]}
    return result.denoiser, info


def save_denoiser(model: nn.Module, path: str | Path, info: dict[str, Any]) -> Path:
    path = Path(path)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    return path


def load_denoiser(source: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A denoiser saved by `save_denoiser`: the file, or a folder that holds denoiser.pt (an earlier
    `nrctl bench variance --out`)."""
    path = Path(source)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ValueError(f"--model-from: no {MODEL_FILE} at {source} (give an earlier bench variance folder)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        info = saved["info"]
        model = build_denoiser(info["data_shape"], info["denoiser"], num_timesteps=info["num_timesteps"],
                               **info["denoiser_kwargs"])
        model.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a denoiser saved by nrctl bench variance ({first})") from None
    return model, info


# --------------------------------------------------------------------------------------------- the report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "n/a"


def _num(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else "inf"


def markdown(result: dict[str, Any]) -> str:
    g, loss, d, m = result["gradient"], result["loss"], result["design"], result["model"]
    se = g["se"]
    lines = [
        f"# Gradient variance: {m['dataset']}, objective {m['objective']}",
        "",
        f"Denoiser: {m['denoiser']} ({d['parameters']} parameters), uniform noise, {m['steps']} steps, seed "
        f"{m['seed']}; held-out loss {m['val_loss']:.4g}. Design: {d['n_t']} stratified timesteps x {d['n_x0']} "
        f"training items x {d['n_eps']} noises = {d['samples']} per-sample gradients ({result['seconds']:.0f} s).",
        "",
        f"**Any unbiased choice of noise could lower the per-sample gradient variance at most "
        f"{_num(g['is_noise']['ratio'])}x** (± {se['ratio']:.2g}), i.e. be worth at most that factor in batch size; "
        f"with K = {', '.join(g['is_noise_k'])} candidates per sample at most "
        f"{', '.join(_num(v['ratio']) + 'x' for v in g['is_noise_k'].values())}.",
        "",
        "| part | gradient variance | share | ± (jackknife) | loss share |",
        "|---|---|---|---|---|",
    ]
    names = {"t": "t: Var_t E[g \\| t]", "x0": "x0: E_t Var_x0 E[g \\| x0, t]", "eps": "eps: E Var_eps(g \\| x0, t)"}
    for p in PARTS:
        lines.append(f"| {names[p]} | {g[p]:.4g} | {_pct(g['fractions'][p])} | {100 * se['fraction_' + p]:.1f} pts "
                     f"| {_pct(loss['fractions'][p])} |")
    lines += [f"| total | {g['total']:.4g} | | | (loss variance {loss['total']:.4g}) |", "",
              "| importance sampling | minimum total variance | ceiling ratio |", "|---|---|---|",
              f"| over eps given (x0, t), q ∝ p ‖g‖ | {g['is_noise']['min_total']:.4g} | "
              f"{_num(g['is_noise']['ratio'])} |"]
    for k, v in g["is_noise_k"].items():
        lines.append(f"| best of K = {k} candidates, resampled and reweighted | {v['min_total']:.4g} | "
                     f"{_num(v['ratio'])} |")
    lines += [f"| (limit of any noise-side scheme, couplings included) eps part removed | "
              f"{g['eps_removed']['min_total']:.4g} | {_num(g['eps_removed']['ratio'])} |",
              f"| (context) over (t, x0, eps) jointly | {g['is_joint']['min_total']:.4g} | "
              f"{_num(g['is_joint']['ratio'])} |", "",
              "Per range of t (the t part of a range is the spread of E[g|t] within it):", "",
              "| t | eps share of the range's variance | share of all eps variance | ceiling ratio in the range "
              "| E‖g‖² | mean loss | loss eps share |", "|---|---|---|---|---|---|---|"]
    for r in result["buckets"]:
        lines.append(f"| {r['t_lo']}–{r['t_hi'] - 1} | {_pct(r['eps_fraction'])} | {_pct(r['eps_share_of_all'])} | "
                     f"{_num(r['is_noise_ratio'])} | {r['mean_sq_norm']:.4g} | {r['loss_mean']:.4g} | "
                     f"{_pct(r['loss_eps_fraction'])} |")
    lines += ["", "Estimators and what the ceilings mean: `noiserater.trainer.bench.variance` (module docstring).",
              ""]
    if result.get("command"):
        lines += ["Command:", "", "```bash", result["command"], "```", ""]
    return "\n".join(lines)


def write_report(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """variance.json (everything) and variance.md (the tables) in `out`."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / VARIANCE_JSON, "md": out / VARIANCE_MD}
    paths["json"].write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    return paths


def run_variance(model: nn.Module, info: dict[str, Any], data: DataSplits, config: VarianceConfig | None = None,
                 progress: Callable[[int], None] | None = None, command: str = "") -> dict[str, Any]:
    """`measure_variance` on the training split under the schedule the model was trained with; the result
    also says which model (`info`, from `train_denoiser` or `load_denoiser`) and which command."""
    if tuple(info["data_shape"]) != tuple(data.data_shape):
        raise ValueError(f"the denoiser was trained on data of shape {info['data_shape']}, the dataset's is "
                         f"{list(data.data_shape)}")
    schedule = make_schedule(info["num_timesteps"], info["schedule"], info["objective"])
    cfg = config or VarianceConfig()
    result = measure_variance(model, schedule, data.train, cfg, progress=progress)
    result["model"] = {**info, "dataset": info.get("dataset") or data.name, "measured_on": data.name}
    result["config"] = {**asdict(cfg), "k": list(cfg.k)}
    result["command"] = command
    return result
