"""``latentdiff eval``, ``latentdiff train-features`` and ``latentdiff duplicates``: argparse glue over latentdiff.eval."""

from __future__ import annotations

import json

EVAL_PRESETS: dict[str, dict] = {
    "full": {},
    # A few minutes on 2 CPU cores for the demo model: one sampler, two step counts, two guidance scales.
    "quick": {"samplers": ("dpmpp_2m",), "steps": (5, 20), "guidance": (1.0, 4.0), "n_samples": 128,
              "n_reference": 500, "n_judge": 32, "train_images": 2000},
}


def cmd_eval(args) -> None:
    from latentdiff.config import config_from_args
    from latentdiff.eval.run import EvalConfig, evaluate_samples, run_eval

    cfg = config_from_args(EvalConfig, EVAL_PRESETS, args, {"model": args.model, "out": args.out,
                                                            "extractor": args.extractor,
                                                            "feature_path": args.feature_path, "clip": args.clip,
                                                            "n_samples": args.n_samples, "reference": args.reference,
                                                            "samples": args.samples})
    if cfg.samples:
        report = evaluate_samples(cfg)
        print(json.dumps({"report": f"{cfg.out}/report.html", "n_samples": report["n_samples"],
                          "n_reference": report["reference"]["n"],
                          **{k: report[k] for k in ("fid", "kid", "precision", "recall") if k in report}}, indent=2))
        return
    report = run_eval(cfg)
    best = min(report["settings"], key=lambda r: r["fid"])
    print(json.dumps({"report": f"{cfg.out}/report.html", "settings": len(report["settings"]),
                      "best_fid": {k: best[k] for k in ("sampler", "steps", "guidance", "fid")}}, indent=2))


def cmd_train_features(args) -> None:
    from latentdiff.eval.shapes_net import ShapesNetConfig, default_path, train_shapes_net

    cfg = ShapesNetConfig(**({"steps": args.steps} if args.steps else {}))
    print(train_shapes_net(args.out or default_path(), cfg))


def cmd_duplicates(args) -> None:
    import torch

    from latentdiff.data import make_image_dataset
    from latentdiff.eval.memorization import find_duplicates, pixels

    data = make_image_dataset(args.data, args.n, args.size, args.seed)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    out = find_duplicates(pixels(images, args.compare_size), threshold=args.threshold)
    print(json.dumps({k: out[k] for k in ("n", "metric", "threshold", "duplicate_images", "groups")}))


def add_commands(sub) -> None:
    """Register the evaluation commands on the main parser's subparsers."""
    from latentdiff.config import add_config_args
    from latentdiff.eval.run import EvalConfig

    p = sub.add_parser("eval", help="evaluate a model: FID/KID/precision-recall, judge, memorization; JSON + HTML",
                       description="Sweep sampler steps and guidance; write OUT/report.json and OUT/report.html.")
    add_config_args(p, EVAL_PRESETS, EvalConfig)
    p.add_argument("--model", default=None, help="model folder")
    p.add_argument("--out", default=None, help="report folder")
    p.add_argument("--extractor", default=None, choices=["shapes", "inception", "inception-tf1", "dinov2"],
                   help="feature space (inception-tf1: resized as torch-fidelity/torchmetrics do)")
    p.add_argument("--feature-path", default=None, help="extractor weights: shapes-net folder, Inception .pth, "
                   "or DINOv2 folder")
    p.add_argument("--clip", default=None, help="local CLIP folder for CLIP score")
    p.add_argument("--n-samples", type=int, default=None, help="generated images per setting")
    p.add_argument("--reference", default=None, metavar="DIR", help="folder of reference images (any sizes: resized "
                   "to cover the evaluation size and centre-cropped; features cached); default: the shapes set")
    p.add_argument("--samples", default=None, metavar="DIR", help="evaluate this folder of generated images (all one "
                   "square size, never resized) against the reference, instead of generating with --model")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train-features", help="train the shapes feature network for shapes-domain FID/KID",
                       description="Train the small shapes attribute CNN (about a minute on a quiet 2-core CPU).")
    p.add_argument("--out", default=None, help="folder to write (default ~/.cache/latentdiff/shapes_net)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.set_defaults(func=cmd_train_features)

    p = sub.add_parser("duplicates", help="find near-duplicate images in a data set",
                       description="Pairs of images closer than a pixel RMSE threshold (0..1 scale), and their groups.")
    p.add_argument("--data", default="shapes", help="'shapes' or a folder of images")
    p.add_argument("--n", type=int, default=1000, help="shapes: number of images")
    p.add_argument("--size", type=int, default=32, help="image size loaded")
    p.add_argument("--seed", type=int, default=0, help="shapes: data set seed")
    p.add_argument("--compare-size", type=int, default=None, help="resize to this before comparing (faster)")
    p.add_argument("--threshold", type=float, default=None, help="pixel RMSE (default 0.02)")
    p.set_defaults(func=cmd_duplicates)
