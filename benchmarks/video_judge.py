"""Temporal consistency of a video model on moving-shapes prompts, read by the clip judge.

    python benchmarks/video_judge.py MODEL_DIR [--clips 60] [--frames 8] [--steps 20] [--guidance G] [--seed 0]
    python benchmarks/video_judge.py --inflate default ...   (the baseline: an image model inflated, untrained)
    python benchmarks/video_judge.py --still default ...     (the image model drawing each frame from its still caption)
    python benchmarks/video_judge.py --rendered default ...  (no model: the prompts' own rendered clips through its autoencoder)
    python benchmarks/video_judge.py RUN/model --checkpoint RUN/checkpoints/step_0000800   (a point of the curve)

Prompts are the captions of ``--clips`` clips drawn from a fixed seed (``moving_shapes.sample_clip``) of
``--split`` ("heldout": (colour, shape, motion) triples train-video never trains on, the default; "train";
"any"), one clip each, of ``--motions`` only when given. ``--still``: the image model, each frame drawn alone from its caption without motion
(``moving_shapes.still_caption``): the per-frame bar a video model's frame agreement is held to. ``--rendered``:
no sampling, the truth clips rendered, encoded and decoded by the model's autoencoder: the most any latent model
with that autoencoder can read on these prompts (``--rendered-still``: the still captions' frames, the ceiling of
``--still``). ``--checkpoint``: the EMA weights of that training checkpoint of the model's run. Prints one markdown
row: per-frame judge agreement (shape, colour at that frame, background), motion accuracy (direction / growth /
colour change read from the object's track) with one standard error, the share of clips right on both, motion
accuracy per motion, frame agreement per motion, and the frame-to-frame latent distance (RMS of z[f+1] - z[f])
of the generated clips next to that of the same prompts' rendered clips encoded by the model's autoencoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch

from latentdiff.data.moving_shapes import ClipLatents, check_motions, score_clips, still_caption
from latentdiff.data.shapes import parse_caption, render, to_tensor
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.images import to_uint8
from latentdiff.models.families import INFLATABLE, family_of
from latentdiff.models.vae_inference import decode_latents
from latentdiff.pipeline import Pipeline, load


def frame_distance(z: torch.Tensor) -> float:
    """Mean over clips and frame pairs of the RMS difference of consecutive latent frames; z (B, C, F, h, w)."""
    return float((z[:, :, 1:] - z[:, :, :-1]).pow(2).mean(dim=(1, 3, 4)).sqrt().mean())


def still_latents(autoencoder, clips, frames: int, size: int, seed: int) -> torch.Tensor:
    """Each frame's still caption rendered as a shapes scene and encoded: (B, C, F, h, w) (what ``--still`` asks the
    image model to draw, as the data draws it)."""
    scenes = [parse_caption(still_caption(c, f, frames)) for c in clips for f in range(frames)]
    pixels = torch.stack([to_tensor(render(s, size, seed=seed + i)) for i, s in enumerate(scenes)])
    with torch.no_grad():
        z = autoencoder.encode(pixels.to(next(autoencoder.parameters()).dtype)).float()  # (B*F, C, h, w)
    return z.reshape(len(clips), frames, *z.shape[1:]).transpose(1, 2)


def load_ema(pipe: Pipeline, checkpoint: Path) -> None:
    """Put a train-video checkpoint's EMA weights (``ema.safetensors``: network., text_encoder.) into ``pipe``."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "ema.safetensors"))
    for prefix, module in (("network.", pipe.denoiser.network), ("text_encoder.", pipe.text_encoder)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            module.load_state_dict(part)
        elif prefix == "network.":
            raise ValueError(f"{checkpoint}/ema.safetensors holds no network weights")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="a video model folder (latentdiff train-video)")
    ap.add_argument("--inflate", default=None, metavar="IMAGE_MODEL",
                    help="instead: this image model inflated with fresh (zero) temporal layers: the image model "
                         "frame by frame, the baseline")
    ap.add_argument("--still", default=None, metavar="IMAGE_MODEL",
                    help="instead: this image model drawing every frame alone from its still caption")
    ap.add_argument("--rendered", default=None, metavar="MODEL",
                    help="instead: no sampling; the prompts' rendered clips encoded and decoded by this model's "
                         "autoencoder (the ceiling its latents allow)")
    ap.add_argument("--rendered-still", action="store_true",
                    help="with --rendered: each frame's still caption rendered (the object in the middle) instead: "
                         "the ceiling of --still's frames")
    ap.add_argument("--checkpoint", default=None, help="a train-video checkpoint folder: its EMA weights")
    ap.add_argument("--split", default="heldout", choices=("heldout", "train", "any"))
    ap.add_argument("--motions", default=None, help="only clips of these motions, comma-separated (e.g. recolor: "
                    "objects in the middle, which the still captions describe exactly)")
    ap.add_argument("--clips", type=int, default=60)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's own, its index's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=12)
    args = ap.parse_args()
    if sum(x is not None for x in (args.model, args.inflate, args.still, args.rendered)) != 1:
        ap.error("give one of: a video model folder, --inflate IMAGE_MODEL, --still IMAGE_MODEL, --rendered MODEL")
    pipe = load(args.model or args.inflate or args.still or args.rendered)
    if args.inflate:
        image = pipe.denoiser.network
        if family_of(image) not in INFLATABLE:
            ap.error(f"--inflate {args.inflate}: a {family_of(image)} denoiser; only U-Net and DiT models inflate")
        network = INFLATABLE[family_of(image)][2](image)
        pipe = Pipeline(pipe.autoencoder, Denoiser(network, pipe.denoiser.parameterization), pipe.text_encoder,
                        dataclasses.replace(pipe.index, frames=args.frames))
    motions = tuple(args.motions.split(",")) if args.motions else None
    try:
        check_motions(motions)
    except ValueError as e:
        ap.error(f"--motions: {e}")
    if args.rendered_still and not args.rendered:
        ap.error("--rendered-still goes with --rendered MODEL")
    if args.checkpoint:
        load_ema(pipe, Path(args.checkpoint))
    args.guidance = pipe.settings(guidance=args.guidance).guidance
    size = pipe.default_size
    truth = ClipLatents(pipe.autoencoder, args.clips, args.frames, size, seed=10_000 + args.seed,  # a seed not trained
                        split=None if args.split == "any" else args.split, motions=motions)
    t = time.perf_counter()
    frames, latents = [], []
    for start in range(0, args.clips, args.batch):
        if args.rendered:
            z = truth.latents[start:start + args.batch]
            if args.rendered_still:
                z = still_latents(pipe.autoencoder, truth.clips[start:start + args.batch], args.frames, size, start)
        elif args.still:
            prompts = [still_caption(c, f, args.frames) for c in truth.clips[start:start + args.batch]
                       for f in range(args.frames)]
            z = pipe.generate(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed + start,
                              output="latent")  # (B*F, C, h, w)
            z = z.reshape(-1, args.frames, *z.shape[1:]).transpose(1, 2)  # (B, C, F, h, w)
        else:
            z = pipe.generate(truth.captions[start:start + args.batch], frames=args.frames, steps=args.steps,
                              guidance=args.guidance, seed=args.seed + start, output="latent")
        latents.append(z)
        pixels = to_uint8(decode_latents(pipe.autoencoder, z.transpose(1, 2).flatten(0, 1)))  # (B*F, H, W, 3)
        frames += list(pixels.reshape(len(z), args.frames, *pixels.shape[1:]))
    seconds = (time.perf_counter() - t) / args.clips
    scores = score_clips(frames, truth.clips)
    n = scores["n"]
    se = {k: math.sqrt(scores[k] * (1 - scores[k]) / n) for k in ("motion_accuracy", "clip_accuracy")}
    by_motion = ", ".join(f"{m} {v:.2f}" for m, v in scores["by_motion"].items())
    frames_by_motion = ", ".join(f"{m} {v:.3f}" for m, v in scores["frames_by_motion"].items())
    name = args.model or (f"{args.inflate} inflated, untrained" if args.inflate else
                          f"{args.still}, each frame from its still caption" if args.still else
                          f"rendered {'still frames' if args.rendered_still else 'clips'} through {args.rendered}'s "
                          "autoencoder")
    name += f" @ {Path(args.checkpoint).name}" if args.checkpoint else ""
    name += f" ({args.split} prompts{', ' + args.motions + ' only' if args.motions else ''})"
    print(f"model {name}; {n} clips of {args.frames} frames, dpmpp_2m {args.steps} steps, guidance {args.guidance}\n")
    print("| model | frame agreement | motion accuracy | clip accuracy | per motion | latent frame distance "
          "(generated / rendered) | s / clip | frame agreement per motion |\n|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {scores['frame_accuracy']:.3f} | {scores['motion_accuracy']:.3f} +- {se['motion_accuracy']:.3f} | "
          f"{scores['clip_accuracy']:.3f} +- {se['clip_accuracy']:.3f} | {by_motion} | {frame_distance(torch.cat(latents)):.3f} / "
          f"{frame_distance(truth.latents):.3f} | {seconds:.2f} | {frames_by_motion} |")


if __name__ == "__main__":
    main()
