"""Token merging (``generate(tome=)``, ``models/tome.py``): speed per denoiser step and quality cost.

    python benchmarks/tome.py [--preset sd15] [--sizes 256] [--ratios 0 0.3 0.5 0.7] [--precisions fp32 bf16]
        [--repeats 3] [--judge 128] [--judge-steps 20] [--threads 2] [--skip-sd] [--skip-default]

SD-shaped rows: our U-Net built from SD 1.5's config (``cpu_backends.our_config``; random weights, seeded), one
call at batch 2 (CFG's two halves, 77 context tokens), at each ratio, the ratios interleaved repeat by repeat in one
process (the best of ``--repeats`` counts), so they see the same machine load. bf16 rows hold bf16 weights with
channels-last convolutions (as ``cpu_backends.py``'s torch-bf16 row). "rel. diff" is ||out - out_0|| / ||out_0|| of
the eps prediction against ratio 0 (random weights: a bound on the per-step change, not an image quality).
Default-model rows: the judge's held-out suite (``--judge`` prompts, cfg 4, DPM++ 2M ``--judge-steps``; all
attributes right, one standard error) and seconds per image of that whole suite (batch 64).
"""

from __future__ import annotations

import argparse
import time

import torch
from cpu_backends import our_config


def sd_rows(args) -> None:
    from latentdiff.models.unet import UNet
    from latentdiff.types import Cond

    torch.manual_seed(0)
    base = UNet(our_config(args.preset)).eval()
    for size in args.sizes:
        g = torch.Generator().manual_seed(0)
        latent = size // 8
        x = torch.randn(2, 4, latent, latent, generator=g)
        c = torch.tensor([700.0, 700.0])
        context = torch.randn(2, 77, base.config.context_dim, generator=g)
        print(f"\n{args.preset} U-Net (random weights), {size} px ({latent}^2 latents, {latent * latent} tokens at the "
              f"merged level), one call at batch 2\n")
        print("| precision | tome ratio | s / step | x ratio 0 | rel. diff to ratio 0 |\n|---|---|---|---|---|")
        for precision in args.precisions:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            net = base.to(dtype).to(memory_format=torch.channels_last) if dtype != torch.float32 else base
            xi, cond = x.to(dtype), Cond(context=context.to(dtype))
            times, outs = {r: [] for r in args.ratios}, {}
            with torch.no_grad():
                net(xi, c, cond)  # warm-up
                for _ in range(args.repeats):
                    for r in args.ratios:
                        t = time.perf_counter()
                        outs[r] = net(xi, c, cond, tome=r).float()
                        times[r].append(time.perf_counter() - t)
            ref = outs[args.ratios[0]]
            for r in args.ratios:
                best = min(times[r])
                rel = ((outs[r] - ref).norm() / ref.norm()).item()
                print(f"| {precision} | {r:g} | {best:.3f} | {min(times[args.ratios[0]]) / best:.2f} | {rel:.4f} |",
                      flush=True)
            base = base.float().to(memory_format=torch.contiguous_format)


def default_rows(args) -> None:
    from latentdiff.eval.judging import judge_suites, stderr
    from latentdiff.pipeline import load

    pipe = load()
    print(f"\nbundled default model: held-out suite, {args.judge} prompts, cfg 4, DPM++ 2M {args.judge_steps} steps\n")
    print("| tome ratio | all attributes | colour | shape | s / image |\n|---|---|---|---|---|")
    for r in args.ratios:
        t = time.perf_counter()
        s = judge_suites(pipe, args.judge, suites=("heldout",), steps=args.judge_steps, guidance=4.0,
                         tome=r)["heldout"]
        seconds = (time.perf_counter() - t) / args.judge
        cells = [f"{s[k]:.3f} +- {stderr(s[k], args.judge):.3f}" for k in ("all_correct", "color", "shape")]
        print(f"| {r:g} | " + " | ".join(cells) + f" | {seconds:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--judge", type=int, default=128)
    ap.add_argument("--judge-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument("--skip-default", action="store_true")
    args = ap.parse_args()
    if args.ratios[0] != 0:
        args.ratios = [0.0, *args.ratios]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    if not args.skip_sd:
        sd_rows(args)
    if not args.skip_default:
        default_rows(args)


if __name__ == "__main__":
    main()
