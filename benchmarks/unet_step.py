"""Time per denoising step of our U-Net against diffusers' UNet2DConditionModel with the same weights.

Both networks share one set of (random) weights: ours takes diffusers' state dict as is (``assign=True``, no
copy). For each precision (fp32, and bf16 weights and activations) and image size, each network runs
``--warmup`` untimed calls, then ``--repeats`` timed calls of one step (batch ``--batch``, 77 context tokens),
the two networks' calls interleaved (ours, diffusers, ours, ...) so that load changes on a shared machine hit
both alike; the table gives the medians, the ratio ours / diffusers and the largest relative difference of
the outputs.

Presets: ``sd15`` and ``sd21`` are the real networks (our ``PRESETS`` entry against diffusers' config);
``sd15-small`` is SD 1.5's layout (4 levels, 2 resnets per level, cross-attention at the first three, 8
heads) at a fifth of its width (64, 128, 256, 256 channels), with our config translated from diffusers' by
``interop.diffusers_folder.unet_config_from_diffusers``: small enough to time bf16 on a CPU.

    python benchmarks/unet_step.py --preset sd15 --sizes 256 512 --precisions fp32 bf16 --repeats 2
    python benchmarks/unet_step.py --preset sd15-small --sizes 256 512 --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from latentdiff.models.unet import PRESETS, UNet
from latentdiff.types import Cond

DIFFUSERS_CONFIGS = {  # the diffusers config of each of our presets (the same network)
    "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8},
    "sd21": {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
    "sd15-small": {"block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 192, "attention_head_dim": 8},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_calls(fns, warmup: int, repeats: int) -> list[tuple[float, torch.Tensor]]:
    """For each function: median seconds of ``repeats`` calls after ``warmup`` calls, and its last output.

    The functions take turns, call by call, so a change of load on a shared machine affects them alike.
    """
    outs = [None] * len(fns)
    for _ in range(warmup):
        outs = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(ts), out) for ts, out in zip(times, outs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd15", choices=sorted(DIFFUSERS_CONFIGS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes (latents are 1/8)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import diffusers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**DIFFUSERS_CONFIGS[args.preset]).eval()
    if args.preset in PRESETS:
        config = PRESETS[args.preset]
    else:
        from latentdiff.interop.diffusers_folder import unet_config_from_diffusers

        config = unet_config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = UNet(config).eval()
    ctx_dim = config.context_dim
    n_params = sum(p.numel() for p in ref.parameters())

    print(f"{args.preset} U-Net ({n_params / 1e6:.0f}M parameters), batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}; median of {args.repeats} after {args.warmup} warm-up")
    print("| size (latent) | precision | ours s/step | diffusers s/step | ours / diffusers | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for precision in args.precisions:
        dtype = DTYPES[precision]
        ref.to(dtype)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # the same tensors, no copy
        for size in args.sizes:
            g = torch.Generator().manual_seed(size)
            lat = size // 8
            x = torch.randn(args.batch, 4, lat, lat, generator=g).to(dtype)
            t = torch.full((args.batch,), 500.0)
            ctx = torch.randn(args.batch, 77, ctx_dim, generator=g).to(dtype)
            cond = Cond(context=ctx)
            with torch.inference_mode():
                (t_ours, out_ours), (t_ref, out_ref) = time_calls(
                    [lambda x=x, t=t, cond=cond: ours(x, t, cond), lambda x=x, t=t, ctx=ctx: ref(x, t, ctx).sample],
                    args.warmup, args.repeats)
            diff = ((out_ours.float() - out_ref.float()).abs().max() / out_ref.float().abs().max()).item()
            print(f"| {size} ({lat}x{lat}x4) | {precision} | {t_ours:.3f} | {t_ref:.3f} | {t_ours / t_ref:.2f} | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
