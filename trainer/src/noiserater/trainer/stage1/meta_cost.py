"""What one meta step costs next to one plain training step (same batch, same model, same thread count).

    python -m noiserater.trainer.stage1.meta_cost [--dataset digits] [--repeats 200] [--threads 1]
        [--objective eps|flow] [--few-step]

Plain step: per-sample loss, mean, backward, Adam step. Meta step (per inner model): the rater's scores and
soft weights, the meta-gradient by the chosen route into the rater (for "fast": weighted forward/backward,
held-out forward/backward, two forwards for the directional derivative, the rater's backward), then the real
Adam step that reuses the weighted gradient. Also timed: the rater scoring K = 8 candidates for every item of
the batch (stage 2's selection cost). With --few-step also timed: one through-selection step (K candidates,
H differentiable Adam steps, the rater's backward), one through-assignment step (the same over the batch's
B x B assignment) and one grad-norm step (per-sample gradient norms, the rater's regression, the Adam
step). The kinds of step are interleaved and the medians compared, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from noiserater.trainer.stage1.meta import adam_preconditioner, meta_gradient
from noiserater.trainer.stage1.rater import build_rater, default_rater_kind
from noiserater.trainer.stage1.train import TrainConfig
from noiserater.trainer.substrate.data import load_dataset
from noiserater.trainer.substrate.denoisers import build_denoiser
from noiserater.trainer.substrate.diffusion import make_schedule, per_sample_loss


def measure(dataset: str = "digits", repeats: int = 200, routes: tuple[str, ...] = ("fast", "exact"),
            cfg: TrainConfig | None = None, few_step: bool = False) -> dict[str, float]:
    cfg = cfg or TrainConfig(dataset=dataset)
    data = load_dataset(dataset)
    schedule = make_schedule(cfg.num_timesteps, cfg.schedule, cfg.objective)
    torch.manual_seed(0)
    model = build_denoiser(data.data_shape, cfg.denoiser, num_timesteps=cfg.num_timesteps, **cfg.denoiser_kwargs)
    rater = build_rater(default_rater_kind(data.data_shape), data.data_shape, cfg.num_timesteps, **cfg.rater_kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.inner_lr)
    rater_opt = torch.optim.Adam(rater.parameters(), lr=cfg.rater_lr)
    gen = torch.Generator().manual_seed(0)

    def draw(source: torch.Tensor, size: int):
        x0 = source[torch.randint(0, len(source), (size,), generator=gen)]
        return x0, schedule.sample_timesteps(size, generator=gen), torch.randn(x0.shape, generator=gen)

    batch, val = draw(data.train, cfg.batch_size), draw(data.val, cfg.val_batch_size)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        per_sample_loss(model, schedule, *batch).mean().backward()
        opt.step()

    def meta(route: str) -> None:
        rater_opt.zero_grad(set_to_none=True)
        params = {k: v.detach() for k, v in model.named_parameters()}
        precond = adam_preconditioner(opt, params, lambda: dict(model.named_parameters()))
        step = meta_gradient(route, model, schedule, params, precond, cfg.virtual_lr, rater, [batch], val,
                             tau=cfg.tau, fd_eps=cfg.fd_eps)
        rater_opt.step()
        for name, p in model.named_parameters():
            p.grad = step.grad_theta0[name]
        opt.step()

    k = 8
    candidates = (batch[0].repeat_interleave(k, 0), batch[1].repeat_interleave(k, 0),
                  torch.randn((cfg.batch_size * k, *data.data_shape), generator=gen))

    def score_k() -> None:
        with torch.no_grad():
            rater(*candidates)

    plain()  # Adam state exists from here on
    runs: dict[str, list[float]] = {"plain": [], "score_k8": [], **{r: [] for r in routes}}
    jobs = [("plain", plain), ("score_k8", score_k)] + [(r, lambda r=r: meta(r)) for r in routes]
    if few_step:
        jobs += _few_step_jobs(cfg, data, schedule, model, opt, rater, rater_opt, gen, batch, val)
        runs.update({name: [] for name, _ in jobs if name not in runs})
    for _ in range(5):
        for _, fn in jobs:
            fn()
    for _ in range(repeats):
        for name, fn in jobs:
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in runs.items()}
    out = {f"{name}_ms": 1e3 * v for name, v in med.items()}
    out["score_k8_over_plain"] = med["score_k8"] / med["plain"]  # rating K=8 candidates per item of the batch
    for route in [*routes, *(("through_selection", "through_assignment", "grad_norm") if few_step else ())]:
        out[f"{route}_over_plain"] = med[route] / med["plain"]
    out.update({"batch_size": cfg.batch_size, "val_batch_size": cfg.val_batch_size, "repeats": repeats,
                "threads": torch.get_num_threads(), "dataset": dataset})
    return out


def _few_step_jobs(cfg, data, schedule, model, opt, rater, rater_opt, gen, batch, val):
    from noiserater.trainer.stage1.grad_norm import grad_norm_regression
    from noiserater.trainer.stage1.through_selection import AdamState, through_selection_gradient

    k, horizon = cfg.selection_candidates, cfg.selection_horizon

    def grouped():
        x0 = data.train[torch.randint(0, len(data.train), (cfg.batch_size,), generator=gen)].repeat_interleave(k, 0)
        t = schedule.sample_timesteps(cfg.batch_size, generator=gen).repeat_interleave(k)
        return x0, t, torch.randn(x0.shape, generator=gen)

    selection_batches = [grouped() for _ in range(horizon)]
    assignment_batches = [tuple(part[::k] for part in b) for b in selection_batches]
    named = dict(model.named_parameters())

    def through(batches, width, assign) -> None:
        rater_opt.zero_grad(set_to_none=True)
        adam = AdamState.read(opt, named)
        result = through_selection_gradient(model, schedule, {n: p.detach() for n, p in named.items()}, adam, rater,
                                            batches, val, width, cfg.tau, gen, assign=assign)
        rater_opt.step()
        result.adam.write(opt, named, result.theta)

    def grad_norm() -> None:
        rater_opt.zero_grad(set_to_none=True)
        step = grad_norm_regression(model, schedule, {n: p.detach() for n, p in named.items()}, rater, batch)
        rater_opt.step()
        for name, p in named.items():
            p.grad = step.mean_grad[name]
        opt.step()

    return [("through_selection", lambda: through(selection_batches, k, False)),
            ("through_assignment", lambda: through(assignment_batches, 1, True)), ("grad_norm", grad_norm)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--objective", default="eps", choices=("eps", "flow"))
    parser.add_argument("--few-step", action="store_true", help="also time the through-selection and grad-norm "
                        "meta-objectives' steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(dataset=args.dataset, objective=args.objective)
    print(json.dumps(measure(args.dataset, args.repeats, cfg=cfg, few_step=args.few_step), indent=2))


if __name__ == "__main__":
    main()
