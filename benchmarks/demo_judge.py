"""A trained shapes model under several sampler settings: the judge on held-out and training prompts.

    python benchmarks/demo_judge.py MODEL_DIR [--settings dpmpp_2m:20:4:default dpmpp_2m:20:4:karras ...]
        [--prompts 64] [--threads 1]

Each setting is SAMPLER:STEPS:GUIDANCE:SCHEDULE. For each it generates ``--prompts`` held-out and as many
training-distribution prompts (``latentdiff.demo.score_prompts``, the demo's scorer) and prints colour,
shape, size, position and count, plus the shape accuracy on the large objects alone: small objects (5 px at
32x32) come back from the autoencoder as blobs, so their shapes are near chance for any denoiser.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from latentdiff.data.judge import _match, judge
from latentdiff.data.shapes import heldout_prompts, train_prompts
from latentdiff.demo import score_prompts
from latentdiff.pipeline import load


def large_shape_accuracy(images, prompts) -> float:
    """Share of the targets' large objects whose shape the judge reads right (unmatched objects count wrong)."""
    hits = total = 0
    for image, (_, scene) in zip(images, prompts):
        predicted = judge(np.asarray(image))
        matched = dict(_match(scene.objects, predicted.objects))
        for i, target in enumerate(scene.objects):
            if target.size == "large":
                total += 1
                hits += i in matched and predicted.objects[matched[i]].shape == target.shape
    return hits / total if total else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--settings", nargs="+", default=["dpmpp_2m:20:4:default"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
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


if __name__ == "__main__":
    main()
