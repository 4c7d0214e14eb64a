"""Where bf16's distance to fp32 comes from, and what keeping parts of the graph in fp32 costs and buys.

    python benchmarks/bf16_distance.py [--prompts 8] [--steps 10] [--guidance 5] [--threads 2]
        [--sd-size 128] [--sd-repeats 3] [--skip-default] [--skip-sd]

Default model (trained): images of ``--prompts`` held-out prompts (seed 2, DPM++ 2M, CFG) under each variant, against
the torch fp32 images: the largest pixel difference (of 255), its 99.9th percentile and mean, and the relative
difference of one denoiser call (raw output, CFG batch of 2, at the grid's middle sigma). Variants: torch bf16
autocast; OpenVINO fp32; OpenVINO's bf16 hint for denoiser and decoder, for one of them only, and with parts of the
denoiser kept in fp32 (``backends/openvino.KEEP_FP32``: norm = GroupNorm / LayerNorm, attention = the SDPA node
(its softmax), time = the sinusoidal embedding of the noise level, time-mlp = also its MLP and projections).
SD-shaped U-Net (SD 1.5's config, diffusers' random init, ``--sd-size`` px, batch 2, 77 tokens): one call's relative
difference to fp32 for diffusers in bf16 (torch autocast, and bf16 weights) and ours in OpenVINO bf16 with each
kept part, and seconds per call (best of ``--sd-repeats``).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from cpu_backends import DIFFUSERS_CONFIGS, our_config

PARTS = ((), ("time",), ("time-mlp",), ("norm",), ("attention",), ("norm", "time"), ("attention", "norm", "time"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def default_rows(args, cache: str) -> None:
    from latentdiff.backends.openvino import OpenVINOCoder, OpenVINONetwork, with_child
    from latentdiff.data.shapes import heldout_prompts
    from latentdiff.diffusion.denoiser import Denoiser
    from latentdiff.pipeline import Pipeline, load
    from latentdiff.types import Cond

    pipe = load()
    prompts = [p for p, _ in heldout_prompts(args.prompts, seed=0)]
    opts = {"steps": args.steps, "guidance": args.guidance, "seed": 2, "output": "np"}
    net = pipe.denoiser.network
    g = torch.Generator().manual_seed(0)
    sigmas = pipe._sigmas(pipe.settings(steps=args.steps))
    sigma = sigmas[len(sigmas) // 2]
    x = torch.randn(2, net.config.in_channels, 8, 8, generator=g) * sigma
    cond = Cond(context=torch.randn(2, 16, net.config.context_dim, generator=g),
                vector=torch.randn(2, net.config.vector_dim, generator=g))
    c_noise = pipe.denoiser.parameterization.scalings(sigma.expand(2))[3]

    def variant(den_precision, dec_precision, keep=()):
        network = OpenVINONetwork(net, precision=den_precision, cache_dir=cache, keep_fp32=keep)
        ae = with_child(pipe.autoencoder, "decoder", OpenVINOCoder(pipe.autoencoder.decoder, "decoder",
                                                                   precision=dec_precision, cache_dir=cache))
        return Pipeline(ae, Denoiser(network, pipe.denoiser.parameterization), pipe.text_encoder, pipe.index), network

    with torch.no_grad():
        ref_images, ref_out = pipe.generate(prompts, **opts).astype(int), net(x, c_noise, cond)
        rows = [("torch bf16 (autocast)", None, None, ())]
        rows += [("openvino fp32", "fp32", "fp32", ()), ("openvino bf16 (denoiser + decoder)", "bf16", "bf16", ()),
                 ("openvino bf16 denoiser, fp32 decoder", "bf16", "fp32", ()),
                 ("openvino fp32 denoiser, bf16 decoder", "fp32", "bf16", ())]
        rows += [(f"openvino bf16, fp32 {'+'.join(k)}", "bf16", "bf16", k) for k in PARTS[1:]]
        print(f"\nbundled default model: {args.prompts} held-out prompts, DPM++ 2M {args.steps} steps, CFG "
              f"{args.guidance:g}; pixel differences to torch fp32 (of 255)\n")
        print("| variant | max | 99.9th pct | mean | one call rel. diff |\n|---|---|---|---|---|")
        for name, den, dec, keep in rows:
            if den is None:
                pipe.precision = "bf16"
                images = pipe.generate(prompts, **opts).astype(int)
                from latentdiff.models.runtime import autocast

                with autocast("bf16", x.device, net):
                    out = net(x, c_noise, cond)
                pipe.precision = "fp32"
            else:
                p, network = variant(den, dec, keep)
                images, out = p.generate(prompts, **opts).astype(int), network(x, c_noise, cond)
            d = np.abs(images - ref_images)
            print(f"| {name} | {d.max()} | {np.percentile(d, 99.9):.0f} | {d.mean():.2f} | {rel(out, ref_out):.5f} |",
                  flush=True)


def sd_rows(args, cache: str) -> None:
    import diffusers

    from latentdiff.backends.openvino import OpenVINONetwork
    from latentdiff.models.unet import UNet
    from latentdiff.types import Cond

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**DIFFUSERS_CONFIGS["sd15"]).eval()
    g = torch.Generator().manual_seed(0)
    latent = args.sd_size // 8
    x, t = torch.randn(2, 4, latent, latent, generator=g), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, generator=g)

    def timed(fn):
        out = fn()
        best = min(_seconds(fn) for _ in range(args.sd_repeats))
        return out, best

    with torch.no_grad():
        want, t32 = timed(lambda: ref(x, t, ctx).sample)
        print(f"\nSD-1.5-shaped U-Net (diffusers' random init), {args.sd_size} px, one call at batch 2: relative "
              f"difference to diffusers fp32 ({t32:.2f} s)\n")
        print("| variant | rel. diff | s / call |\n|---|---|---|")
        with torch.autocast("cpu", torch.bfloat16):
            out, s = timed(lambda: ref(x, t, ctx).sample)
        print(f"| diffusers bf16 autocast | {rel(out, want):.4f} | {s:.2f} |", flush=True)
        ref.to(torch.bfloat16).to(memory_format=torch.channels_last)
        out, s = timed(lambda: ref(x.bfloat16(), t, ctx.bfloat16()).sample)
        print(f"| diffusers bf16 weights | {rel(out, want):.4f} | {s:.2f} |", flush=True)
        ref.float().to(memory_format=torch.contiguous_format)
        with torch.device("meta"):
            net = UNet(our_config("sd15")).eval()
        net.load_state_dict(ref.state_dict(), strict=True, assign=True)
        cond = Cond(context=ctx)
        variants = (("fp32",), *PARTS) if not args.sd_parts else \
            [tuple(p.split("+")) if p != "none" else () for p in args.sd_parts]
        runs = {}
        for keep in variants:  # compiled first, then timed round-robin: every variant sees the same load
            network = OpenVINONetwork(net, precision="fp32" if keep == ("fp32",) else "bf16", cache_dir=cache,
                                      keep_fp32=() if keep == ("fp32",) else keep)
            runs[keep] = (network, network(x, t, cond), [])
        for _ in range(args.sd_repeats):
            for network, _, seconds in runs.values():
                seconds.append(_seconds(lambda network=network: network(x, t, cond)))
        for keep, (_, out, seconds) in runs.items():
            name = "openvino fp32" if keep == ("fp32",) else "openvino bf16" + (f", fp32 {'+'.join(keep)}" if keep else "")
            print(f"| {name} | {rel(out, want):.4f} | {min(seconds):.2f} |", flush=True)


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sd-size", type=int, default=128)
    ap.add_argument("--sd-repeats", type=int, default=3)
    ap.add_argument("--sd-parts", nargs="*", help="SD rows: only these (fp32, none, time, time-mlp, norm+time, ...)")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--skip-sd", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import openvino

    print(f"torch {torch.__version__}, OpenVINO {openvino.get_version()}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as cache:
        if not args.skip_default:
            default_rows(args, cache)
        if not args.skip_sd:
            sd_rows(args, cache)


if __name__ == "__main__":
    main()
