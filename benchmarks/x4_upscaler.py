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
BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02}


def build(folder: Path) -> Path:
    """The full-size random-weight upscaler folder (built once)."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from interop_tiny import write_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder.parent / f"{folder.name}_tok"))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=128, in_channels=7, out_channels=4, block_out_channels=(256, 512, 512, 1024), layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), attention_head_dim=8, cross_attention_dim=1024,
        use_linear_projection=True, only_cross_attention=(True, True, True, False), num_class_embeds=1000)
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, latent_channels=4,
                                  sample_size=256, scaling_factor=0.08333)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                                        hidden_act="gelu", projection_dim=512))
    scheduler = diffusers.DDIMScheduler(**BETAS, prediction_type="v_prediction", set_alpha_to_one=False,
                                        steps_offset=1, clip_sample=False)
    pipe = diffusers.StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                    low_res_scheduler=diffusers.DDPMScheduler(**BETAS),
                                                    scheduler=scheduler, max_noise_level=350)
    pipe.save_pretrained(folder)
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
