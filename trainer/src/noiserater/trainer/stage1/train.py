"""Stage 1's training loop: meta-learn the rater against a population of proxy denoisers.

Each meta step, every inner model of the population (reset at staggered times, so the rater sees every
phase of training) contributes a gradient for the rater and trains for real. What the rater learns is the
`meta_objective`:
- "soft-weights" (the default): a meta-gradient through one virtual step of the rater-weighted loss
  (`noiserater.trainer.stage1.meta`), then one real Adam step on the rater-weighted loss;
- "through-selection": the rater picks one of K candidate noises per sample (straight-through Gumbel-softmax)
  and the inner model takes H differentiable real Adam steps on the picks; the held-out loss after them is
  differentiated back to the rater (`noiserater.trainer.stage1.through_selection`);
- "through-assignment": the same through stage 2's batch-level assignment (the batch's noises permuted over
  its samples; Hungarian forward, Gumbel-Sinkhorn backward), so both marginals are kept;
- "grad-norm": regression of the score on the log per-sample gradient norm, the proposal that minimises the
  variance of stage 2's importance-weighted rule (`noiserater.trainer.stage1.grad_norm`), then one plain
  Adam step;
- "denoiser-error": the rater is a denoiser of its own, trained on plain Gaussian noise for `steps` Adam steps,
  and scores a triple by minus its loss on it (`noiserater.trainer.stage1.rater.DenoiserErrorRater`): a frozen
  model-aligned coupling. No population is used; `denoiser`/`denoiser_kwargs` shape that denoiser.
The inner models train on the `objective`'s loss: "eps" (VP DDPM, eps prediction) or "flow" (the linear
interpolant, velocity prediction; see `noiserater.trainer.substrate.diffusion`).

Under torchrun each rank holds its own population and data stream; the rater's gradients are all-reduced
(gloo on CPU), so all ranks hold the same rater.

RUN_DIR holds: rater/ (model.safetensors + config.json, `save_pretrained`) and rater.pt (`save_rater`), the
trained rater in two formats that `load_rater` and `nrctl export` read; checkpoint.pt (everything needed to
resume exactly; checkpoint-rank{r}.pt for ranks > 0), config.json (the run's TrainConfig), metrics.jsonl,
curves.png and, with `log_with="tensorboard"`, tensorboard/ (the same metrics as TensorBoard scalars).

An existing RUN_DIR is resumed only with the settings it was started with (`steps` and `device` may change):
`existing="check"` refuses other settings with ConfigMismatchError, "resume" keeps the run's own settings,
"overwrite" deletes the run's files and starts again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from noiserater.trainer.stage1.grad_norm import grad_norm_regression
from noiserater.trainer.stage1.meta import (
    META_GRAD_ROUTES,
    adam_preconditioner,
    meta_gradient,
    virtual_step_losses,
    weight_stats,
)
from noiserater.trainer.stage1.rater import (
    PRETRAINED_DIR,
    RATER_FILE,
    build_rater,
    default_rater_kind,
    save_pretrained,
    save_rater,
)
from noiserater.trainer.stage1.through_selection import AdamState, through_selection_gradient, uniform_outer_loss
from noiserater.trainer.substrate.data import DataSplits, load_dataset, warn_if_tiny
from noiserater.trainer.substrate.denoisers import build_denoiser
from noiserater.trainer.substrate.diffusion import (
    FLOW_KINDS,
    OBJECTIVES,
    SCHEDULE_KINDS,
    make_schedule,
    per_sample_loss,
)

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, PLOT_FILE, RATER_FILE)  # what --overwrite removes, with the checkpoints,
RUN_FOLDERS = (PRETRAINED_DIR, TENSORBOARD_DIR)  # these folders
EXISTING_MODES = ("check", "resume", "overwrite")
MAY_CHANGE_ON_RESUME = ("steps", "device")  # a resumed run may be extended or moved
LOGGERS = ("tensorboard",)
SOFT_WEIGHTS, THROUGH_SELECTION, THROUGH_ASSIGNMENT, GRAD_NORM, DENOISER_ERROR = (
    "soft-weights", "through-selection", "through-assignment", "grad-norm", "denoiser-error")
META_OBJECTIVES = (SOFT_WEIGHTS, THROUGH_SELECTION, THROUGH_ASSIGNMENT, GRAD_NORM, DENOISER_ERROR)

log = logging.getLogger("noiserater.trainer.stage1")


class ConfigMismatchError(ValueError):
    """RUN_DIR holds a run with other settings than the ones asked for."""


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data_key: str = ""  # the array of an .npz (see substrate.data.load_dataset)
    data_range: str = "auto"  # how user arrays are scaled to [-1, 1]
    data_layout: str = "auto"  # nchw / nhwc / auto for user image arrays
    steps: int = 600
    inner_steps: int = 1  # U, unrolled virtual SGD steps
    population: int = 4  # P inner models per rank
    meta_grad: str = "fast"  # "exact" | "fast"
    seed: int = 0
    device: str = "auto"
    batch_size: int = 128
    val_batch_size: int = 256
    num_timesteps: int = 1000
    schedule: str = "linear"  # eps: linear | cosine; flow: linear (the interpolant)
    objective: str = "eps"  # what the inner models predict: "eps" or "flow" (velocity)
    meta_objective: str = SOFT_WEIGHTS  # one of META_OBJECTIVES (module docstring)
    selection_candidates: int = 8  # through-selection: K candidate noises per (x0, t)
    selection_horizon: int = 4  # through-selection/-assignment: H differentiable Adam steps per meta step
    denoiser: str = "auto"
    denoiser_kwargs: dict[str, Any] = field(default_factory=dict)
    rater: str = "auto"
    rater_kwargs: dict[str, Any] = field(default_factory=dict)
    inner_lr: float = 1e-3  # Adam, for the real inner updates
    virtual_lr: float = 1e-4  # alpha of the virtual (Adam-preconditioned SGD) step
    rater_lr: float = 1e-3
    tau: float = 1.0  # soft-weights: softmax temperature; through-selection: selection temperature
    # G > 1: train batches hold batch_size/G (x0, t) pairs with G noise candidates each and the weights
    # are a softmax within each group (see meta.soft_weights): the rater learns to rank noises for a
    # given (x0, t), which is what stage-2 selection asks of it. 1: one softmax over the whole batch.
    candidate_group: int = 1
    entropy_coef: float = 0.0
    reset_every: int = 300  # each inner model is re-initialised this often, at staggered offsets
    fd_eps: float = 1e-3
    log_every: int = 5
    checkpoint_every: int = 50

    def validate(self) -> None:
        if self.meta_grad not in META_GRAD_ROUTES:
            raise ValueError(f"--meta-grad must be one of {', '.join(META_GRAD_ROUTES)}, got {self.meta_grad!r}")
        for name in ("steps", "inner_steps", "population", "batch_size", "val_batch_size", "reset_every",
                     "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.candidate_group < 1 or self.batch_size % self.candidate_group:
            raise ValueError(f"candidate_group must be >= 1 and divide batch_size={self.batch_size}, "
                             f"got {self.candidate_group}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        kinds = SCHEDULE_KINDS if self.objective == "eps" else FLOW_KINDS
        if self.schedule not in kinds:
            raise ValueError(f"schedule {self.schedule!r} does not apply to the {self.objective} objective "
                             f"(one of {', '.join(kinds)})")
        if self.meta_objective not in META_OBJECTIVES:
            raise ValueError(f"--meta-objective must be one of {', '.join(META_OBJECTIVES)}, "
                             f"got {self.meta_objective!r}")
        if self.meta_objective == DENOISER_ERROR and self.rater not in ("auto", DENOISER_ERROR):
            raise ValueError(f"--meta-objective {DENOISER_ERROR} trains a rater of its own kind, not {self.rater!r}")
        if self.selection_candidates < 2:
            raise ValueError(f"selection_candidates must be >= 2, got {self.selection_candidates}")
        if self.selection_horizon < 1:
            raise ValueError(f"selection_horizon must be >= 1, got {self.selection_horizon}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def differences(self, other: TrainConfig) -> list[str]:
        """Names of the settings that differ from `other`'s, less those a resumed run may change."""
        mine, theirs = asdict(self), asdict(other)
        return [k for k in mine if k not in MAY_CHANGE_ON_RESUME and mine[k] != theirs[k]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    return torch.device(name)


class Member:
    """One inner model of the population with its Adam optimiser and its age in steps."""

    def __init__(self, model: nn.Module, lr: float):
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.age = 0

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "age": self.age}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.age = state["age"]


class MetaTrainer:
    """Rater, rater optimiser, population and RNG for one rank; `step()` is one meta step."""

    def __init__(self, cfg: TrainConfig, data: DataSplits, device: torch.device, rank: int = 0, world: int = 1):
        self.cfg, self.data, self.device, self.rank, self.world = cfg, data, device, rank, world
        self.schedule = make_schedule(cfg.num_timesteps, cfg.schedule, cfg.objective).to(device)
        self.train_x = data.train.to(device)
        self.val_x = data.val.to(device)
        if cfg.meta_objective == DENOISER_ERROR:
            self.rater_kind = DENOISER_ERROR
            self.rater_kwargs = {"objective": cfg.objective, "schedule": cfg.schedule, "denoiser": cfg.denoiser,
                                 "denoiser_kwargs": dict(cfg.denoiser_kwargs)}
        else:
            self.rater_kind = cfg.rater if cfg.rater != "auto" else default_rater_kind(data.data_shape)
            self.rater_kwargs = dict(cfg.rater_kwargs)
        with torch.random.fork_rng(devices=[]):  # same rater initialisation on every rank; global RNG untouched
            torch.manual_seed(cfg.seed)
            rater = build_rater(self.rater_kind, data.data_shape, cfg.num_timesteps, **self.rater_kwargs)
        self.rater = rater.to(device)
        self.rater_opt = torch.optim.Adam(self.rater.parameters(), lr=cfg.rater_lr)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + rank)  # this rank's data and resets
        population = 0 if cfg.meta_objective == DENOISER_ERROR else cfg.population
        self.members = [Member(self._fresh_denoiser(), cfg.inner_lr) for _ in range(population)]
        self.step_count = 0
        self.wall_seconds = 0.0  # over all calls that trained this run
        if world > 1:
            for p in self.rater.parameters():
                dist.broadcast(p.data, src=0)

    # -- randomness -------------------------------------------------------------------------------------
    def _fresh_denoiser(self) -> nn.Module:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_denoiser(self.data.data_shape, self.cfg.denoiser, num_timesteps=self.cfg.num_timesteps,
                                   **self.cfg.denoiser_kwargs)
        return model.to(self.device)

    def _batch(self, source: torch.Tensor, size: int,
               group: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """size rows; with group > 1, size/group (x0, t) pairs each repeated over `group` fresh noises."""
        idx = torch.randint(0, len(source), (size // group,), generator=self.gen).repeat_interleave(group)
        x0 = source[idx.to(source.device)]
        t = self.schedule.sample_timesteps(size // group, generator=self.gen).repeat_interleave(group).to(self.device)
        eps = torch.randn(x0.shape, generator=self.gen).to(self.device)
        return x0, t, eps

    def _reset_due(self, index: int) -> bool:
        offset = index * self.cfg.reset_every // self.cfg.population
        return self.step_count > 0 and self.step_count % self.cfg.reset_every == offset

    # -- one meta step ------------------------------------------------------------------------------------
    def step(self, evaluate: bool = False) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.rater_opt.zero_grad(set_to_none=True)
        stats: dict[str, list[float]] = {}

        def record(key: str, value: float) -> None:
            stats.setdefault(key, []).append(value)

        if cfg.meta_objective == DENOISER_ERROR:
            self._denoiser_error_step(evaluate, record)
        for i, member in enumerate(self.members):
            if self._reset_due(i):
                self.members[i] = member = Member(self._fresh_denoiser(), cfg.inner_lr)
            if cfg.meta_objective in (THROUGH_SELECTION, THROUGH_ASSIGNMENT):
                self._through_selection_step(member, evaluate, record)
                continue
            if cfg.meta_objective == GRAD_NORM:
                self._grad_norm_step(member, evaluate, record)
                continue
            batches = [self._batch(self.train_x, cfg.batch_size, cfg.candidate_group) for _ in range(cfg.inner_steps)]
            val_batch = self._batch(self.val_x, cfg.val_batch_size)
            params = member.params()
            if member.age == 0:  # Adam has no second moment yet: take one plain step so P is defined
                self._real_step(member, batches[0], None)
                params = member.params()
            precond = adam_preconditioner(member.opt, params, lambda m=member: dict(m.model.named_parameters()))
            result = meta_gradient(cfg.meta_grad, member.model, self.schedule, params, precond, cfg.virtual_lr,
                                   self.rater, batches, val_batch, tau=cfg.tau, entropy_coef=cfg.entropy_coef,
                                   fd_eps=cfg.fd_eps, grad_scale=1.0 / (len(self.members) * self.world),
                                   group=cfg.candidate_group)
            if evaluate:
                learned, uniform = virtual_step_losses(member.model, self.schedule, params, precond,
                                                       cfg.virtual_lr, batches[0], val_batch, result.weights[0])
                record("outer_loss_learned", learned)
                record("outer_loss_uniform", uniform)
                for key, value in weight_stats(result.weights[0]).items():
                    record(key, value)
            record("outer_loss", result.outer_loss)
            record("inner_loss", result.inner_loss)
            self._real_step(member, batches[0], result.grad_theta0)
        if self.world > 1:
            for p in self.rater.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)  # grad_scale already divided by world: this is the mean
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.rater.parameters(), max_norm=float("inf")))
        self.rater_opt.step()
        self.step_count += 1
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["rater_grad_norm"] = grad_norm
        if self.world > 1:
            keys = sorted(out)
            vec = torch.tensor([out[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(vec)
            out = {k: float(v) / self.world for k, v in zip(keys, vec, strict=True)}
        out["seconds_per_step"] = time.perf_counter() - t0
        return out

    def _through_selection_step(self, member: Member, evaluate: bool, record: Callable[[str, float], None]) -> None:
        """H differentiable Adam steps on the rater's picks (or assignment); they become the member's real
        training."""
        cfg = self.cfg
        assign = cfg.meta_objective == THROUGH_ASSIGNMENT
        k = 1 if assign else cfg.selection_candidates
        batches = [self._batch(self.train_x, cfg.batch_size * k, k) for _ in range(cfg.selection_horizon)]
        val_batch = self._batch(self.val_x, cfg.val_batch_size)
        named = dict(member.model.named_parameters())
        params = member.params()
        adam = AdamState.read(member.opt, named)
        result = through_selection_gradient(member.model, self.schedule, params, adam, self.rater, batches,
                                            val_batch, k, cfg.tau, self.gen,
                                            grad_scale=1.0 / (len(self.members) * self.world), assign=assign)
        if evaluate:
            record("outer_loss_learned", result.outer_loss)
            record("outer_loss_uniform", uniform_outer_loss(member.model, self.schedule, params, adam, batches,
                                                            val_batch, k))
            record("choice_entropy", result.entropy)
        record("outer_loss", result.outer_loss)
        record("inner_loss", result.inner_loss)
        result.adam.write(member.opt, named, result.theta)
        member.age += cfg.selection_horizon

    def _grad_norm_step(self, member: Member, evaluate: bool, record: Callable[[str, float], None]) -> None:
        """Fit the rater to the log per-sample gradient norms of the member; then one plain Adam step."""
        cfg = self.cfg
        batch = self._batch(self.train_x, cfg.batch_size, cfg.candidate_group)
        result = grad_norm_regression(member.model, self.schedule, member.params(), self.rater, batch,
                                      grad_scale=1.0 / (len(self.members) * self.world))
        record("grad_norm_mse", result.mse)
        record("inner_loss", result.inner_loss)
        if evaluate:
            record("grad_norm_corr", result.corr)
        self._real_step(member, batch, result.mean_grad)

    def _denoiser_error_step(self, evaluate: bool, record: Callable[[str, float], None]) -> None:
        """One gradient of the rater's own denoiser on its loss under plain Gaussian noise (the rater's Adam
        step follows in `step`)."""
        cfg = self.cfg
        denoiser = self.rater.denoiser
        x0, t, eps = self._batch(self.train_x, cfg.batch_size)
        loss = per_sample_loss(denoiser, self.schedule, x0, t, eps).mean()
        (loss / self.world).backward()
        record("inner_loss", float(loss.detach()))
        if evaluate:
            with torch.no_grad():
                record("val_loss", float(per_sample_loss(denoiser, self.schedule,
                                                         *self._batch(self.val_x, cfg.val_batch_size)).mean()))

    def _real_step(self, member: Member, batch, grads) -> None:
        """One Adam step of the inner model on the rater-weighted loss (gradient reused from the meta step)."""
        if grads is None:
            member.opt.zero_grad(set_to_none=True)
            x0, t, eps = batch
            per_sample_loss(member.model, self.schedule, x0, t, eps).mean().backward()
        else:
            for name, p in member.model.named_parameters():
                p.grad = grads[name].detach().clone()
        member.opt.step()
        member.age += 1

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "wall_seconds": self.wall_seconds,
            "config": asdict(self.cfg),
            "rater_kind": self.rater_kind,
            "rater": self.rater.state_dict(),
            "rater_opt": self.rater_opt.state_dict(),
            "members": [m.state_dict() for m in self.members],
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "rank": self.rank,
            "world": self.world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step"]
        self.wall_seconds = state.get("wall_seconds", 0.0)
        self.rater.load_state_dict(state["rater"])
        self.rater_opt.load_state_dict(state["rater_opt"])
        for member, ms in zip(self.members, state["members"], strict=True):
            member.load_state_dict(ms)
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])


def _checkpoint_path(out: Path, rank: int) -> Path:
    return out / (CHECKPOINT_FILE if rank == 0 else f"checkpoint-rank{rank}.pt")


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which, in one line
        raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}); "
                         "delete it (or pass --overwrite) to start over") from None


def saved_config(out: str | Path) -> TrainConfig | None:
    """The settings of the run in `out`, or None when it holds none to resume."""
    path = _checkpoint_path(Path(out), 0)
    return TrainConfig.from_dict(load_checkpoint(path)["config"]) if path.exists() else None


def remove_run(out: Path) -> None:
    """Delete what train_rater wrote into `out` (and nothing else), for existing="overwrite"."""
    import shutil

    for path in [*out.glob("checkpoint*.pt"), *(out / name for name in RUN_FILES)]:
        path.unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)


def _describe_differences(saved: TrainConfig, cfg: TrainConfig, keys: list[str]) -> str:
    return ", ".join(f"{k}={getattr(cfg, k)!r} (run: {getattr(saved, k)!r})" for k in keys)


class _ScalarLoggers:
    """The trackers asked for with `log_with` (TensorBoard), fed the rows that go to metrics.jsonl."""

    def __init__(self, log_with: str | list[str] | tuple[str, ...] | None, out: Path, resumed_from: int):
        names = [log_with] if isinstance(log_with, str) else list(log_with or ())
        names = [n for n in names if n and n != "none"]
        unknown = [n for n in names if n not in LOGGERS]
        if unknown:
            raise ValueError(f"--log-with: {', '.join(unknown)} is not one of {', '.join(LOGGERS)}")
        self.writer = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--log-with tensorboard needs the tensorboard package "
                                 "(pip install 'noiserater-trainer[tensorboard]')") from None
            # purge_step: steps logged after the checkpoint we resume from are dropped, as in metrics.jsonl
            self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=resumed_from + 1 if resumed_from
                                        else None)

    def log(self, step: int, row: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(f"stage1/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _provenance(cfg: TrainConfig, trainer: MetaTrainer) -> dict[str, Any]:
    return {
        "stage": "stage1-meta",
        "steps": trainer.step_count,
        "config": asdict(cfg),
        "world_size": trainer.world,
        "wall_seconds": round(trainer.wall_seconds, 3),
        "torch": str(torch.__version__),  # a plain str: rater.pt is read back with weights_only=True
        "python": platform.python_version(),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_quarter_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means of outer_loss_learned / outer_loss_uniform over the logged steps in the last quarter of the run
    (for a grad-norm run: of grad_norm_mse / grad_norm_corr; for a denoiser-error run: of val_loss)."""
    summary = _last_quarter_means(rows, {"last_quarter_learned": "outer_loss_learned",
                                         "last_quarter_uniform": "outer_loss_uniform"})
    if summary:
        summary["last_quarter_improvement"] = summary["last_quarter_uniform"] - summary["last_quarter_learned"]
        return summary
    return (_last_quarter_means(rows, {"last_quarter_grad_norm_mse": "grad_norm_mse",
                                       "last_quarter_grad_norm_corr": "grad_norm_corr"})
            or _last_quarter_means(rows, {"last_quarter_denoiser_val_loss": "val_loss"}))


def _last_quarter_means(rows: list[dict[str, Any]], names: dict[str, str]) -> dict[str, float]:
    """{summary name: mean of the metric over the logged steps in the last quarter} for `names` (summary name
    -> metric), from the rows that hold the first metric; {} when none does."""
    first = next(iter(names.values()))
    evaluated = [r for r in rows if first in r]
    if not evaluated:
        return {}
    last_step = max(r["step"] for r in evaluated)
    tail = [r for r in evaluated if r["step"] > 0.75 * last_step] or evaluated[-1:]
    return {**{name: sum(r[key] for r in tail) / len(tail) for name, key in names.items()},
            "last_quarter_points": len(tail)}


def plot_curves(out: str | Path) -> Path | None:
    rows = [r for r in read_metrics(out) if "outer_loss_learned" in r]
    if not rows:
        return _plot_grad_norm(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    diff = [r["outer_loss_uniform"] - r["outer_loss_learned"] for r in rows]
    k = max(1, len(diff) // 20)
    smooth = [sum(diff[max(0, i - k + 1):i + 1]) / len(diff[max(0, i - k + 1):i + 1]) for i in range(len(diff))]
    axes[0].plot(steps, diff, alpha=0.3, label="per log step")
    axes[0].plot(steps, smooth, label=f"moving mean ({k})")
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_title("held-out loss after one virtual step:\nuniform - learned (> 0: rater helps)")
    axes[0].legend()
    axes[1].plot(steps, [r["inner_loss"] for r in rows], label="inner (train) loss")
    axes[1].plot(steps, [r["outer_loss_uniform"] for r in rows], label="outer loss (w=1)")
    axes[1].set_title("population losses")
    axes[1].legend()
    if "weight_std" in rows[0]:
        axes[2].plot(steps, [r["weight_std"] for r in rows], label="weight std")
        axes[2].plot(steps, [r["weight_max"] for r in rows], label="weight max")
        axes[2].plot(steps, [r["weight_ess"] for r in rows], label="ESS / B")
        axes[2].set_title("weight spread")
    else:
        axes[0].set_title("held-out loss after the selected steps:\nuniform - learned (> 0: rater helps)")
        axes[2].plot(steps, [r.get("choice_entropy", float("nan")) for r in rows], label="entropy / log K")
        axes[2].set_title("selection entropy")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("meta step")
    fig.tight_layout()
    path = Path(out) / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_grad_norm(out: str | Path) -> Path | None:
    rows = [r for r in read_metrics(out) if "grad_norm_mse" in r]
    if not rows:
        return _plot_denoiser_error(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(steps, [r["grad_norm_mse"] for r in rows])
    axes[0].set_yscale("log")
    axes[0].set_title("squared error of score vs log per-sample grad norm")
    axes[1].plot(steps, [r.get("grad_norm_corr", float("nan")) for r in rows])
    axes[1].set_title("correlation of score and log grad norm")
    for ax in axes:
        ax.set_xlabel("meta step")
    fig.tight_layout()
    path = Path(out) / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_denoiser_error(out: str | Path) -> Path | None:
    rows = [r for r in read_metrics(out) if "val_loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["inner_loss"] for r in rows], label="train batch")
    ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], label="held-out batch")
    ax.set_title("the rater's denoiser: loss under Gaussian noise")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    path = Path(out) / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _dist_env(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if world > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_rater(cfg: TrainConfig, out: str | Path, progress: Callable[[int, int, dict[str, float]], None] | None = None,
                stop_after: int | None = None, *, existing: str = "check",
                log_with: str | list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run (or resume) stage 1 into `out`. Returns a summary. `stop_after` ends the call after that many meta
    steps of this call (for tests of resumption); the run's own length stays `cfg.steps`. `existing` says what
    to do with a run already in `out` (module docstring); `log_with="tensorboard"` also writes the metrics as
    TensorBoard scalars into `out`/tensorboard."""
    cfg.validate()
    if existing not in EXISTING_MODES:
        raise ValueError(f"existing must be one of {', '.join(EXISTING_MODES)}, got {existing!r}")
    out = Path(out)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    rank, world = _dist_env(device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if existing == "overwrite":
            remove_run(out)
    if world > 1:
        dist.barrier()
    ckpt_path = _checkpoint_path(out, rank)
    resumed_from = 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(state["config"])
        differ = saved.differences(cfg)
        if differ and existing == "check":
            raise ConfigMismatchError(
                f"{out} holds a run with other settings: {_describe_differences(saved, cfg, differ)}; pass "
                "--resume to continue it with its own settings or --overwrite to start again")
        if differ and rank == 0:
            log.info("resuming %s with its own settings; not applied: %s", out,
                     _describe_differences(saved, cfg, differ))
        for key in MAY_CHANGE_ON_RESUME:
            setattr(saved, key, getattr(cfg, key))
        cfg = saved
    data = load_dataset(cfg.dataset, seed=cfg.seed, key=cfg.data_key or None, value_range=cfg.data_range,
                        layout=cfg.data_layout)
    if rank == 0:
        warn_if_tiny(data, cfg.batch_size)
    trainer = MetaTrainer(cfg, data, device, rank, world)
    if ckpt_path.exists():
        trainer.load_state_dict(state)
        resumed_from = trainer.step_count
    metrics_path = out / METRICS_FILE
    if rank == 0:
        (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
        kept = [r for r in read_metrics(out) if r["step"] <= resumed_from]  # drop steps logged after the ckpt
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    trackers = _ScalarLoggers(log_with if rank == 0 else None, out, resumed_from)
    started = time.perf_counter()
    done_here = 0
    try:
        while trainer.step_count < cfg.steps and (stop_after is None or done_here < stop_after):
            step = trainer.step_count + 1
            evaluate = step % cfg.log_every == 0 or step == cfg.steps
            row = trainer.step(evaluate=evaluate)
            trainer.wall_seconds += row["seconds_per_step"]
            done_here += 1
            if rank == 0 and evaluate:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps({"step": step, **{k: round(v, 7) for k, v in row.items()}}) + "\n")
                trackers.log(step, row)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _atomic_save(trainer.state_dict(), ckpt_path)
            if progress is not None and rank == 0:
                progress(step, cfg.steps, row)
    finally:
        trackers.close()
    _atomic_save(trainer.state_dict(), ckpt_path)
    wall = time.perf_counter() - started
    summary: dict[str, Any] = {"out": str(out), "steps": trainer.step_count, "resumed_from": resumed_from,
                               "world_size": world, "device": str(device), "wall_seconds": round(wall, 2),
                               "train_seconds_total": round(trainer.wall_seconds, 2)}
    if rank == 0:
        rater_cpu = build_rater(trainer.rater_kind, data.data_shape, cfg.num_timesteps, **trainer.rater_kwargs)
        rater_cpu.load_state_dict({k: v.cpu() for k, v in trainer.rater.state_dict().items()})
        description = {"dataset": cfg.dataset, "schedule": cfg.schedule, "objective": cfg.objective,
                       "meta_objective": cfg.meta_objective, "rater_kwargs": trainer.rater_kwargs,
                       "provenance": _provenance(cfg, trainer)}
        save_rater(out / RATER_FILE, rater_cpu, trainer.rater_kind, **description)
        save_pretrained(out / PRETRAINED_DIR, rater_cpu, trainer.rater_kind, **description)
        plot_curves(out)
        summary.update(last_quarter_summary(read_metrics(out)))
        summary["rater"] = str(out / RATER_FILE)
        summary["rater_pretrained"] = str(out / PRETRAINED_DIR)
    if world > 1:
        dist.barrier()
    return summary


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["ConfigMismatchError", "TrainConfig", "MetaTrainer", "train_rater", "saved_config", "read_metrics",
           "last_quarter_summary", "plot_curves", "cleanup_distributed"]
