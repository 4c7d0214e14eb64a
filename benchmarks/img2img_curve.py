"""img2img on a shapes model: how the strength trades the prompt against the input image.

    python benchmarks/img2img_curve.py [MODEL] [--prompts 64] [--strengths 0.2 0.4 0.6 0.8 1.0] [--steps 20]
        [--sampler dpmpp_2m] [--guidance G] [--threads 2] [--same-prompt]

MODEL is a model folder (default "default", the bundled model). Each held-out prompt is generated from the rendered
scene of ANOTHER held-out prompt (the next one in the list), so the prompt and the input disagree
(``--same-prompt``: from its own scene). Prints one
markdown row per strength: the judge's scores against the prompt (all attributes, per object, colour, shape, each
+- one standard error), how often the judge still reads the input's scene in the result ("input kept"), the mean
absolute pixel distance to the input (0..255), and the seconds per image. Low strength keeps the input, strength
1 is text-to-image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentdiff.data.judge import score
from latentdiff.data.shapes import heldout_prompts, render
from latentdiff.eval.judging import stderr
from latentdiff.pipeline import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default", help="model folder (default: the bundled model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default=None, help="default: the model's recommendation")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--same-prompt", action="store_true",
                    help="start each prompt from its own rendered scene (the prompt and the input agree)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    size = pipe.default_size
    prompts = heldout_prompts(args.prompts, seed=args.seed)
    scenes = [scene for _, scene in prompts]
    shift = 0 if args.same_prompt else 1  # the input: this prompt's scene, or the next prompt's
    sources = [scenes[(i + shift) % len(prompts)] for i in range(len(prompts))]
    inputs = [render(scene, size, seed=i) for i, scene in enumerate(sources)]
    use = pipe.settings(sampler=args.sampler, steps=args.steps, guidance=args.guidance)
    print(f"model {args.model}, {len(prompts)} held-out prompts, each from {'its own' if args.same_prompt else 'another prompt' + chr(39) + 's'} rendered scene; "
          f"{use.sampler} {use.steps} steps on {use.schedule}, guidance {use.guidance:g}\n")
    keys = ("all_correct", "objects_correct", "color", "shape")
    print("| strength | " + " | ".join(keys) + " | input kept | distance to input | s / image |\n|"
          + "---|" * (len(keys) + 4))
    for strength in args.strengths:
        t = time.perf_counter()
        images = [np.asarray(pipe.generate(caption, image=inputs[i], strength=strength, steps=use.steps,
                                           sampler=use.sampler, guidance=use.guidance, seed=args.seed + i)[0])
                  for i, (caption, _) in enumerate(prompts)]
        seconds = (time.perf_counter() - t) / len(prompts)
        scores = score(images, scenes)
        kept = score(images, sources)["all_correct"]
        distance = np.mean([np.abs(a.astype(float) - b).mean() for a, b in zip(images, inputs)])
        n = len(prompts)
        cells = [f"{scores[k]:.3f} +- {stderr(scores[k], n):.3f}" for k in keys]
        print(f"| {strength:g} | " + " | ".join(cells) + f" | {kept:.3f} +- {stderr(kept, n):.3f} | {distance:.1f} | "
              f"{seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
