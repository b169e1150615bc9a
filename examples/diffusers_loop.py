"""A diffusers training loop (UNet2DModel + DDPMScheduler.add_noise) whose noise comes from a NoiseSelector.

The one-line change against a stock diffusers loop is marked below: `torch.randn_like(x0)` becomes
`selector.select(x0, t)`. Everything else is the usual loop.

    pip install -e 'trainer[diffusers]'                                 # diffusers is an optional extra
    nrctl train-rater --dataset digits-image --out runs/digits-image    # an image rater (1x8x8)
    nrctl export runs/digits-image --out digits-image.onnx
    python examples/diffusers_loop.py --rater digits-image.onnx --steps 200
    # or score on a rater server:  --server localhost:50051 --model digits-image
    # (several servers, balanced with gRPC's round_robin: --server host1:50051,host2:50051)
"""

from __future__ import annotations

import argparse

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


def train(selector, steps: int = 200, batch_size: int = 64, lr: float = 2e-4, seed: int = 0,
          num_train_timesteps: int = 1000, log_every: int = 50) -> list[float]:
    """Train a small UNet2DModel on 8x8 digits with noise chosen by `selector`; returns the losses."""
    from diffusers import DDPMScheduler

    from noiserater.trainer.substrate.data import load_dataset

    torch.manual_seed(seed)
    data = load_dataset("digits-image").train  # [N, 1, 8, 8] in [-1, 1]
    unet = build_unet(sample_size=data.shape[-1], channels=data.shape[1])
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        x0 = data[torch.randint(0, data.shape[0], (batch_size,), generator=gen)]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = selector.select(x0, t)  # <- was: noise = torch.randn_like(x0)
        x_t = scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            stats = selector.last_stats
            print(f"step {step + 1}: loss {loss.item():.4f}  selected noise ||eps||^2/d "
                  f"{stats['sq_norm_per_dim']:.3f}, cos(eps, x0) {stats['cosine_with_x0']:+.3f}")
    return losses


def main() -> None:
    from noiserater.trainer import NoiseSelector

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rater", help="exported image rater (MODEL.onnx) for in-process scoring")
    parser.add_argument("--server", help="rater server host:port (remote scoring)")
    parser.add_argument("--model", default="digits-image", help="model name on the server")
    parser.add_argument("--num-candidates", "--k", type=int, default=8, help="candidates K per sample")
    parser.add_argument("--rule", default="assign", choices=("argmax", "sample", "assign"))
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if args.server:
        # Raises SelectorError here if the server has no such model, refuses the token, or its model does not
        # take this loop's 1x8x8 images and 1000 timesteps; a server that is down is no error: selections use
        # the fallback (--rater, else plain Gaussian noise) until it serves.
        selector = NoiseSelector.remote(args.server, model=args.model, dataset="digits-image",
                                        num_candidates=args.num_candidates, rule=args.rule, fallback_onnx=args.rater,
                                        data_shape=(1, 8, 8), num_timesteps=1000)
    elif args.rater:
        selector = NoiseSelector.local(args.rater, num_candidates=args.num_candidates, rule=args.rule)
    else:
        parser.error("give --rater MODEL.onnx or --server HOST:PORT")
    with selector:
        train(selector, steps=args.steps)
        print("selector counters:", selector.counters)  # fallbacks, and for a server its breaker


if __name__ == "__main__":
    main()
