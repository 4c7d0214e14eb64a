"""What an autoencoder lets through: the judge on round trips of held-out and training-split scenes.

    python benchmarks/ae_ceiling.py AUTOENCODER_DIR [--n 200] [--size 32]

Prints the judge's per-attribute accuracy on round trips of ``--n`` held-out and ``--n`` training-split
scenes (``latentdiff.eval.judging.autoencoder_ceiling``: the best generation through this autoencoder can score),
and for single-object scenes which shape the judge reads for each (size, shape): where shapes are lost.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch

from latentdiff.components import load_autoencoder
from latentdiff.data.judge import judge
from latentdiff.data.shapes import heldout_prompts, train_prompts
from latentdiff.eval.judging import autoencoder_ceiling, render_prompts
from latentdiff.images import to_uint8


@torch.no_grad()
def shape_confusion(autoencoder, prompts, size: int) -> collections.Counter:
    """(size, true shape, read shape) counts over the single-object scenes the judge finds one object in."""
    images = render_prompts(prompts, size)
    rec = to_uint8(autoencoder.decode(autoencoder.encode(images)))
    counts = collections.Counter()
    for image, (_, scene) in zip(rec, prompts):
        read = judge(np.asarray(image))
        if len(scene.objects) == 1 and len(read.objects) == 1:
            counts[(scene.objects[0].size, scene.objects[0].shape, read.objects[0].shape)] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("autoencoder")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    ae = load_autoencoder(args.autoencoder).eval()
    for split, make in (("held-out", heldout_prompts), ("training", train_prompts)):
        prompts = make(args.n, seed=0)
        scores = autoencoder_ceiling(ae, prompts, args.size)
        print(f"{split}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float)))
        for (size, shape, read), n in sorted(shape_confusion(ae, prompts, args.size).items()):
            print(f"  {size} {shape} read as {read}: {n}")


if __name__ == "__main__":
    main()
