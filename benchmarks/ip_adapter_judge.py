"""Does an IP-Adapter carry a reference image's content into the output when the prompt is empty?

    python benchmarks/ip_adapter_judge.py ADAPTER [--model default] [--prompts 128] [--scales 0.5 1.0] [--threads 1]

References are rendered one-object scenes (``render_prompts``: scene i with jitter seed i) of two sets: (colour,
shape) pairs of the training split (new scenes, not the cached training items) and the held-out pairs the model
never saw. Each reference is the image prompt of one image generated with the EMPTY prompt (the model's own
sampler, steps and guidance, seed i); the judge scores that image against the reference's scene (colour, shape,
size, position of the object, all four). Rows: the empty prompt without an image prompt (what the model draws by
itself: the chance level), then with the adapter at each scale, and the ceiling the frozen autoencoder sets (its
round trip of the references). Time per image with and without the adapter.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentdiff.data.judge import score
from latentdiff.data.shapes import heldout_prompts, train_prompts
from latentdiff.eval.judging import autoencoder_ceiling, render_prompts, stderr
from latentdiff.pipeline import load

KEYS = ("color", "shape", "size", "position", "count", "all_correct")


def generate(pipe, references: torch.Tensor, scale: float | None, batch: int = 32) -> tuple[list, float]:
    """One empty-prompt image per reference (image prompt at ``scale``; None: no image prompt), seeds 0..; and the
    seconds per image."""
    images, t = [], time.perf_counter()
    for start in range(0, len(references), batch):
        refs = list(references[start:start + batch])
        extra = {"ip_image": refs, "ip_scale": scale} if scale is not None else {}
        images += [np.asarray(im) for im in pipe.generate([""] * len(refs), seed=start, **extra)]
    return images, (time.perf_counter() - t) / len(references)


def row(label: str, name: str, scores: dict, n: int, seconds: float | None = None) -> str:
    cells = [f"{scores[k]:.3f} +- {stderr(scores[k], n):.3f}" for k in KEYS]
    return f"| {label} | {name} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds:.3f}'} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter")
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    sets = {"training pairs": train_prompts(args.prompts, seed=7), "held-out pairs": heldout_prompts(args.prompts)}
    print(f"model {args.model}, IP-Adapter {args.adapter}, {args.prompts} references per set, empty prompt, the "
          "model's generation settings\n")
    print("| image prompt | references | " + " | ".join(KEYS) + " | s / image |\n|" + "---|" * (len(KEYS) + 3))
    refs = {name: render_prompts(prompts, pipe.default_size) for name, prompts in sets.items()}
    for name, prompts in sets.items():
        print(row("autoencoder round trip (ceiling)", name, autoencoder_ceiling(pipe.autoencoder, prompts,
                                                                                pipe.default_size), len(prompts)),
              flush=True)
    for scale in [None, *args.scales]:
        if scale is not None and pipe.ip_adapter is None:
            pipe.load_ip_adapter(args.adapter)
        for name, prompts in sets.items():
            images, seconds = generate(pipe, refs[name], scale)
            label = "none" if scale is None else f"adapter, scale {scale:g}"
            print(row(label, name, score(images, [s for _, s in prompts]), len(prompts), seconds), flush=True)


if __name__ == "__main__":
    main()
