"""Training-step time of the demo's networks with contiguous (NCHW) and channels-last (NHWC) convolutions.

    python benchmarks/channels_last.py [--threads 2] [--rounds 4]

Both layouts train side by side in one process, alternating, from the same initial weights and batch, so
the machine's load hits them alike; the table gives seconds per step (forward, backward, AdamW) and the
ratio. The first-step losses are printed to show that the layouts compute the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from latentdiff.models.autoencoder import PRESETS as AE_PRESETS
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.unet import PRESETS as UNET_PRESETS
from latentdiff.models.unet import UNet
from latentdiff.types import Cond


def unet_case(batch: int):
    """The demo's U-Net on 8x8x8 latents with 16 text tokens of 128 dims."""
    cfg = dataclasses.replace(UNET_PRESETS["shapes-demo"], in_channels=8, out_channels=8, context_dim=128)
    x, t, ctx = torch.randn(batch, 8, 8, 8), torch.rand(batch), torch.randn(batch, 16, 128)
    return (lambda: UNet(cfg)), (lambda m: (m(x, t, Cond(context=ctx)) - x).pow(2).mean())


def autoencoder_case(batch: int):
    """The demo's autoencoder on 32x32 images, reconstructing from a fixed posterior sample."""
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    return (lambda: AutoencoderKL(AE_PRESETS["shapes-demo"])), \
        (lambda m: (m(x, torch.Generator().manual_seed(0))[0] - x).pow(2).mean())


def time_layouts(build, loss_of, rounds: int) -> dict:
    runs = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model = build()
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        runs[layout] = (model, torch.optim.AdamW(model.parameters(), 1e-3))

    def step(layout: str) -> float:
        model, opt = runs[layout]
        loss = loss_of(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    first = {layout: step(layout) for layout in runs}  # also the warm-up
    seconds = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for layout in runs:
            t0 = time.perf_counter()
            step(layout)
            seconds[layout] += time.perf_counter() - t0
    return {"first_loss": first, "s_per_step": {k: v / rounds for k, v in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} alternating rounds")
    print("| network (batch) | NCHW s/step | NHWC s/step | speed-up | first loss NCHW / NHWC |")
    print("|---|---|---|---|---|")
    for name, (build, loss_of) in {"shapes-demo U-Net (128)": unet_case(128),
                                   "shapes-demo autoencoder (32)": autoencoder_case(32)}.items():
        r = time_layouts(build, loss_of, args.rounds)
        a, b = r["s_per_step"]["contiguous"], r["s_per_step"]["channels_last"]
        la, lb = r["first_loss"]["contiguous"], r["first_loss"]["channels_last"]
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {la:.6f} / {lb:.6f} |")


if __name__ == "__main__":
    main()
