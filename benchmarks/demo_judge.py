"""A trained shapes model under several sampler settings: the judge on held-out and training prompts.

    python benchmarks/demo_judge.py MODEL_DIR [--settings dpmpp_2m:20:4:default dpmpp_2m:20:4:karras ...]
        [--prompts 64] [--threads 1] [--confusion] [--probe]

Each setting is SAMPLER:STEPS:GUIDANCE:SCHEDULE. For each it generates ``--prompts`` held-out and as many
training-distribution prompts (``latentdiff.eval.judging.score_prompts``, the demo's scorer) and prints colour,
shape, size, position and count, plus the shape accuracy on the large objects alone: small objects (5 px at
32x32) come back from the autoencoder as blobs, so their shapes are near chance for any denoiser.

``--confusion``: for the first setting, which shape the judge reads for each large (colour, shape) asked.
``--probe``: start the sampler (dpmpp_2m, flow grid below s, CFG 4) from the latents of 48 rendered large
squares and triangles noised to sigma s, and count the shapes that survive: where in the noise range corners go.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from latentdiff.data.judge import _match, judge
from latentdiff.data.shapes import heldout_prompts, train_prompts
from latentdiff.diffusion import guidance as guidance_lib
from latentdiff.diffusion.sampling import get_sampler
from latentdiff.diffusion.schedules import make_sigmas
from latentdiff.eval.judging import render_prompts, score_prompts
from latentdiff.images import to_uint8
from latentdiff.pipeline import load


def large_shape_readings(images, prompts) -> collections.Counter:
    """(colour, shape asked, shape read or None if unmatched) counts over the targets' large objects."""
    counts = collections.Counter()
    for image, (_, scene) in zip(images, prompts):
        predicted = judge(np.asarray(image))
        matched = dict(_match(scene.objects, predicted.objects))
        for i, target in enumerate(scene.objects):
            if target.size == "large":
                read = predicted.objects[matched[i]].shape if i in matched else None
                counts[(target.color, target.shape, read)] += 1
    return counts


def large_shape_accuracy(images, prompts) -> float:
    """Share of the targets' large objects whose shape the judge reads right (unmatched objects count wrong)."""
    counts = large_shape_readings(images, prompts)
    total = sum(counts.values())
    return sum(n for (_, asked, read), n in counts.items() if asked == read) / total if total else float("nan")


@torch.no_grad()
def noised_start_probe(pipe, starts=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0), n: int = 48, steps: int = 20) -> dict:
    """Shapes kept when sampling starts from true latents of large squares / triangles noised to each sigma."""
    prompts = [p for p in train_prompts(10 * n, seed=1)
               if p[1].objects[0].size == "large" and p[1].objects[0].shape != "circle"][:n]
    z0 = pipe.autoencoder.encode(render_prompts(prompts, pipe.default_size))
    cond, uncond = pipe.encode_prompts([c for c, _ in prompts], [""] * len(prompts))
    denoiser = guidance_lib.cfg(pipe.denoiser, 4.0, uncond)
    sample, _ = get_sampler("dpmpp_2m")
    grid = make_sigmas("flow", steps, pipe.denoiser.parameterization)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(z0.shape, generator=generator)
    kept = {}
    for s in starts:
        sigmas = torch.cat([torch.tensor([s], dtype=grid.dtype), grid[grid < s]])
        z = sample(denoiser, z0 + s * noise, sigmas, cond, generator=generator)
        counts = large_shape_readings(to_uint8(pipe.autoencoder.decode(z)), prompts)
        kept[s] = sum(n for (_, asked, read), n in counts.items() if asked == read)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--settings", nargs="+", default=["dpmpp_2m:20:4:default"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--confusion", action="store_true", help="large objects: shape asked against shape read")
    ap.add_argument("--probe", action="store_true", help="shapes kept from noised true latents, by start sigma")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    if args.probe:
        kept = noised_start_probe(pipe)
        print("| start sigma | " + " | ".join(str(s) for s in kept) + " |\n|---|" + "---|" * len(kept))
        print("| large squares / triangles kept of 48 | " + " | ".join(str(k) for k in kept.values()) + " |\n")
    print("| sampler | steps | guidance | grid | prompts | color | shape | large-object shape | size | position | count |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setting in args.settings:
        sampler, steps, guidance, schedule = setting.split(":")
        for name, make in (("held-out", heldout_prompts), ("training", train_prompts)):
            prompts = make(args.prompts, seed=0)
            s, images = score_prompts(pipe, prompts, steps=int(steps), sampler=sampler, guidance=float(guidance),
                                      seed=0, schedule=schedule)
            cells = [s["color"], s["shape"], large_shape_accuracy(images, prompts), s["size"], s["position"],
                     s["count"]]
            print(f"| {sampler} | {steps} | {guidance} | {schedule} | {name} | "
                  + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)
            if args.confusion and setting == args.settings[0]:
                for (color, asked, read), n in sorted(large_shape_readings(images, prompts).items(), key=str):
                    print(f"    {name}: large {color} {asked} read as {read}: {n}")


if __name__ == "__main__":
    main()
