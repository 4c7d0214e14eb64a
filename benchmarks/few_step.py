"""Few-step generation on a shapes model: a distilled student (an LCM-LoRA file, or a model folder from distill
--method lcm / ct / add / reflow, named by its index's method, run with its index's sampler) at 1, 2 and 4 steps
against its teacher with DPM++ 2M and UniPC at the same steps and at 20.

    python benchmarks/few_step.py [--teacher default] [--lora RUN/lora.safetensors] [--student RUN/model]
        [--prompts 512] [--steps 1 2 4] [--teacher-steps 1 2 4 20] [--threads 1] [--seed 1]
        [--features /path/to/shapes_net]

Prints one markdown row per (model, sampler, steps): held-out all-attributes-correct (single-object held-out
pairs, template words) +- one standard error, seconds per image (generation only, batches of 64), and FID in the
shapes net's feature space against the teacher's own 20-step DPM++ 2M images of the same prompts drawn from
other noise (seed + 10000): the teacher's 20-step row is then the FID of two noise draws, the floor.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentdiff.data.judge import score
from latentdiff.data.shapes import heldout_prompts, to_tensor
from latentdiff.eval.features import extract, make_extractor
from latentdiff.eval.judging import stderr
from latentdiff.eval.metrics import fid
from latentdiff.pipeline import load


def generate(pipe, prompts, *, steps: int, sampler: str, guidance: float | None, seed: int, batch: int = 64):
    """Images (PIL) of every prompt and the seconds per image the generation took."""
    images, t = [], time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = [c for c, _ in prompts[start:start + batch]]
        images += pipe.generate(chunk, steps=steps, sampler=sampler, guidance=guidance, seed=seed + start)
    return images, (time.perf_counter() - t) / len(prompts)


def row(name: str, images, seconds: float, prompts, extractor, reference) -> str:
    scores = score([np.asarray(im) for im in images], [s for _, s in prompts])
    p = scores["all_correct"]
    feats = extract(extractor, torch.stack([to_tensor(np.array(im)) for im in images]))
    return f"| {name} | {p:.3f} +- {stderr(p, len(prompts)):.3f} | {seconds:.4f} | {fid(reference, feats):.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="default")
    ap.add_argument("--lora", help="an LCM-LoRA file for the teacher (distill --lora-rank)")
    ap.add_argument("--student", help="a distilled student's model folder (distill)")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=[1, 2, 4, 20])
    ap.add_argument("--samplers", nargs="*", default=["dpmpp_2m", "unipc"],
                    help="the teacher's samplers (none given: no teacher rows)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--features", default=None, help="the shapes feature net's folder (default: its cache path)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = heldout_prompts(args.prompts, seed=args.seed)
    extractor = make_extractor("shapes", args.features)
    teacher = load(args.teacher)
    guidance = teacher.settings().guidance
    ref_images, _ = generate(teacher, prompts, steps=20, sampler="dpmpp_2m", guidance=guidance, seed=args.seed + 10000)
    reference = extract(extractor, torch.stack([to_tensor(np.array(im)) for im in ref_images]))
    print(f"teacher {args.teacher} (CFG {guidance:g}), {args.prompts} held-out prompts, seed {args.seed}; FID against "
          f"its 20-step dpmpp_2m images, seed {args.seed + 10000}\n")
    print("| model, sampler, steps | held-out all attributes | s / image | FID (shapes) |\n|---|---|---|---|")
    students = []
    if args.lora:
        student = load(args.teacher)
        student.load_lora(args.lora)
        students.append(("LCM-LoRA", student))
    if args.student:
        student = load(args.student)
        method = student.index.distilled.method if student.index.distilled is not None else "lcm"
        students.append((f"{method.upper()} student", student))
    for name, pipe in students:
        sampler = pipe.settings().sampler  # the student's own: 'lcm', or 'euler' for a reflow student
        for steps in args.steps:
            images, seconds = generate(pipe, prompts, steps=steps, sampler=sampler, guidance=None, seed=args.seed)
            print(row(f"{name}, {sampler}, {steps}", images, seconds, prompts, extractor, reference), flush=True)
    for sampler in args.samplers:
        for steps in args.teacher_steps:
            images, seconds = generate(teacher, prompts, steps=steps, sampler=sampler, guidance=guidance,
                                       seed=args.seed)
            print(row(f"teacher, {sampler}, {steps}", images, seconds, prompts, extractor, reference), flush=True)


if __name__ == "__main__":
    main()
