"""The judge suites on a shapes model under several guidance settings, with one standard error.

    python benchmarks/default_judge.py MODEL_DIR [--prompts 256] [--settings cfg:4 apg:4 cfg:4:pag1 auto:2 ...]
        [--suites heldout heldout_paraphrase heldout_two train] [--steps 20] [--sampler dpmpp_2m] [--threads 2] [--seed 0]
        [--confusion]

Each setting is METHOD:SCALE[:pagP]: METHOD cfg, apg or auto (autoguidance with the folder's guide/), SCALE the
guidance scale, pagP a perturbed-attention guidance scale on top. Prints one markdown row per (setting, suite):
colour, shape, size, position, all attributes and per-object accuracy, each +- one standard error, and the
seconds per image of the generation (batch 64, the whole suite). ``--confusion``: for the first setting, the
held-out single-object prompts counted by (colour, shape, size asked) and the shape the judge read.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch

from latentdiff.data.judge import _match, judge
from latentdiff.data.shapes import heldout_prompts
from latentdiff.eval.judging import SUITES, judge_suites, score_prompts, stderr
from latentdiff.pipeline import load


def parse_setting(text: str) -> dict:
    parts = text.split(":")
    method = {"cfg": "cfg", "apg": "apg", "auto": "autoguidance"}[parts[0]]
    out = {"guidance_method": method, "guidance": float(parts[1]), "pag_scale": 0.0}
    for extra in parts[2:]:
        if not extra.startswith("pag"):
            raise ValueError(f"unknown part {extra!r} of setting {text!r}")
        out["pag_scale"] = float(extra[3:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--settings", nargs="+", default=["cfg:4"])
    ap.add_argument("--suites", nargs="+", default=list(SUITES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="draws the prompts and the noise; a run's judge_every "
                    "curve uses seed 0, so a checkpoint picked on it is scored on another seed")
    ap.add_argument("--confusion", action="store_true", help="held-out shapes asked against shapes read")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    keys = ("color", "shape", "size", "position", "all_correct", "objects_correct")
    print(f"model {args.model}, {args.prompts} prompts per suite, {args.sampler} {args.steps} steps\n")
    print("| setting | suite | " + " | ".join(keys) + " | s / image |\n|" + "---|" * (len(keys) + 3))
    for text in args.settings:
        for suite in args.suites:
            t = time.perf_counter()
            scores = judge_suites(pipe, args.prompts, suites=(suite,), steps=args.steps, sampler=args.sampler,
                                  seed=args.seed, **parse_setting(text))[suite]
            seconds = (time.perf_counter() - t) / args.prompts
            n = args.prompts * (2 if suite.endswith("two") else 1)
            cells = [f"{scores[k]:.3f} +- {stderr(scores[k], n if k != 'all_correct' else args.prompts):.3f}"
                     for k in keys]
            print(f"| {text} | {suite} | " + " | ".join(cells) + f" | {seconds:.3f} |", flush=True)
    if args.confusion:
        prompts = heldout_prompts(args.prompts, seed=args.seed)
        _, images = score_prompts(pipe, prompts, steps=args.steps, sampler=args.sampler, seed=args.seed, batch=64,
                                  **parse_setting(args.settings[0]))
        counts = collections.Counter()
        for image, (_, scene) in zip(images, prompts):
            read = judge(np.asarray(image))
            matched = dict(_match(scene.objects, read.objects))
            o = scene.objects[0]
            counts[(o.color, o.shape, o.size, read.objects[matched[0]].shape if 0 in matched else None)] += 1
        print(f"\n{args.settings[0]}, {args.prompts} held-out prompts: (colour, shape, size asked, shape read)")
        for key, n in sorted(counts.items(), key=str):
            print(f"    {key}: {n}")


if __name__ == "__main__":
    main()
