"""Stage 2: train a fresh denoiser on a noise source, the same way for every method.

Same data, model, optimiser, step budget and seeds for every method: for one seed, the model's
initialisation, the minibatches and the timesteps are identical across methods; only the noise (or, for
min-snr, the loss weighting) differs. The held-out loss is measured under *Gaussian* noise at fixed seeds
(`metrics.FixedEval`), because sampling starts from N(0, I) whatever noise a method trained on.

    result = train_stage2(load_dataset("digits"), "rater-argmax", steps=3000, seed=0,
                          selector=NoiseSelector.local("digits.onnx", num_candidates=8, seed=0))
    result.metrics["val_loss"], result.curve_steps, result.curve_val_loss

A method is the name of a source in `noiserater.client.sources.REGISTRY`: the peers (`uniform`,
`immiscible`, `immiscible-knn`, `min-snr`), the rater rules of `stage2.sources` (`rater-argmax`,
`rater-sample`, `rater-assign`, `rater-kanneal`) and whatever else is registered. The loop only calls
`source.sample(x0, t, step)` and `source.loss_weights(t)`; `source_options` are what every source is built from.
A source that has `prefetch(x0, t, step)` (a rater's, see `stage2.sources.RaterSource`) is handed the next
step's minibatch and timesteps right after this step's `sample`, so its selection overlaps this step's
training; the loop then draws each minibatch one step early, in the same order, so results do not change.
`Stage2Config.prefetch` says which selections start early: "remote" (the default: a rater server's, whose
round trip then costs the step nothing), "all" (an in-process rater's too, on a thread of its own: worth it
when a core is free, or when the denoiser trains on a GPU) or "off".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noiserater.client.sources import NoiseSource, SourceError, make_source
from noiserater.trainer.stage2.metrics import EVAL_SEED, FixedEval, SampleQuality
from noiserater.trainer.stage2.sources import PREFETCH, Stage2Error
from noiserater.trainer.stage2.sweep import NfeSweep
from noiserater.trainer.stage2.variants import Wrap
from noiserater.trainer.substrate.data import DataSplits
from noiserater.trainer.substrate.denoisers import build_denoiser
from noiserater.trainer.substrate.diffusion import Schedule, ddpm_sample, make_schedule, per_sample_loss
from noiserater.trainer.substrate.samplers import SamplerError, check_sampler

__all__ = ["EvalContext", "Stage2Config", "Stage2Error", "Stage2Result", "build_source", "source_options",
           "steps_to_reach", "train_stage2"]


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
    ot_reg: float = 0.05  # ot-sinkhorn: entropic regularisation relative to the mean cost (0: exact OT)
    ot_subbatch: int = 0  # ot-subbatch: exact OT within sub-batches of this size (1: independent; 0: whole batch)
    num_timesteps: int = 1000
    schedule: str = "linear"
    objective: str = "eps"  # eps: VP DDPM, eps-prediction; flow: linear interpolant, velocity prediction
    denoiser: str = "auto"
    denoiser_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 0  # 0: about 20 points on the curve
    eval_repeats: int = 8  # fixed (t, eps) draws per held-out item
    quality: bool = True  # eps only: draw ancestral samples and measure frechet / swd at the end
    sample_count: int = 0  # 0: as many samples as held-out items (so the metric's floor is comparable)
    sample_steps: int | None = None  # DDPM sampling steps (None: all T)
    nfe: tuple[int, ...] = ()  # the few-step sweep (frechet@N, swd@N, straightness@N); () measures none
    reference_nfe: int = 100  # the sweep's high-NFE reference
    sampler: str = ""  # the sweep's sampler ("": the objective's deterministic one, DDIM or Euler)
    sweep_count: int = 2000  # starting noises of the sweep, the same for every method and seed
    primary_curve: bool = True  # with a sweep: the primary metric (frechet@4) at every evaluation point too
    device: str = "cpu"
    rater_threads: int = 1  # onnxruntime intra-op threads of the in-process rater (0: onnxruntime's default)
    prefetch: str = "remote"  # which selections start a step early: remote, all (in-process too) or off


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
    curve_primary: list[float] = field(default_factory=list)  # frechet@4 at curve_steps (with a sweep)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("denoiser")
        return out


@dataclass
class EvalContext:
    """Everything measured the same way for every method on one dataset (built once, shared by runs)."""

    schedule: Schedule
    val: FixedEval
    test: FixedEval
    quality: SampleQuality | None
    sweep: NfeSweep | None = None

    @classmethod
    def build(cls, data: DataSplits, cfg: Stage2Config) -> EvalContext:
        schedule = build_schedule(cfg)
        val = FixedEval(data.val, schedule, repeats=cfg.eval_repeats)
        test = FixedEval(data.test, schedule, repeats=cfg.eval_repeats, seed=EVAL_SEED + 1)
        ancestral = cfg.quality and cfg.objective == "eps"
        quality = SampleQuality(data) if ancestral or cfg.nfe else None
        sweep = None
        if cfg.nfe:
            sweep = NfeSweep.build(quality, data.data_shape, count=cfg.sweep_count, nfes=cfg.nfe,
                                   reference_nfe=cfg.reference_nfe, sampler=cfg.sampler or None)
        return cls(schedule, val, test, quality if ancestral or sweep else None, sweep)


def build_schedule(cfg: Stage2Config) -> Schedule:
    """The config's schedule for its objective; a bad objective, schedule or sampler is a Stage2Error."""
    try:
        schedule = make_schedule(cfg.num_timesteps, cfg.schedule, cfg.objective)
        check_sampler(cfg.objective, cfg.sampler or None)
    except (ValueError, SamplerError) as exc:
        raise Stage2Error(str(exc)) from None
    return schedule


def _seeded(seed: int, stream: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1000 + stream)


def source_options(cfg: Stage2Config, seed: int, device: torch.device, schedule: Schedule, *,
                   selector: Any = None, rater: str | Path | None = None,
                   model: nn.Module | None = None, data_shape: tuple[int, ...] = ()) -> dict[str, Any]:
    """Everything a registered source may take; `make_source` passes each factory only those it names:
    `generator` (this run's noise stream), `num_candidates`, `temperature`, `kanneal_end`, `steps`, `seed`,
    `threads`, `snr` (the schedule's snr(t)), `objective`, `selector`, `rater` and `prefetch`; the OT couplings'
    `ot_reg` and `ot_subbatch`; `model` (the denoiser being trained) and `loss_fn` (x0, t, eps) -> [B], its per-sample
    loss under this schedule without gradients, in whatever mode the loop has it in (None without a model); and
    `data_shape`, the shape of one training item."""
    loss_fn = None
    if model is not None:
        def loss_fn(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return per_sample_loss(model, schedule, x0, t, eps)

    return {"generator": _seeded(seed, 2, device), "num_candidates": cfg.k, "temperature": cfg.temperature,
            "kanneal_end": cfg.kanneal_end, "steps": cfg.steps, "seed": seed, "threads": cfg.rater_threads,
            "snr": schedule.snr, "objective": cfg.objective, "selector": selector, "rater": rater,
            "ot_reg": cfg.ot_reg, "ot_subbatch": cfg.ot_subbatch, "model": model, "loss_fn": loss_fn,
            "prefetch": cfg.prefetch, "data_shape": tuple(data_shape)}


def build_source(method: str, options: dict[str, Any], wrappers: Sequence[Wrap] = ()) -> NoiseSource:
    """The source registered as `method`, built from `options`, inside `wrappers` (innermost first)."""
    try:
        source = make_source(method, **options)
    except SourceError as exc:
        raise Stage2Error(str(exc)) from None
    for wrap in wrappers:
        source = wrap(source, options)
    return source


def train_stage2(data: DataSplits, method: str, steps: int, seed: int, selector: Any = None, *,
                 rater: str | Path | None = None, config: Stage2Config | None = None,
                 context: EvalContext | None = None, wrappers: Sequence[Wrap] = (),
                 progress: Callable[[int], None] | None = None, keep_model: bool = False) -> Stage2Result:
    """Train a fresh denoiser on `data` for `steps` with the noise of the source registered as `method`;
    measure it.

    `selector` (a NoiseSelector, local or remote) or `rater` (an ONNX path, wrapped in a local selector
    with the config's K / temperature and this seed) serves the sources that need a rater. `wrappers`
    (`stage2.variants`) wrap the source. `context` shares the fixed evaluation sets between runs.
    `progress(n)` is called with the number of steps just done.
    """
    cfg = Stage2Config(**{**asdict(config or Stage2Config()), "steps": int(steps)})
    if cfg.steps < 1:
        raise Stage2Error("steps: must be >= 1")
    if cfg.prefetch not in PREFETCH:
        raise Stage2Error(f"prefetch: {cfg.prefetch!r} is not one of {', '.join(PREFETCH)}")
    device = torch.device(cfg.device)
    ctx = context or EvalContext.build(data, cfg)
    schedule = build_schedule(cfg).to(device)

    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = build_denoiser(data.data_shape, cfg.denoiser, num_timesteps=cfg.num_timesteps,
                           **cfg.denoiser_kwargs).to(device)
    torch.random.set_rng_state(rng_state)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    lr_at = lambda s: cfg.lr * (cfg.lr_final_fraction + (1 - cfg.lr_final_fraction)  # noqa: E731
                                * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    options = source_options(cfg, seed, device, schedule, selector=selector, rater=rater, model=model,
                             data_shape=data.data_shape)
    source = build_source(method, options, wrappers)
    data_gen = _seeded(seed, 1, torch.device("cpu"))
    train = data.train
    eval_every = cfg.eval_every or max(1, cfg.steps // 20)

    sweep = ctx.sweep
    track_primary = sweep is not None and cfg.primary_curve
    def draw_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, train.shape[0], (cfg.batch_size,), generator=data_gen)
        return train[idx].to(device), schedule.sample_timesteps(cfg.batch_size, generator=data_gen).to(device)

    prefetch = getattr(source, "prefetch", None) if cfg.prefetch != "off" else None
    upcoming = None  # the next step's (x0, t), drawn early for prefetch
    curve_steps, curve_val = [0], [ctx.val.loss(model)]
    curve_primary = [sweep.primary(model, schedule)] if track_primary else []
    select_s = train_s = 0.0
    sq_norm = cosine = train_loss_ema = 0.0
    model.train()
    for step in range(cfg.steps):
        t_start = time.perf_counter()
        x0, t = upcoming if upcoming is not None else draw_batch()
        t_sel = time.perf_counter()
        eps = source.sample(x0, t, step)
        if prefetch is not None and step + 1 < cfg.steps:
            upcoming = draw_batch()
            prefetch(*upcoming, step + 1)
        select_s += time.perf_counter() - t_sel
        losses = per_sample_loss(model, schedule, x0, t, eps)
        w = source.loss_weights(t)
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
            if track_primary:
                curve_primary.append(sweep.primary(model, schedule))
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
    if sweep is not None:
        metrics.update(sweep.measure(model, schedule))
    if ctx.quality is not None and cfg.quality and cfg.objective == "eps":
        count = cfg.sample_count or ctx.quality.heldout_count
        gen = torch.Generator().manual_seed(EVAL_SEED + seed)
        model.eval()
        samples = ddpm_sample(model, schedule, (count, *data.data_shape), generator=gen, device=device,
                              steps=cfg.sample_steps)
        metrics.update(ctx.quality.measure(samples.cpu()))
    return Stage2Result(method, seed, cfg.steps, curve_steps, curve_val, metrics, asdict(cfg),
                        model if keep_model else None, curve_primary)


def steps_to_reach(curve_steps: list[int], curve_values: list[float], target: float) -> int | None:
    """The first evaluated step whose value is <= target (None if never)."""
    for s, v in zip(curve_steps, curve_values, strict=True):
        if v <= target:
            return s
    return None
