"""Evaluate a trained shapes model over sampler steps and guidance, and time the evaluation of 1,000 samples.

    python benchmarks/eval_demo.py sweep --model outputs/demo/model/model --feature-path NET --samplers dpmpp_2m \
        --steps 1 2 5 10 20 50 --guidance 1 2 4 7 --out outputs/eval_bench
    python benchmarks/eval_demo.py time --model outputs/demo/model/model --feature-path NET --n 1000

``sweep`` runs ``latentdiff.eval.run.run_eval`` and prints one markdown row per setting (the report's
JSON and HTML land in --out). ``time`` generates --gen images at the base setting, measures the
seconds per generated image, and times features + FID/KID/precision-recall + judge on 1,000 images.
"""

from __future__ import annotations

import argparse
import time

import torch

from latentdiff.eval.alignment import judge_accuracy
from latentdiff.eval.features import extract, make_extractor
from latentdiff.eval.run import (
    PROMPT_SEED,
    REFERENCE_SEED,
    EvalConfig,
    distribution_metrics,
    generate,
    run_eval,
    shapes_captions,
    shapes_images,
)
from latentdiff.images import to_pil
from latentdiff.pipeline import load

FLOOR_SEED = 7_000_101  # rendered images standing in for a perfect generator


def sweep(args) -> None:
    cfg = EvalConfig(model=args.model, out=args.out, feature_path=args.feature_path, n_samples=args.n,
                     n_reference=args.n_reference, n_judge=args.n_judge, samplers=tuple(args.samplers),
                     steps=tuple(args.steps), guidance=tuple(args.guidance), base_sampler=args.samplers[0],
                     memorization=args.memorization, cache_dir=args.cache_dir, batch_size=args.batch_size)
    report = run_eval(cfg)
    print("| sampler | steps | guidance | FID | KID x1e3 (± s.e.) | precision | recall | judge held-out: color "
          "| shape | position | all | judge captions: all | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["settings"]:
        h, c = r["judge_heldout"], r["judge_train_captions"]
        print(f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['fid']:.2f} | {1e3 * r['kid']['mean']:.1f} ± "
              f"{1e3 * r['kid']['stderr']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} | {h['color']:.3f} | "
              f"{h['shape']:.3f} | {h['position']:.3f} | {h['all_correct']:.3f} | {c['all_correct']:.3f} | "
              f"{r['seconds']['total']:.0f} |")
    if "memorization" in report:
        for space in ("pixels", "features"):
            m = report["memorization"][space]
            print(f"memorization ({space}): {m['near_copy_rate']:.3f} flagged (expected ~{m['expected_rate_without_copying']} "
                  f"without copying), threshold {m['threshold']:.4g}, median nearest distance {m['distance_median']:.4g}")


def time_1000(args) -> None:
    pipe = load(args.model)
    size = pipe.default_size
    extractor = make_extractor("shapes", args.feature_path)
    prompts, scenes = shapes_captions(args.n, size, PROMPT_SEED)
    t0 = time.time()
    images = generate(pipe, prompts[:args.gen], steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                      seed=0, batch_size=args.batch_size)
    per_image = (time.time() - t0) / args.gen
    # The metric stages on n images: rendered stand-ins of the same captions' distribution where fewer were made.
    stand_in = shapes_images(args.n, size, seed=PROMPT_SEED)
    stand_in[:len(images)] = images
    t = time.time()
    real = extract(extractor, shapes_images(args.n, size, seed=REFERENCE_SEED), args.batch_size)
    t_ref = time.time() - t
    t = time.time()
    fake = extract(extractor, stand_in, args.batch_size)
    t_feat = time.time() - t
    t = time.time()
    distribution_metrics(real, fake, kid_subset=100, kid_subsets=50, pr_k=3)
    t_metrics = time.time() - t
    t = time.time()
    judge_accuracy(to_pil(stand_in), scenes)
    t_judge = time.time() - t
    print("| stage | seconds for 1,000 |\n|---|---|")
    print(f"| generate ({args.sampler}, {args.steps} steps, CFG {args.guidance:g}; measured on {args.gen}, scaled) | "
          f"{per_image * args.n:.0f} |")
    print(f"| shapes-net features of the generated images | {t_feat * 1000 / args.n:.1f} |")
    print(f"| FID + KID (50 subsets of 100) + precision/recall (k=3) | {t_metrics * 1000 / args.n:.1f} |")
    print(f"| judge (per-attribute accuracy against the captions) | {t_judge * 1000 / args.n:.1f} |")
    print(f"| reference features (once; cached on disk afterwards) | {t_ref * 1000 / args.n:.1f} |")
    # The floor: real images (rendered, not generated) scored exactly like a generated set of --floor-n.
    floor = shapes_images(args.floor_n, size, seed=FLOOR_SEED)
    m = distribution_metrics(real, extract(extractor, floor, args.batch_size), kid_subset=100, kid_subsets=50, pr_k=3)
    print(f"\nfloor, {args.floor_n} rendered images vs the {args.n} reference: FID {m['fid']:.2f}, "
          f"KID x1e3 {1e3 * m['kid']['mean']:.1f} ± {1e3 * m['kid']['stderr']:.1f}, precision {m['precision']:.3f}, "
          f"recall {m['recall']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("sweep")
    p.add_argument("--model", required=True)
    p.add_argument("--feature-path", default="")
    p.add_argument("--out", default="outputs/eval_bench")
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m", "euler", "heun"])
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 5, 10, 20, 50])
    p.add_argument("--guidance", nargs="+", type=float, default=[1.0, 2.0, 4.0, 7.0])
    p.add_argument("--n", type=int, default=72, help="generated images per setting")
    p.add_argument("--n-reference", type=int, default=1000)
    p.add_argument("--n-judge", type=int, default=16)
    p.add_argument("--memorization", action="store_true")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--batch-size", type=int, default=96)
    p.set_defaults(func=sweep)
    p = sub.add_parser("time")
    p.add_argument("--model", required=True)
    p.add_argument("--feature-path", default="")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--gen", type=int, default=1000, help="images actually generated (the rest is scaled)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--floor-n", type=int, default=72, help="size of the real-vs-real floor set")
    p.set_defaults(func=time_1000)
    args = parser.parse_args()
    torch.manual_seed(0)
    args.func(args)


if __name__ == "__main__":
    main()
