"""Time per denoiser step and per image for generation, fp32 vs bf16, at 64x64 and 256x256; peak memory.

Uses the demo's architecture (shapes-f4c4 autoencoder, shapes-tiny U-Net, hashed text encoder) with
random weights: speed does not depend on what the weights learned. Pass --model DIR to time a trained
model folder instead. bf16 runs as ``Pipeline.generate`` does it (autocast, channels-last convolutions on the
CPU); ``--bf16-nchw`` times bf16 with contiguous weights instead (the path before channels-last).

    python benchmarks/generate.py [--model DIR] [--steps 20] [--sizes 64 256] [--batch 1] [--bf16-nchw]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import sys
import time

import torch

import latentdiff.models.runtime
from latentdiff.components import DenoiserSpec, build_denoiser
from latentdiff.conditioning.text import HashedTextEncoder, TextEncoderConfig
from latentdiff.models.autoencoder import PRESETS as AE_PRESETS
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.unet import PRESETS as UNET_PRESETS
from latentdiff.pipeline import Pipeline, load


def random_pipeline() -> Pipeline:
    torch.manual_seed(0)
    te = HashedTextEncoder(TextEncoderConfig())
    ae = AutoencoderKL(AE_PRESETS["shapes-f4c4"])
    unet = dataclasses.replace(UNET_PRESETS["shapes-tiny"], in_channels=ae.latent_channels,
                               out_channels=ae.latent_channels, context_dim=te.dim)
    return Pipeline(ae, build_denoiser(DenoiserSpec(unet=unet)), te)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16-nchw", action="store_true", help="bf16 with contiguous (NCHW) convolution weights")
    args = ap.parse_args()
    if args.bf16_nchw:  # the layout switch is the only change: autocast stays
        latentdiff.models.runtime.low_precision_layout = lambda *a: contextlib.nullcontext()
    pipe = load(args.model) if args.model else random_pipeline()
    prompts = ["a large red circle on the left"] * args.batch
    calls = []
    network = pipe.denoiser.network
    original_forward = network.forward

    def counting_forward(*a, **k):
        t = time.perf_counter()
        out = original_forward(*a, **k)
        calls.append(time.perf_counter() - t)
        return out

    network.forward = counting_forward
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.steps} steps dpmpp_2m with CFG (one network call of batch {2 * args.batch} per step)")
    print(f"{'size':>6} {'precision':>9} {'ms/step':>9} {'s/image':>9} {'decode ms':>10} {'peak RSS MiB':>13}")
    for size in args.sizes:
        for precision in ("fp32", "bf16"):
            pipe.precision = precision
            pipe.generate(prompts, steps=2, height=size, width=size)  # warm-up
            best_total, best_step = float("inf"), float("inf")
            for _ in range(args.repeats):
                calls.clear()
                t = time.perf_counter()
                z = pipe.generate(prompts, steps=args.steps, height=size, width=size, output="latent")
                sample_s = time.perf_counter() - t
                t = time.perf_counter()
                with torch.no_grad():
                    pipe.autoencoder.decode(z)
                decode_s = time.perf_counter() - t
                best_step = min(best_step, sum(calls) / len(calls))
                best_total = min(best_total, sample_s + decode_s)
            label = "bf16-nchw" if precision == "bf16" and args.bf16_nchw else precision
            print(f"{size:>6} {label:>9} {best_step * 1e3:>9.1f} {best_total / args.batch:>9.3f} "
                  f"{decode_s * 1e3:>10.1f} {peak_rss_mib():>13.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
