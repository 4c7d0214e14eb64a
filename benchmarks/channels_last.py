"""Contiguous (NCHW) against channels-last (NHWC) convolutions: training steps in fp32, inference in bf16.

    python benchmarks/channels_last.py [--threads 2] [--rounds 4]
    python benchmarks/channels_last.py --inference [--threads 1] [--rounds 1] [--ae-size 64] [--unet-size 64]

Training: both layouts train side by side in one process, alternating, from the same initial weights and
batch, so the machine's load hits them alike; the table gives seconds per step (forward, backward, AdamW)
and the ratio. The first-step losses are printed to show that the layouts compute the same thing.

Inference (``--inference``): single ops (conv2d, group norm, SDPA, linear) and whole networks (the
autoencoder's encoder and decoder, the ``shapes-tiny`` and an SD-1.5-layout U-Net step) run in fp32, then in
bf16 autocast with contiguous and with channels-last weights and inputs (what ``decode_with_fallback`` and
``Pipeline.generate`` do on a CPU); the table gives the seconds of each, the speed-ups, and each bf16 output's
PSNR against the fp32 one (peak = the fp32 output's range). On a CPU without native bf16 both layouts run
aten's fallback convolution (``_slow_conv2d_forward``), whose NCHW variant is ~35x slower than its NHWC one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
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


def inference_cases(ae_size: int, unet_size: int) -> dict:
    """name -> (module, inputs, takes_layout): an op or a network in eval mode, with inputs at fixed seeds."""
    import torch.nn.functional as F

    from latentdiff.models.unet import PRESETS as UNET_PRESETS

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    class Fn(torch.nn.Module):  # a function as a module, so every case is called the same way
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, *a):
            return self.fn(*a)

    ae = AutoencoderKL(AE_PRESETS["small-f8c4"]).eval()
    lat = ae_size // ae.factor
    gn = torch.nn.GroupNorm(32, 64)
    tiny = dataclasses.replace(UNET_PRESETS["shapes-tiny"], in_channels=4, out_channels=4)
    sd = dataclasses.replace(UNET_PRESETS["sd15"], model_channels=64, context_dim=192)  # sd15-small
    ul, sl = unet_size // 4, unet_size // 8  # shapes-tiny runs under an f=4 autoencoder, SD under f=8
    t = torch.full((2,), 500.0)
    return {
        "conv2d 3x3 64->64, 1x64x128x128": (torch.nn.Conv2d(64, 64, 3, padding=1), (randn(1, 64, 128, 128),), True),
        # Autocast leaves group norm at its input's dtype: give it bf16 (as a bf16 convolution would) under bf16.
        "group norm 32 groups, 1x64x128x128": (Fn(lambda x: gn(
            x.bfloat16() if torch.is_autocast_enabled("cpu") else x)), (randn(1, 64, 128, 128),), True),
        "SDPA 1x8x1024x64": (Fn(F.scaled_dot_product_attention), tuple(randn(1, 8, 1024, 64) for _ in range(3)),
                             False),
        "linear 4096x256 -> 256": (torch.nn.Linear(256, 256), (randn(4096, 256),), False),
        f"small-f8c4 encoder, {ae_size} px": (Fn(ae.encoder), (randn(1, 3, ae_size, ae_size).clamp(-1, 1),), True),
        f"small-f8c4 decoder, {ae_size} px": (Fn(ae.decoder), (randn(1, 4, lat, lat),), True),
        f"shapes-tiny U-Net step, {unet_size} px ({ul}x{ul}x4), batch 2":
            (UNet(tiny), (randn(2, 4, ul, ul), t, Cond(context=randn(2, 16, 256))), True),
        f"sd15-small U-Net step, {unet_size} px ({sl}x{sl}x4), batch 2":
            (UNet(sd), (randn(2, 4, sl, sl), t, Cond(context=randn(2, 77, 192))), True),
    }


def psnr_vs(reference: torch.Tensor, out: torch.Tensor) -> float:
    """PSNR of ``out`` against ``reference`` in dB, the peak being the reference's range."""
    ref, out = reference.double(), out.double()
    mse = (ref - out).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10((ref.max() - ref.min()).item() ** 2 / mse)


@torch.no_grad()
def time_inference(module, inputs, channels_last: bool, bf16: bool, rounds: int) -> tuple[float, torch.Tensor]:
    """Best seconds of ``rounds`` calls after one warm-up, and the output (float32)."""
    module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if channels_last:
        inputs = tuple(x.to(memory_format=torch.channels_last) if torch.is_tensor(x) and x.ndim == 4 else x
                       for x in inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = module(*inputs)
        best = math.inf
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = module(*inputs)
            best = min(best, time.perf_counter() - t0)
    module.to(memory_format=torch.contiguous_format)
    return best, out.float()


def inference_table(args) -> None:
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.rounds} after one warm-up; "
          "bf16 = autocast, weights fp32 (cast by autocast), inputs float32")
    print("| op / network | fp32 s | bf16 NCHW s | bf16 NHWC s | NHWC speed-up (bf16) | bf16 NHWC / fp32 | "
          "PSNR bf16 NCHW vs fp32 (dB) | PSNR bf16 NHWC vs fp32 (dB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (module, inputs, takes_layout) in inference_cases(args.ae_size, args.unet_size).items():
        module.eval()
        t32, ref = time_inference(module, inputs, False, False, args.rounds)
        tc, oc = time_inference(module, inputs, False, True, args.rounds)
        if takes_layout:
            tl, ol = time_inference(module, inputs, True, True, args.rounds)
            cols = f"{tl:.4f} | {tc / tl:.1f}x | {tl / t32:.1f}x | {psnr_vs(ref, oc):.1f} | {psnr_vs(ref, ol):.1f}"
        else:
            cols = f"(no layout) | - | {tc / t32:.1f}x (NCHW) | {psnr_vs(ref, oc):.1f} | -"
        print(f"| {name} | {t32:.4f} | {tc:.4f} | {cols} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--inference", action="store_true", help="bf16 inference table instead of training steps")
    parser.add_argument("--ae-size", type=int, default=64, help="--inference: autoencoder image size (pixels)")
    parser.add_argument("--unet-size", type=int, default=64, help="--inference: U-Net image size (pixels)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.inference:
        inference_table(args)
        return
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
