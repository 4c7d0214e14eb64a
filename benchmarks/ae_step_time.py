"""Training-step time of autoencoder variants against a base preset, interleaved in one process.

    python benchmarks/ae_step_time.py --preset shapes-demo --variant 'channel_mult=[2,2,2]' --batch 32

Each round runs one AdamW step (posterior sample, decode, L2) of every model on the same random batch, so a
shared, noisy machine slows all of them alike; the table gives the mean seconds per step (first round
dropped as warm-up) and the ratio to the base preset. One thread by default.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from latentdiff.models.autoencoder import PRESETS, AutoencoderKL


def parse_variant(text: str) -> dict:
    """'key=JSON;key=JSON' -> AutoencoderConfig overrides (lists become tuples)."""
    out = {}
    for item in filter(None, text.split(";")):
        key, value = item.split("=", 1)
        v = json.loads(value)
        out[key.strip()] = tuple(v) if isinstance(v, list) else v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="shapes-demo")
    ap.add_argument("--variant", action="append", default=[], help="'key=JSON;key=JSON' config overrides")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = PRESETS[args.preset]
    configs = {args.preset: base, **{v: replace(base, **parse_variant(v)) for v in args.variant}}
    models = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        ae = AutoencoderKL(cfg)
        models[name] = (ae, torch.optim.AdamW(ae.parameters(), 1e-3))
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1

    def step(ae, opt):
        p = ae.encode_posterior(x)
        loss = (ae.decode_raw(p.mean + p.std * torch.randn_like(p.std)) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    total = dict.fromkeys(models, 0.0)
    for r in range(args.rounds):
        for name, (ae, opt) in models.items():
            t = time.perf_counter()
            step(ae, opt)
            if r:
                total[name] += time.perf_counter() - t
    print("| autoencoder | params | s / step | vs base |\n|---|---|---|---|")
    for name, (ae, _) in models.items():
        n = sum(p.numel() for p in ae.parameters()) / 1e6
        print(f"| {name} | {n:.2f}M | {total[name] / (args.rounds - 1):.3f} | {total[name] / total[args.preset]:.2f}x |")


if __name__ == "__main__":
    main()
