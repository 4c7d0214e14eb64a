"""Temporal consistency of a video model on moving-shapes prompts, read by the clip judge.

    python benchmarks/video_judge.py MODEL_DIR [--clips 60] [--frames 8] [--steps 20] [--guidance 4] [--seed 0]
    python benchmarks/video_judge.py --inflate default ...   (the baseline: an image model inflated, untrained)

Prompts are the captions of ``--clips`` clips drawn from a fixed seed (``moving_shapes.sample_clip``), one clip
each. Prints one markdown row: per-frame judge agreement (shape, colour at that frame, background), motion
accuracy (direction / growth / colour change read from the object's track) with one standard error, the share of
clips right on both, motion accuracy per motion, and the frame-to-frame latent distance (RMS of z[f+1] - z[f])
of the generated clips next to that of the same prompts' rendered clips encoded by the model's autoencoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from latentdiff.data.moving_shapes import ClipLatents, score_clips
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.images import to_uint8
from latentdiff.models.vae_inference import decode_latents
from latentdiff.models.video_unet import inflate
from latentdiff.pipeline import Pipeline, load


def frame_distance(z: torch.Tensor) -> float:
    """Mean over clips and frame pairs of the RMS difference of consecutive latent frames; z (B, C, F, h, w)."""
    return float((z[:, :, 1:] - z[:, :, :-1]).pow(2).mean(dim=(1, 3, 4)).sqrt().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="a video model folder (latentdiff train-video)")
    ap.add_argument("--inflate", default=None, metavar="IMAGE_MODEL",
                    help="instead: this image model inflated with fresh (zero) temporal layers: the image model "
                         "frame by frame, the baseline")
    ap.add_argument("--clips", type=int, default=60)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=12)
    args = ap.parse_args()
    if (args.model is None) == (args.inflate is None):
        ap.error("give a video model folder, or --inflate IMAGE_MODEL")
    pipe = load(args.model or args.inflate)
    if args.inflate:
        network = inflate(pipe.denoiser.network)
        pipe = Pipeline(pipe.autoencoder, Denoiser(network, pipe.denoiser.parameterization), pipe.text_encoder,
                        dataclasses.replace(pipe.index, frames=args.frames))
    size = pipe.default_size
    truth = ClipLatents(pipe.autoencoder, args.clips, args.frames, size, seed=10_000 + args.seed)  # held-out seed
    t = time.perf_counter()
    frames, latents = [], []
    for start in range(0, args.clips, args.batch):
        prompts = truth.captions[start:start + args.batch]
        z = pipe.generate(prompts, frames=args.frames, steps=args.steps, guidance=args.guidance,
                          seed=args.seed + start, output="latent")
        latents.append(z)
        pixels = to_uint8(decode_latents(pipe.autoencoder, z.transpose(1, 2).flatten(0, 1)))  # (B*F, H, W, 3)
        frames += list(pixels.reshape(len(z), args.frames, *pixels.shape[1:]))
    seconds = (time.perf_counter() - t) / args.clips
    scores = score_clips(frames, truth.clips)
    n = scores["n"]
    se = math.sqrt(scores["motion_accuracy"] * (1 - scores["motion_accuracy"]) / n)
    by_motion = ", ".join(f"{m} {v:.2f}" for m, v in scores["by_motion"].items())
    name = args.model or f"{args.inflate} inflated, untrained"
    print(f"model {name}; {n} clips of {args.frames} frames, dpmpp_2m {args.steps} steps, guidance {args.guidance}\n")
    print("| model | frame agreement | motion accuracy | clip accuracy | per motion | latent frame distance "
          "(generated / rendered) | s / clip |\n|---|---|---|---|---|---|---|")
    print(f"| {name} | {scores['frame_accuracy']:.3f} | {scores['motion_accuracy']:.3f} +- {se:.3f} | "
          f"{scores['clip_accuracy']:.3f} | {by_motion} | {frame_distance(torch.cat(latents)):.3f} / "
          f"{frame_distance(truth.latents):.3f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
