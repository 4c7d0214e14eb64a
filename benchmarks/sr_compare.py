"""Super-resolution on shapes: a trained SR model (``train --preset shapes-sr``) against bicubic upsampling.

    python benchmarks/sr_compare.py MODEL [--images 256] [--steps 20] [--sampler S] [--guidance G]
        [--features DIR] [--threads 2]

Held-out shapes images at the model's size are downsampled as the model was trained (``conditioning.concat.
downsample``: bicubic with antialiasing) and brought back up by bicubic interpolation and by the model (prompted
with each image's caption). One markdown row per method: PSNR and SSIM against the originals (scikit-image, on
uint8 pixels, mean over images) and FID against the originals on the shapes feature network's features
(``latentdiff train-features``; skipped without it), and seconds per image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.conditioning.concat import downsample
from latentdiff.data.shapes import ShapesDataset
from latentdiff.images import to_uint8
from latentdiff.pipeline import load


def _quality(images: torch.Tensor, originals: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of uint8 images against the originals."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = to_uint8(images), to_uint8(originals)
    psnr = [peak_signal_noise_ratio(y, x, data_range=255) for x, y in zip(a, b)]
    ssim = [structural_similarity(y, x, data_range=255, channel_axis=-1) for x, y in zip(a, b)]
    return float(np.mean(psnr)), float(np.mean(ssim))


def compare(pipe, n: int = 256, *, steps: int | None = None, sampler: str | None = None,
            guidance: float | None = None, seed: int = 0, fid: bool = True, features: str | None = None) -> list[dict]:
    """One dict per method ("bicubic", "model"): psnr, ssim, fid (None when ``fid`` is off), s_per_image."""
    up = pipe.index.upscale
    data = ShapesDataset(n, size=pipe.default_size, seed=seed, split="heldout")
    items = [data[i] for i in range(n)]
    originals = torch.stack([it["image"] for it in items])  # (N, 3, H, W) in [-1, 1]
    low = downsample(originals, up)
    t = time.perf_counter()
    bicubic = F.interpolate(low, size=originals.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    t_bicubic = (time.perf_counter() - t) / n
    use = pipe.settings(sampler=sampler, steps=steps, guidance=guidance)
    t = time.perf_counter()
    model = torch.cat([pipe.generate(it["caption"], low_res=low[i:i + 1], steps=use.steps, sampler=use.sampler,
                                     guidance=use.guidance, seed=seed + i, output="pt") for i, it in enumerate(items)])
    t_model = (time.perf_counter() - t) / n
    extractor = None
    if fid:
        from latentdiff.eval.features import ShapesFeatures, extract
        from latentdiff.eval.metrics import fid as frechet
        from latentdiff.eval.shapes_net import default_path

        extractor = ShapesFeatures(features or default_path())
        real = extract(extractor, originals)
    rows = []
    for method, images, seconds in (("bicubic", bicubic, t_bicubic), ("model", model.clamp(-1, 1), t_model)):
        psnr, ssim = _quality(images, originals)
        score = frechet(real, extract(extractor, images)) if extractor is not None else None
        rows.append({"method": method, "psnr": psnr, "ssim": ssim, "fid": score, "s_per_image": seconds})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="super-resolution model folder")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default=None, help="default: the model's recommendation")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation")
    ap.add_argument("--features", default=None, help="shapes feature network folder (default: its default place)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from latentdiff.eval.shapes_net import default_path

    fid = Path(args.features or default_path(), "model.safetensors").is_file()
    pipe = load(args.model)
    up = pipe.index.upscale
    print(f"{args.images} held-out shapes images, {pipe.default_size // up} -> {pipe.default_size} px; "
          f"{args.steps} steps, seed {args.seed}" + ("" if fid else "; no shapes feature network: FID skipped") + "\n")
    print("| method | PSNR (dB) | SSIM | FID (shapes features) | s / image |\n|---|---|---|---|---|")
    for r in compare(pipe, args.images, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                     seed=args.seed, fid=fid, features=args.features):
        shown = f"{r['fid']:.2f}" if r["fid"] is not None else "-"
        print(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {shown} | {r['s_per_image']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
