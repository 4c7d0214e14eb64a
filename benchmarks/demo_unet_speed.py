"""Training throughput of small U-Net variants on the demo's 8x8x8 latents (images per second, one table).

    python benchmarks/demo_unet_speed.py [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from latentdiff.models.unet import PRESETS, UNet
from latentdiff.types import Cond

VARIANTS = {
    "shapes-tiny": ("shapes-tiny", {}),
    "shapes-demo (no 8x8 self-attention)": ("shapes-demo", {}),
    "shapes-tiny, head_dim 48": ("shapes-tiny", {"head_dim": 48}),
    "shapes-tiny, model_channels 32": ("shapes-tiny", {"model_channels": 32, "head_dim": 32}),
    "shapes-tiny, model_channels 64": ("shapes-tiny", {"model_channels": 64, "head_dim": 32}),
    "shapes-tiny, 2 res blocks": ("shapes-tiny", {"num_res_blocks": 2}),
}


def images_per_second(preset: str, changes: dict, batch: int, steps: int = 8) -> tuple[float, float]:
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS[preset], in_channels=8, out_channels=8, context_dim=128, vector_dim=128,
                              **changes)
    net = UNet(cfg)
    x, t = torch.randn(batch, 8, 8, 8), torch.rand(batch) * 999
    cond = Cond(context=torch.randn(batch, 12, 128), vector=torch.randn(batch, 128))
    opt = torch.optim.AdamW(net.parameters())

    def step():
        net(x, t, cond).square().mean().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start), sum(p.numel() for p in net.parameters()) / 1e6


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| U-Net (batch {args.batch}, {args.threads} threads) | M params | train images/s |\n|---|---|---|")
    for name, (preset, changes) in VARIANTS.items():
        rate, params = images_per_second(preset, changes, args.batch)
        print(f"| {name} | {params:.2f} | {rate:.0f} |", flush=True)
