"""Score distillation from a shapes model: the judge on each asset's turntable views, for centred single objects.

    OMP_NUM_THREADS=1 python benchmarks/sds_judge.py [--model default] [--split heldout] [--prompts 12] [--seed 0]
        [--first 0] [--set KEY=VALUE ...] [--reference 8] [--jsonl FILE] [--fixed-point 1,3,20]

Prompts (``centred_prompts``): the held-out (colour, shape) pairs at both sizes (or ``train_prompts`` scenes), the
object at the centre, in template words with the background. Each prompt is distilled with ``SDSConfig`` (``--set`` overrides its keys, e.g.
``space=encoder``, ``method=csd``, ``steps=300``) and its ``eval_views`` turntable views (elevation 0) are judged.
Prints one row per prompt and a summary: views right (colour and shape of the one object the judge finds; mean
over prompts +- one standard error), views right on every attribute (also size, position, background), the share
of prompts with >= 0.8 of views right, multi-view consistency (the share of views agreeing with the commonest
reading), the silhouette area's coefficient of variation across views, and CPU minutes per asset.
``--fixed-point G1,G2``: no assets; the image-space SDS target's RMS error from the prompts' ground-truth renders
per guidance and noise level (a right image should be near the update's fixed point).
``--reference N``: the 2D model's own images of the same prompts (N seeds, its own settings) judged the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from latentdiff.config import build_config, parse_override
from latentdiff.data.shapes import (
    BACKGROUNDS,
    HELDOUT_PAIRS,
    Scene,
    ShapeObject,
    caption,
    render,
    train_prompts,
)
from latentdiff.pipeline import load
from latentdiff.threed.sds import SDSConfig, distill, evaluate, fixed_point_error, judge_views, plan_prompt


def centred_prompts(split: str, n: int, seed: int) -> list[tuple[str, Scene]]:
    """``n`` one-object prompts with the object at the centre (template words, background stated). heldout: the six
    held-out (colour, shape) pairs, large ones first, then small, backgrounds in turn (12 prompts cover every pair
    at both sizes); train: ``train_prompts`` scenes moved to the centre."""
    rng = np.random.default_rng([seed, 3])
    if split == "heldout":
        backgrounds = list(BACKGROUNDS)
        scenes = [Scene((ShapeObject(shape, color, size, "center"),), backgrounds[(i + j) % 3])
                  for j, size in enumerate(("large", "small")) for i, (color, shape) in enumerate(sorted(HELDOUT_PAIRS))]
    else:
        scenes = [dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], position="center"),))
                  for _, s in train_prompts(n, seed=seed)]
    return [(caption(scene, rng, background=True), scene) for scene in scenes[:n]]


def mean_se(values: list[float]) -> str:
    a = np.asarray(values, float)
    return f"{a.mean():.2f} ± {a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else 0:.2f}"


def reference(pipe, prompts: list[tuple[str, object]], seeds: int) -> float:
    """The 2D model's own images of the prompts, judged as views are: the share right (colour and shape)."""
    rights = []
    for prompt, scene in prompts:
        images = pipe.generate(prompt, num_images=seeds, seed=0, output="np")
        rights.append(judge_views(list((images * 255).round().astype(np.uint8)) if images.dtype != np.uint8
                                  else list(images), scene)["right"])
    return float(np.mean(rights))


def fixed_points(pipe, prompts: list[tuple[str, Scene]], guidances: list[float], seed: int) -> None:
    """The SDS target's RMS pixel error from the prompts' ground-truth renders (``fixed_point_error``) per
    guidance and flow time: the model and the data's renderer only, no judge and no asset."""
    images = torch.stack([torch.from_numpy(render(scene, pipe.default_size)).permute(2, 0, 1).float() / 255
                          for _, scene in prompts])
    times = [0.1, 0.3, 0.5, 0.7, 0.9]
    print("| guidance | " + " | ".join(f"t = {t}" for t in times) + " | mean |")
    print("|---" * (len(times) + 2) + "|")
    for guidance in guidances:
        errors = fixed_point_error(pipe, images, [p for p, _ in prompts], guidance, times,
                                   torch.Generator().manual_seed(seed))
        print(f"| {guidance:g} | " + " | ".join(f"{e:.3f}" for e in errors) + f" | {np.mean(errors):.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--split", default="heldout", choices=["heldout", "train"])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--first", type=int, default=0, help="skip the set's first prompts (split a run over processes)")
    ap.add_argument("--seed", type=int, default=0, help="prompt set seed (the SDS seed is the config's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--reference", type=int, default=0, metavar="N", help="also judge the 2D model's own images")
    ap.add_argument("--jsonl", default=None, help="append one JSON row per prompt")
    ap.add_argument("--reference-only", action="store_true", help="only the 2D model's own images (--reference N)")
    ap.add_argument("--fixed-point", default=None, metavar="G1,G2,...",
                    help="only the SDS target's error from the prompts' ground-truth renders at these guidances")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = build_config(SDSConfig, {}, None, None, dict(parse_override(o) for o in args.overrides))
    pipe = load(args.model)
    prompts = centred_prompts(args.split, args.prompts, args.seed)[args.first:]
    changed = {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(SDSConfig(), k)}
    print(f"{args.split} prompts: {len(prompts)}, settings: {changed or 'defaults'}")
    if args.fixed_point:
        fixed_points(pipe, prompts, [float(g) for g in args.fixed_point.split(",")], args.seed)
        return
    if args.reference_only:
        print(f"2D model's own images ({args.reference} per prompt): right {reference(pipe, prompts, args.reference):.2f}")
        return
    print("| prompt | views right | all attributes | consistency | area CV | CPU min | readings |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for prompt, _ in prompts:
        plan = plan_prompt(pipe, prompt)
        result = distill(pipe, plan, cfg)
        ev, _ = evaluate(result, pipe.default_size, cfg.eval_views, cfg.extent)
        row = {"prompt": prompt, **{k: ev[k] for k in ("right", "all_right", "consistency", "area_cv", "readings")},
               "cpu_min": result.cpu_seconds / 60, "settings": changed}
        rows.append(row)
        common = max(set(ev["readings"]), key=ev["readings"].count)
        print(f"| {prompt} | {ev['right']:.2f} | {ev['all_right']:.2f} | {ev['consistency']:.2f} | "
              f"{ev['area_cv']:.3f} | {row['cpu_min']:.2f} | {common} |", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    col = lambda k: [r[k] for r in rows]
    print(f"\nviews right {mean_se(col('right'))}; all attributes {mean_se(col('all_right'))}; prompts with >= 0.8 "
          f"of views right {np.mean([r >= 0.8 for r in col('right')]):.2f}; consistency {mean_se(col('consistency'))}; "
          f"area CV {np.mean(col('area_cv')):.3f}; CPU min per asset {np.mean(col('cpu_min')):.2f} "
          f"(max {max(col('cpu_min')):.2f})")
    if args.reference:
        t0 = time.process_time()
        print(f"2D model's own images ({args.reference} per prompt): right {reference(pipe, prompts, args.reference):.2f}"
              f" ({time.process_time() - t0:.0f} CPU s)")


if __name__ == "__main__":
    main()
