"""A diffusers training loop whose noise comes from a NoiseSelector, for either objective:

- eps: UNet2DModel + DDPMScheduler.add_noise, the UNet predicts the noise;
- flow: UNet2DModel + FlowMatchEulerDiscreteScheduler's sigmas, x_t = (1 - sigma) x0 + sigma * noise (what its
  `scale_noise` computes), the UNet predicts the velocity noise - x0 (the SD3 / Flux training recipe).

The one-line change against a stock diffusers loop is marked below: `torch.randn_like(x0)` becomes
`selector.select(x0, t)`. Everything else is the usual loop, plus `check_rater`, which stops before the first
step when the rater's data shape, timesteps, objective or noise schedule do not fit the UNet and the scheduler.

The rater's timestep t is an integer in [0, T). For eps it is the DDPM timestep itself. For flow the rater
was trained with noise level s = (t + 1) / T, and FlowMatchEulerDiscreteScheduler's sigmas are noise levels
of the same interpolant, so a sigma maps to t = round(sigma * T) - 1 (`rater_timesteps`); its own timesteps,
sigma * T, are what the UNet is conditioned on. With the scheduler's defaults (shift 1) the sigmas are
exactly 1/T, 2/T, ..., 1 and the map is exact; a shifted scheduler samples other sigmas, each mapped to the
nearest of the rater's levels.

    pip install -e 'trainer[diffusers]'                                 # diffusers is an optional extra
    nrctl train-rater --dataset digits-image --out runs/digits-image    # an image rater (1x8x8)
    nrctl export runs/digits-image --out digits-image.onnx
    python examples/diffusers_loop.py --rater digits-image.onnx --steps 200   # --log-every 10 --rule argmax
    # flow matching: a rater trained for it, and --objective flow
    nrctl train-rater --dataset digits-image --objective flow --out runs/digits-image-flow
    nrctl export runs/digits-image-flow --out digits-image-flow.onnx
    python examples/diffusers_loop.py --rater digits-image-flow.onnx --objective flow --steps 200
    # or score on a rater server:  --server localhost:50051 --model digits-image
    # (several servers, balanced with gRPC's round_robin: --server host1:50051,host2:50051)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def build_unet(sample_size: int = 8, channels: int = 1):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


# The diffusers beta schedule that gives each rater schedule's alphas_cumprod (at T = 1000, default betas).
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


class SetupError(ValueError):
    """The rater does not fit this loop's UNet or scheduler; the message says how."""


def _shape(data_shape) -> str:
    return "x".join(str(d) for d in data_shape)


def scheduler_objective(scheduler) -> str:
    """"flow" for diffusers' flow-matching schedulers, "eps" for the others (DDPMScheduler and its kin)."""
    return "flow" if type(scheduler).__name__.startswith("FlowMatch") else "eps"


def build_scheduler(objective: str = "eps", num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
    """DDPMScheduler for eps, FlowMatchEulerDiscreteScheduler (shift 1) for flow."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps)
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)


def rater_timesteps(sigmas: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """The rater's integer timesteps of flow-matching noise levels: sigma = s = (t + 1) / T, so
    t = round(sigma * T) - 1, kept in [0, T)."""
    return (sigmas.to(torch.float64) * num_timesteps).round().long().sub(1).clamp(0, num_timesteps - 1)


def check_rater(selector, unet, scheduler) -> None:
    """Before the first step: the rater must score what the UNet sees, with the scheduler's timesteps, objective
    and noise schedule. Raises SetupError with a plain message; says so when there is nothing to check against
    (a peer, or a rater server not reached yet with no fallback rater)."""
    from noiserater.trainer.substrate.diffusion import SCHEDULE_KINDS, NoiseSchedule

    info = selector.info
    if info is None:
        print("note: the rater's metadata is not known yet (no server reached, no --rater fallback); the "
              "selector checks it when the server answers")
        return
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    unet_shape = (unet.config.in_channels, *size)
    if tuple(info.data_shape) != unet_shape:
        raise SetupError(f"the rater scores {_shape(info.data_shape)} samples but the UNet takes {_shape(unet_shape)} "
                         f"(in_channels={unet.config.in_channels}, sample_size={unet.config.sample_size}); use a "
                         f"rater trained on this data (nrctl train-rater --dataset ...) or a UNet of its shape")
    steps = scheduler.config.num_train_timesteps
    if info.num_timesteps != steps:
        raise SetupError(f"the rater was trained for {info.num_timesteps} timesteps but the scheduler has "
                         f"num_train_timesteps={steps}; build the scheduler with num_train_timesteps="
                         f"{info.num_timesteps} or train a rater for {steps}")
    objective = scheduler_objective(scheduler)
    if info.objective != objective:
        wanted = "FlowMatchEulerDiscreteScheduler" if info.objective == "flow" else "DDPMScheduler"
        raise SetupError(f"the rater was trained for the {info.objective} objective but {type(scheduler).__name__} "
                         f"trains for {objective}; use {wanted} (--objective {info.objective}) or a rater trained "
                         f"with nrctl train-rater --objective {objective}")
    if objective == "flow":
        return  # one interpolant: x_t = (1 - sigma) x0 + sigma eps, whatever sigmas the scheduler samples
    if info.schedule not in SCHEDULE_KINDS:
        print(f"note: the rater does not name a known noise schedule ({info.schedule!r}); the scheduler's "
              f"beta schedule ({scheduler.config.beta_schedule}) is not checked")
        return
    rater_abar = NoiseSchedule(info.num_timesteps, info.schedule).alphas_cumprod
    gap = float((scheduler.alphas_cumprod.to(torch.float64) - rater_abar.to(torch.float64)).abs().max())
    if gap > 1e-3:
        raise SetupError(f"the rater was trained with the {info.schedule} noise schedule but the scheduler's "
                         f"(beta_schedule={scheduler.config.beta_schedule!r}, beta_start="
                         f"{scheduler.config.beta_start}, beta_end={scheduler.config.beta_end}) differs: its "
                         f"alphas_cumprod are up to {gap:.3f} away from the rater's; use "
                         f"DDPMScheduler(beta_schedule={DIFFUSERS_SCHEDULE[info.schedule]!r}) with its default "
                         f"betas, or a rater trained with the scheduler's schedule")


def train(selector, steps: int = 200, batch_size: int = 64, lr: float = 2e-4, seed: int = 0,
          num_train_timesteps: int = 1000, log_every: int = 10, beta_schedule: str = "linear",
          objective: str = "eps") -> list[float]:
    """Train a small UNet2DModel on 8x8 digits with noise chosen by `selector`, for `objective` ("eps":
    DDPMScheduler, "flow": FlowMatchEulerDiscreteScheduler); returns the losses. Prints a line every
    `log_every` steps (0: none)."""
    from noiserater.trainer.substrate.data import load_dataset

    torch.manual_seed(seed)  # also the selector's noise, unless it was given its own seed or generator
    data = load_dataset("digits-image").train  # [N, 1, 8, 8] in [-1, 1]
    unet = build_unet(sample_size=data.shape[-1], channels=data.shape[1])
    scheduler = build_scheduler(objective, num_train_timesteps, beta_schedule)
    check_rater(selector, unet, scheduler)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    if log_every:
        rule = "argmax" if selector.rule.value == "top_k" else selector.rule.value
        print(f"training {steps} steps, batch {batch_size}, rule {rule}, "
              f"{selector.num_candidates} candidates per sample, objective {objective}", flush=True)
    start = time.perf_counter()
    select_s = 0.0
    for step in range(steps):
        x0 = data[torch.randint(0, data.shape[0], (batch_size,), generator=gen)]
        index = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        if objective == "flow":
            sigma = scheduler.sigmas[index]  # noise level s of x_t = (1 - s) x0 + s eps
            t = rater_timesteps(sigma, scheduler.config.num_train_timesteps)
        else:
            t = index
        began = time.perf_counter()
        noise = selector.select(x0, t)  # <- was: noise = torch.randn_like(x0)
        select_s += time.perf_counter() - began
        if objective == "flow":
            s = sigma.view(-1, 1, 1, 1)
            x_t = (1 - s) * x0 + s * noise  # = scheduler.scale_noise(x0, timesteps, noise)
            loss = F.mse_loss(unet(x_t, scheduler.timesteps[index]).sample, noise - x0)
        else:
            x_t = scheduler.add_noise(x0, noise, t)
            loss = F.mse_loss(unet(x_t, t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            stats = selector.last_stats
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}  {1000 * elapsed / (step + 1):.0f} ms/step "
                  f"({1000 * select_s / (step + 1):.0f} ms selecting)  selected noise ||eps||^2/d "
                  f"{stats['sq_norm_per_dim']:.3f}, cos(eps, x0) {stats['cosine_with_x0']:+.3f}", flush=True)
    return losses


def main() -> None:
    from noiserater.client.selector import SelectorError
    from noiserater.trainer import NoiseSelector

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rater", help="exported image rater (MODEL.onnx) for in-process scoring")
    parser.add_argument("--server", help="rater server host:port (remote scoring)")
    parser.add_argument("--model", default="digits-image", help="model name on the server")
    parser.add_argument("--num-candidates", "--k", type=int, default=8, help="candidates K per sample")
    parser.add_argument("--rule", default="argmax", choices=("argmax", "sample", "assign"),
                        help="which candidate to keep (default argmax; assign permutes the batch's noise and "
                             "costs more per step)")
    parser.add_argument("--objective", default="eps", choices=("eps", "flow"),
                        help="eps: DDPMScheduler, the UNet predicts the noise; flow: FlowMatchEulerDiscreteScheduler, "
                             "the UNet predicts the velocity (the rater must have been trained for the same one)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps (0: none)")
    args = parser.parse_args()

    try:
        if args.server:
            # Raises SelectorError here if the server has no such model, refuses the token, or its model does not
            # take this loop's 1x8x8 images, 1000 timesteps and objective; a server that is down is no error:
            # selections use the fallback (--rater, else plain Gaussian noise) until it serves.
            selector = NoiseSelector.remote(args.server, model=args.model, dataset="digits-image",
                                            num_candidates=args.num_candidates, rule=args.rule,
                                            fallback_onnx=args.rater, data_shape=(1, 8, 8), num_timesteps=1000,
                                            objective=args.objective)
        elif args.rater:
            selector = NoiseSelector.local(args.rater, num_candidates=args.num_candidates, rule=args.rule,
                                           objective=args.objective)
        else:
            parser.error("give --rater MODEL.onnx or --server HOST:PORT")
    except SelectorError as exc:  # e.g. a rater trained for the other objective
        raise SystemExit(f"error: {exc}") from None
    with selector:
        try:
            train(selector, steps=args.steps, batch_size=args.batch_size, log_every=args.log_every,
                  objective=args.objective)
        except SetupError as exc:
            raise SystemExit(f"error: {exc}") from None
        print("selector counters:", selector.counters)  # fallbacks, and for a server its breaker


if __name__ == "__main__":
    main()
