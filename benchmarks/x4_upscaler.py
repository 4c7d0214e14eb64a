"""SD's x4 upscaler at full size (random weights): latentdiff against diffusers' StableDiffusionUpscalePipeline.

Builds (once, into --dir) a diffusers folder in the published stabilityai/stable-diffusion-x4-upscaler layout with
random fp32 weights (U-Net: 7 input channels, (256, 512, 512, 1024), only_cross_attention (T, T, T, F), 1000 class
embeddings, 8 heads, 1024-wide context; VAE (128, 256, 512), factor 4, scale 0.08333; a 23-layer 1024-wide OpenCLIP-
style text model; DDIM v-prediction and a DDPM low_res_scheduler, both scaled-linear 1e-4..0.02; max_noise_level 350)
and a tiny character tokenizer (the real vocabulary is a download). Then upscales one --size px image with both
(same seed, steps, guidance, noise level) and prints the largest pixel difference (of 255) and each one's seconds.

    OMP_NUM_THREADS=1 python benchmarks/x4_upscaler.py [--dir /tmp/latentdiff_x4] [--size 32] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def build(folder: Path) -> Path:
    """The full-size random-weight upscaler folder (built once)."""
    if not (folder / "model_index.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from interop_tiny import x4_upscale_pipeline

        x4_upscale_pipeline(folder, full=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/latentdiff_x4", help="where the random-weight folder is built")
    parser.add_argument("--size", type=int, default=32, help="low-res image side (a multiple of 8)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--noise-level", type=int, default=20)
    args = parser.parse_args()
    import diffusers

    import latentdiff

    folder = build(Path(args.dir) / "x4-upscaler")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    expected = ref("a photo of a cat", image=image, num_inference_steps=args.steps, guidance_scale=9.0,
                   noise_level=args.noise_level, generator=torch.Generator().manual_seed(0), output_type="np").images
    theirs = time.perf_counter() - t
    del ref
    pipe = latentdiff.load(folder)
    t = time.perf_counter()
    got = pipe.generate("a photo of a cat", low_res=image, noise_level=args.noise_level, steps=args.steps,
                        sampler="ddim", schedule="leading", guidance=9.0, seed=0, output="pt")
    ours = time.perf_counter() - t
    got = ((got.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    print(json.dumps({"low_res": args.size, "output": got.shape[1], "steps": args.steps,
                      "noise_level": args.noise_level, "max_diff_of_255": float(np.abs(got - expected).max() * 255),
                      "seconds_latentdiff": round(ours, 2), "seconds_diffusers": round(theirs, 2),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
