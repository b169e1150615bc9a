"""Stage 2: train a fresh denoiser with a given noise source, the same way for every method.

Same data, model, optimiser, step budget and seeds for every method: for one seed, the model's
initialisation, the minibatches and the timesteps are identical across methods; only the noise (or, for
min-snr, the loss weighting) differs. The held-out loss is measured under *Gaussian* noise at fixed seeds
(`metrics.FixedEval`), because sampling starts from N(0, I) whatever noise a method trained on.

    result = train_stage2(load_dataset("digits"), "rater-argmax", steps=3000, seed=0,
                          selector=NoiseSelector.local("digits.onnx", k=8, seed=0))
    result.metrics["val_loss"], result.curve_steps, result.curve_val_loss

Methods (see `METHODS`): `uniform`; the rater with a selection rule, `rater-argmax`, `rater-sample`,
`rater-assign`, and `rater-kanneal` (argmax with K annealed linearly from K to 1 by `kanneal_end` of the
run, uniform afterwards); the peers `immiscible`, `immiscible-knn` (nearest of K, the same K) and `min-snr`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noiserater.client import peers
from noiserater.trainer.stage2.metrics import EVAL_SEED, FixedEval, SampleQuality
from noiserater.trainer.substrate.data import DataSplits
from noiserater.trainer.substrate.denoisers import build_denoiser
from noiserater.trainer.substrate.diffusion import NoiseSchedule, ddpm_sample, per_sample_loss

RATER_RULES = {"rater-argmax": "argmax", "rater-sample": "sample", "rater-assign": "assign", "rater-kanneal": "argmax"}
PEER_METHODS = ("uniform", "immiscible", "immiscible-knn", "min-snr")
METHODS = ("uniform", "rater-argmax", "rater-sample", "rater-assign", "rater-kanneal", "immiscible",
           "immiscible-knn", "min-snr")


class Stage2Error(ValueError):
    pass


@dataclass
class Stage2Config:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    lr_final_fraction: float = 0.1  # cosine decay to this fraction of lr
    grad_clip: float = 1.0
    k: int = 8  # candidates per sample for the rater's argmax/sample/kanneal and for immiscible-knn
    temperature: float = 1.0  # rater-sample's softmax temperature
    kanneal_end: float = 0.5  # rater-kanneal: K reaches 1 at this fraction of the run
    select_from: float = 0.0  # rater-*: select only for steps in [select_from, select_until) * steps,
    select_until: float = 1.0  # plain Gaussian noise outside (the "when does selection help" knob)
    symmetrise: bool = False  # rater-*: flip each selected noise's sign by a fair coin (removes any mean shift)
    select_t_min: int = 0  # rater-*: select only for samples with t >= this; Gaussian noise below
    importance_weights: bool = False  # rater-sample: weight each loss by 1 / (K p_chosen), which makes the
    # expected gradient exactly the Gaussian one (importance sampling; needs `rater`, not a remote selector)
    num_timesteps: int = 1000
    schedule: str = "linear"
    denoiser: str = "auto"
    denoiser_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 0  # 0: about 20 points on the curve
    eval_repeats: int = 8  # fixed (t, eps) draws per held-out item
    quality: bool = True  # draw samples and measure frechet / swd at the end
    sample_count: int = 0  # 0: as many samples as held-out items (so the metric's floor is comparable)
    sample_steps: int | None = None  # DDPM sampling steps (None: all T)
    device: str = "cpu"
    rater_threads: int = 1  # onnxruntime intra-op threads of the in-process rater (0: onnxruntime's default)


@dataclass
class Stage2Result:
    method: str
    seed: int
    steps: int
    curve_steps: list[int]
    curve_val_loss: list[float]
    metrics: dict[str, float]
    config: dict[str, Any]
    denoiser: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("denoiser")
        return out


@dataclass
class EvalContext:
    """Everything measured the same way for every method on one dataset (built once, shared by runs)."""

    schedule: NoiseSchedule
    val: FixedEval
    test: FixedEval
    quality: SampleQuality | None

    @classmethod
    def build(cls, data: DataSplits, cfg: Stage2Config) -> EvalContext:
        schedule = NoiseSchedule(cfg.num_timesteps, cfg.schedule)
        val = FixedEval(data.val, schedule, repeats=cfg.eval_repeats)
        test = FixedEval(data.test, schedule, repeats=cfg.eval_repeats, seed=EVAL_SEED + 1)
        quality = SampleQuality(data) if cfg.quality else None
        return cls(schedule, val, test, quality)


def _seeded(seed: int, stream: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1000 + stream)


def kanneal_schedule(k: int, steps: int, end_fraction: float) -> Callable[[int], int]:
    """K(step): linear from k at step 0 to 1 at end_fraction * steps, 1 afterwards."""
    end = max(1, int(round(end_fraction * steps)))
    return lambda step: max(1, int(round(k - (k - 1) * min(step, end) / end)))


class NoiseSource:
    """method -> eps for a batch; min-snr's loss weights come from `weights`."""

    def __init__(self, method: str, cfg: Stage2Config, seed: int, device: torch.device, selector: Any = None,
                 rater: str | Path | None = None, k_schedule: Callable[[int], int] | None = None):
        if method not in METHODS and not method.startswith("rater-"):
            raise Stage2Error(f"method: unknown {method!r} (one of {', '.join(METHODS)})")
        self.method, self.cfg = method, cfg
        self.gen = _seeded(seed, 2, device)
        self.selector = selector
        self.k_schedule = k_schedule
        self.is_rater = method.startswith("rater-")
        if self.is_rater and selector is None:
            if rater is None:
                raise Stage2Error(f"method {method!r} needs a rater (an ONNX file) or a NoiseSelector")
            from noiserater.client.selector import NoiseSelector, SelectorError

            rule = RATER_RULES.get(method, "argmax")
            try:
                self.selector = NoiseSelector.local(rater, k=cfg.k, rule=rule, temperature=cfg.temperature,
                                                    seed=seed, intra_op_threads=cfg.rater_threads)
            except SelectorError as exc:
                raise Stage2Error(str(exc)) from None
        self._is_weights: torch.Tensor | None = None
        self._is_calls = 0
        if cfg.importance_weights:
            if method != "rater-sample" or rater is None:
                raise Stage2Error("importance_weights needs method rater-sample and a rater ONNX file")
            self._session = self.selector.session
            if self._session is None:
                raise Stage2Error("importance_weights needs an in-process rater (rater=ONNX file, no remote selector)")
        if method == "rater-kanneal" and self.k_schedule is None:
            self.k_schedule = kanneal_schedule(cfg.k, cfg.steps, cfg.kanneal_end)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        m = self.method
        if self.is_rater:
            lo, hi = self.cfg.select_from * self.cfg.steps, self.cfg.select_until * self.cfg.steps
            k = self.k_schedule(step) if self.k_schedule is not None else None
            if not lo <= step < hi or k == 1:
                return peers.gaussian(x0, self.gen)
            if self.cfg.importance_weights:
                return self._sample_with_weights(x0, t, k or self.cfg.k)
            if self.cfg.select_t_min > 0:
                eps = peers.gaussian(x0, self.gen)
                chosen = t >= self.cfg.select_t_min
                if bool(chosen.any()):
                    eps[chosen] = self.selector.select(x0[chosen], t[chosen], k=k)
            else:
                eps = self.selector.select(x0, t, k=k)
            if self.cfg.symmetrise:
                coin = torch.randint(0, 2, (eps.shape[0],), generator=self.gen, device=self.gen.device)
                eps = eps * (2 * coin - 1).to(eps.device, eps.dtype).view(-1, *([1] * (eps.dim() - 1)))
            return eps
        if m in ("uniform", "min-snr"):
            return peers.gaussian(x0, self.gen)
        if m == "immiscible":
            return peers.immiscible(x0, self.gen)
        if m == "immiscible-knn":
            return peers.immiscible_knn(x0, self.gen, self.cfg.k)
        raise Stage2Error(f"method: unknown {m!r}")

    def _sample_with_weights(self, x0: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
        """rater-sample through the shared scoring code, keeping 1 / (K p_chosen) as the loss weights."""
        from noiserater.core.selection import Rule, SelectionPlan

        b = x0.shape[0]
        candidates = torch.randn((b, k, *x0.shape[1:]), generator=self.gen, device=self.gen.device)
        x0_np, t_np = x0.detach().cpu().float().numpy(), t.detach().cpu().numpy()
        plan = SelectionPlan(k, 1, Rule.SAMPLE, self.cfg.temperature)
        flat = self._session.score(*plan.triples(x0_np, t_np, candidates.cpu().numpy()))
        self._is_calls += 1
        idx, _ = plan.choose(flat, seed=self._is_calls)
        chosen = torch.from_numpy(idx[:, 0])
        log_p = torch.from_numpy(plan.log_probs(flat))[torch.arange(b), chosen]
        self._is_weights = (1.0 / (k * log_p.exp())).to(x0.device, torch.float32)
        return candidates[torch.arange(b), chosen].to(x0.device, x0.dtype)

    def weights(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor | None:
        if self.method == "min-snr":
            return peers.min_snr_weights(schedule.snr(t))
        if self.cfg.importance_weights:
            return self._is_weights
        return None


def train_stage2(data: DataSplits, method: str, steps: int, seed: int, selector: Any = None, *,
                 rater: str | Path | None = None, config: Stage2Config | None = None,
                 context: EvalContext | None = None, k_schedule: Callable[[int], int] | None = None,
                 progress: Callable[[int], None] | None = None, keep_model: bool = False) -> Stage2Result:
    """Train a fresh denoiser on `data` for `steps` with `method`'s noise; measure it.

    `selector` (a NoiseSelector, local or remote) or `rater` (an ONNX path, wrapped in a local selector
    with the config's K / temperature and this seed) serves the `rater-*` methods; `k_schedule(step) -> K`
    overrides K per step. `context` shares the fixed evaluation sets between runs. `progress(n)` is called
    with the number of steps just done.
    """
    cfg = Stage2Config(**{**asdict(config or Stage2Config()), "steps": int(steps)})
    if cfg.steps < 1:
        raise Stage2Error("steps: must be >= 1")
    device = torch.device(cfg.device)
    ctx = context or EvalContext.build(data, cfg)
    schedule = NoiseSchedule(cfg.num_timesteps, cfg.schedule).to(device)

    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = build_denoiser(data.data_shape, cfg.denoiser, num_timesteps=cfg.num_timesteps,
                           **cfg.denoiser_kwargs).to(device)
    torch.random.set_rng_state(rng_state)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    lr_at = lambda s: cfg.lr * (cfg.lr_final_fraction + (1 - cfg.lr_final_fraction)  # noqa: E731
                                * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    source = NoiseSource(method, cfg, seed, device, selector=selector, rater=rater, k_schedule=k_schedule)
    data_gen = _seeded(seed, 1, torch.device("cpu"))
    train = data.train
    eval_every = cfg.eval_every or max(1, cfg.steps // 20)

    curve_steps, curve_val = [0], [ctx.val.loss(model)]
    select_s = train_s = 0.0
    sq_norm = cosine = train_loss_ema = 0.0
    model.train()
    for step in range(cfg.steps):
        t_start = time.perf_counter()
        idx = torch.randint(0, train.shape[0], (cfg.batch_size,), generator=data_gen)
        x0 = train[idx].to(device)
        t = schedule.sample_timesteps(cfg.batch_size, generator=data_gen).to(device)
        t_sel = time.perf_counter()
        eps = source(x0, t, step)
        select_s += time.perf_counter() - t_sel
        losses = per_sample_loss(model, schedule, x0, t, eps)
        w = source.weights(schedule, t)
        loss = (losses * w).mean() if w is not None else losses.mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        train_s += time.perf_counter() - t_start
        with torch.no_grad():
            e, x = eps.flatten(1), x0.flatten(1)
            sq_norm += float(e.pow(2).mean())
            cosine += float(nn.functional.cosine_similarity(e, x, dim=1, eps=1e-8).mean())
            train_loss_ema = float(losses.mean()) if step == 0 else 0.99 * train_loss_ema + 0.01 * float(losses.mean())
        if (step + 1) % eval_every == 0 or step + 1 == cfg.steps:
            curve_steps.append(step + 1)
            curve_val.append(ctx.val.loss(model))
        if progress is not None:
            progress(1)

    metrics: dict[str, float] = {
        "val_loss": curve_val[-1],
        "test_loss": ctx.test.loss(model),
        "train_loss_selected": train_loss_ema,  # on the noise the method trained on (EMA over steps)
        "ms_per_step": 1000 * train_s / cfg.steps,
        "selection_ms_per_step": 1000 * select_s / cfg.steps,
        "noise_sq_norm_per_dim": sq_norm / cfg.steps,
        "noise_cosine_with_x0": cosine / cfg.steps,
    }
    if ctx.quality is not None:
        count = cfg.sample_count or ctx.quality.heldout_count
        gen = torch.Generator().manual_seed(EVAL_SEED + seed)
        model.eval()
        samples = ddpm_sample(model, schedule, (count, *data.data_shape), generator=gen, device=device,
                              steps=cfg.sample_steps)
        metrics.update(ctx.quality.measure(samples.cpu()))
    return Stage2Result(method, seed, cfg.steps, curve_steps, curve_val, metrics, asdict(cfg),
                        model if keep_model else None)


def steps_to_reach(curve_steps: list[int], curve_values: list[float], target: float) -> int | None:
    """The first evaluated step whose value is <= target (None if never)."""
    for s, v in zip(curve_steps, curve_values, strict=True):
        if v <= target:
            return s
    return None
