"""Inpainting on shapes: a dedicated inpainting model (mask + masked-image latents as input channels) against
latent blending on a text-to-image model.

    python benchmarks/inpaint_compare.py --blend default [--inpaint RUN/model] [--prompts 64] [--steps 20]
        [--sampler S] [--guidance G] [--mask-grow N] [--threads 2]

Each case is a held-out two-object prompt (its first held-out (colour, shape) pair is the asked object): the input
is the rendered scene WITHOUT the asked object, the mask the box where the asked object goes (``object_boxes``),
the prompt the whole scene's caption. Per model and method, one markdown row: the judge on the asked object alone
(right on every attribute, colour, shape, each +- one standard error), the PSNR outside the mask against the input
(dB, without pasting the input back: what the model itself keeps), text-to-image on held-out prompts (the judge's
objects_correct; an inpainting model gets a blank image under a white mask) and seconds per inpainted image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentdiff.data.judge import score
from latentdiff.data.masks import box_mask
from latentdiff.data.shapes import HELDOUT_PAIRS, Scene, heldout_prompts, object_boxes, render
from latentdiff.eval.judging import score_prompts, stderr
from latentdiff.pipeline import load


def cases(n: int, size: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray, Scene]]:
    """(caption, input image uint8 (H, W, 3), mask uint8 (H, W) 255 = repaint, the asked object as a Scene)."""
    out = []
    for i, (caption, scene) in enumerate(heldout_prompts(n, seed=seed, objects=2)):
        asked = next(o for o in scene.objects if (o.color, o.shape) in HELDOUT_PAIRS)
        rest = Scene(tuple(o for o in scene.objects if o != asked), scene.background)
        target = Scene((asked,), scene.background)
        mask = box_mask(object_boxes(target)[0], size, size)[0, 0].numpy()
        out.append((caption, render(rest, size, seed=i), (mask * 255).astype(np.uint8), target))
    return out


def psnr_outside(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, peak 255) over the pixels the mask keeps (inf where they are identical)."""
    keep = mask == 0
    mse = float(np.mean((image[keep].astype(np.float64) - reference[keep]) ** 2))
    return 10 * float(np.log10(255.0 ** 2 / mse)) if mse else float("inf")


def evaluate(pipe, cases_, *, steps: int | None = None, sampler: str | None = None, guidance: float | None = None,
             seed: int = 0, t2i_prompts: int = 0, mask_grow: int = 1) -> dict:
    """The judge on the asked object, PSNR outside the mask, text-to-image, seconds per image (module docstring);
    the inpainting is whatever ``pipe`` does with a mask: latent blending, or its own concat inputs."""
    use = pipe.settings(sampler=sampler, steps=steps, guidance=guidance)
    kw = {"steps": use.steps, "sampler": use.sampler, "guidance": use.guidance, "paste_back": False,
          "mask_grow": mask_grow}
    t = time.perf_counter()
    images = [np.asarray(pipe.generate(caption, image=image, mask=mask, seed=seed + i, **kw)[0])
              for i, (caption, image, mask, _) in enumerate(cases_)]
    seconds = (time.perf_counter() - t) / len(cases_)
    scores = score(images, [target for *_, target in cases_])
    psnr = [psnr_outside(out, image, mask) for out, (_, image, mask, _) in zip(images, cases_)]
    result = {"n": len(cases_), "objects_correct": scores["objects_correct"], "color": scores["color"],
              "shape": scores["shape"], "psnr_outside": float(np.mean(psnr)), "s_per_image": seconds,
              "method": "own concat inputs" if pipe.concat_inputs else "latent blending"}
    if t2i_prompts:
        t2i, _ = score_prompts(pipe, heldout_prompts(t2i_prompts, seed=seed), steps=use.steps, sampler=use.sampler,
                               guidance=use.guidance, seed=seed)
        result["t2i_objects_correct"] = t2i["objects_correct"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blend", default="default", help="text-to-image model inpainted by latent blending")
    ap.add_argument("--inpaint", default=None, help="inpainting model folder (train --preset shapes-inpaint); "
                    "without one, only the blending rows")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--t2i-prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default=None, help="default: the model's recommendation")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mask-grow", type=int, default=1, help="latent blending's early mask growth (generate's "
                    "mask_grow; 0: off)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipes = {args.blend: load(args.blend), **({args.inpaint: load(args.inpaint)} if args.inpaint else {})}
    size = pipes[args.blend].default_size
    cases_ = cases(args.prompts, size, args.seed)
    print(f"{len(cases_)} held-out two-object prompts, the asked object's box masked; {args.steps} steps, seed "
          f"{args.seed}\n")
    print("| model | method | asked object right | colour | shape | PSNR outside mask (dB) | text-to-image "
          "objects_correct | s / image |\n|---|---|---|---|---|---|---|---|")
    for name, pipe in pipes.items():
        r = evaluate(pipe, cases_, steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=args.seed,
                     t2i_prompts=args.t2i_prompts, mask_grow=args.mask_grow)
        cell = lambda k, r=r: f"{r[k]:.3f} +- {stderr(r[k], r['n']):.3f}"
        t2i = r.get("t2i_objects_correct", float("nan"))
        print(f"| {name} | {r['method']} | {cell('objects_correct')} | {cell('color')} | {cell('shape')} | "
              f"{r['psnr_outside']:.1f} | {t2i:.3f} +- {stderr(t2i, args.t2i_prompts):.3f} | {r['s_per_image']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
