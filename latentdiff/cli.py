"""``latentdiff <command>``: thin glue between argparse and the library.

Every training-like command takes ``--preset NAME``, ``--config FILE.toml`` and ``--set key=value``
overrides (applied in that order, after the defaults), plus a few common flags as shortcuts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.config import add_config_args, config_from_args


@dataclass
class GenerateConfig:
    """``latentdiff generate``: sampling settings (prompts come from the command line)."""

    model: str = "outputs/demo/model/model"  # model folder
    negative_prompt: str = ""  # what to steer away from
    steps: int = 20  # sampler steps
    sampler: str = "dpmpp_2m"  # sampler name (any alias, e.g. "DPM++ 2M Karras")
    schedule: str = ""  # sigma grid ("karras", "exponential", "trailing", ...); empty: the sampler's default
    guidance: float = 5.0  # classifier-free guidance scale (1 = off)
    guidance_rescale: float = 0.0  # guidance rescale phi (Lin et al. 2023)
    seed: int = 0  # noise seed
    height: int = 0  # pixels (0: the model's training size)
    width: int = 0  # pixels (0: the model's training size)
    num_images: int = 1  # images per prompt
    grid: bool = False  # write one grid instead of numbered files
    precision: str = "fp32"  # "fp32" or "bf16"
    out: str = "out.png"  # output file (numbered when several images)
    tokenizer: str = ""  # single-file SD checkpoints: a CLIP tokenizer folder or a diffusers SD folder
    labels: tuple = ()  # class-conditional models: class names or indices (one, or one per prompt)
    original_size: tuple = ()  # size-conditioned models: (height, width) announced as the original; () = the output size
    crop_top_left: tuple = (0, 0)  # size-conditioned models: (top, left) crop announced
    tiled: str = "auto"  # decode in tiles: "auto" (latents over 128x128), "on" or "off"
    decode_precision: str = "fp32"  # "fp32", "bf16" or "fp16" (falls back to fp32 when not finite)
    preview_every: int = 0  # write a preview-decoder image every N sampler steps (0: none)
    preview_dir: str = ""  # folder for the preview images (step_NNN.png)


@dataclass
class DemoConfig:
    """``latentdiff demo``: train everything on the built-in shapes set, generate, judge."""

    out: str = "outputs/demo"  # folder for all stages
    eval_prompts: int = 64  # prompts generated and judged per set (held-out, training): one standard error ~0.06
    steps: int = 20  # sampler steps for the grid
    sampler: str = "dpmpp_2m"  # sampler
    schedule: str = "default"  # sigma grid; "default": the model's own (flow for the demo's rectified-flow U-Net)
    guidance: float = 4.0  # CFG scale
    seed: int = 0  # generation seed
    vae_preset: str = "shapes-demo"  # train-vae preset
    cache_preset: str = "shapes-demo"  # cache preset
    train_preset: str = "shapes-demo"  # train preset
    vae: dict = field(default_factory=dict)  # extra train-vae keys (see `train-vae --help`)
    cache: dict = field(default_factory=dict)  # extra cache keys
    train: dict = field(default_factory=dict)  # extra train keys


DEMO_PRESETS: dict[str, dict] = {
    "shapes-demo": {},
    "shapes-demo-minilm": {"train_preset": "shapes-demo-minilm", "cache_preset": "shapes-demo-minilm"},
    "shapes-64": {"vae_preset": "shapes", "cache_preset": "shapes", "train_preset": "shapes"},
    "shapes-test": {"eval_prompts": 4, "steps": 2, "vae_preset": "shapes-test", "cache_preset": "shapes-test",
                    "train_preset": "shapes-test"},
}


def cmd_train_vae(args) -> None:
    from latentdiff.train.vae import VAE_PRESETS, VAETrainConfig, train_vae

    cfg = config_from_args(VAETrainConfig, VAE_PRESETS, args,
                           {"out": args.out, "data": args.data, "steps": args.steps, "resume": args.resume or None,
                            "dry_run": args.dry_run or None})
    _print_result(train_vae(cfg))


def cmd_latent_stats(args) -> None:
    from latentdiff.train.latent_stats import LatentStatsConfig, latent_stats

    cfg = config_from_args(LatentStatsConfig, {}, args, {"autoencoder": args.autoencoder, "data": args.data})
    print(json.dumps(latent_stats(cfg)))


def cmd_distill_preview(args) -> None:
    from latentdiff.train.preview import PreviewTrainConfig, distill_preview_command

    cfg = config_from_args(PreviewTrainConfig, {}, args, {"autoencoder": args.autoencoder, "data": args.data,
                                                          "out": args.out, "steps": args.steps})
    print(distill_preview_command(cfg))


def cmd_cache(args) -> None:
    from latentdiff.data.cache import CACHE_PRESETS, CacheConfig, cache_dataset

    cfg = config_from_args(CacheConfig, CACHE_PRESETS, args, {"out": args.out, "autoencoder": args.autoencoder,
                                                              "data": args.data})
    print(cache_dataset(cfg))


def cmd_train(args) -> None:
    from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser

    cfg = config_from_args(TrainConfig, TRAIN_PRESETS, args, {"out": args.out, "cache": args.cache,
                                                              "steps": args.steps, "resume": args.resume or None,
                                                              "dry_run": args.dry_run or None})
    _print_result(train_denoiser(cfg))


def _print_result(result) -> None:
    """A training command prints the folder it wrote (rank 0 only), or the dry-run report."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    print(json.dumps(result, indent=2) if isinstance(result, dict) else result)


def cmd_posthoc_ema(args) -> None:
    from latentdiff.train.posthoc_export import export

    print(export(args.run, args.sigma_rel, args.out, step=args.step, template=args.template))


def cmd_generate(args) -> None:
    from latentdiff.pipeline import load, save_images

    cfg = config_from_args(GenerateConfig, {}, args, {
        "model": args.model, "negative_prompt": args.negative_prompt, "steps": args.steps, "sampler": args.sampler,
        "schedule": args.schedule, "guidance": args.guidance, "seed": args.seed, "height": args.height,
        "width": args.width, "num_images": args.num_images, "grid": args.grid or None, "out": args.out,
        "precision": args.precision, "tokenizer": args.tokenizer, "labels": tuple(args.label) if args.label else None,
        "original_size": tuple(args.original_size) if args.original_size else None,
        "crop_top_left": tuple(args.crop_top_left) if args.crop_top_left else None, "tiled": args.tiled,
        "decode_precision": args.decode_precision,
        **({"preview_every": _count(args.preview_every[0], "--preview-every N"), "preview_dir": args.preview_every[1]}
           if args.preview_every else {}),
    })
    if cfg.tiled not in ("auto", "on", "off"):
        raise ValueError(f"tiled must be 'auto', 'on' or 'off', got {cfg.tiled!r}")
    prompts = [p for p in args.prompts if p.strip()] or ([""] if cfg.labels else [])
    if not prompts:
        raise ValueError("no prompt given: latentdiff generate \"a large red circle on the left\" --model DIR")
    out = Path(cfg.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"output {out} must end in .png")
    pipe = load(cfg.model, precision=cfg.precision, **({"tokenizer": cfg.tokenizer} if cfg.tokenizer else {}))
    images = pipe.generate(prompts, negative_prompt=cfg.negative_prompt, steps=cfg.steps, sampler=cfg.sampler,
                           schedule=cfg.schedule or None, guidance=cfg.guidance, seed=cfg.seed,
                           height=cfg.height or None, width=cfg.width or None, num_images=cfg.num_images,
                           guidance_rescale=cfg.guidance_rescale, label=list(cfg.labels) or None,
                           original_size=tuple(cfg.original_size) or None, crop_top_left=tuple(cfg.crop_top_left),
                           **_decode_options(cfg))
    w, h = images[0].size
    params = {"prompt": prompts if len(prompts) > 1 else prompts[0], "negative_prompt": cfg.negative_prompt,
              "steps": cfg.steps, "sampler": cfg.sampler, "schedule": cfg.schedule, "guidance": cfg.guidance,
              "guidance_rescale": cfg.guidance_rescale, "seed": cfg.seed, "width": w, "height": h,
              "model": str(Path(cfg.model).resolve()), "num_images": cfg.num_images,
              **({"label": list(cfg.labels)} if cfg.labels else {}),
              **({"original_size": list(cfg.original_size)} if cfg.original_size else {})}
    for path in save_images(images, out, params, grid=cfg.grid):
        print(path)


def _count(text: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{what} must be a positive whole number, got {text!r}")
    return int(text)


def _decode_options(cfg: GenerateConfig) -> dict:
    """``generate``'s tiling, decode precision and preview settings as ``Pipeline.generate`` keywords."""
    options = {"tiled": {"auto": None, "on": True, "off": False}[cfg.tiled], "decode_precision": cfg.decode_precision}
    if cfg.preview_every:
        if not cfg.preview_dir:
            raise ValueError("preview_every needs preview_dir: --preview-every N DIR")
        from latentdiff.images import save_png

        folder = Path(cfg.preview_dir)
        folder.mkdir(parents=True, exist_ok=True)
        options.update(preview_every=cfg.preview_every,
                       preview=lambda step, image: print(save_png(image, folder / f"step_{step:03d}.png"),
                                                         file=sys.stderr))
    return options


def cmd_eval_vae(args) -> None:
    from latentdiff.eval.vae import VAEEvalConfig, evaluate_vae

    cfg = config_from_args(VAEEvalConfig, {}, args, {"model": args.model, "data": args.data, "out": args.out,
                                                     "extractor": args.extractor, "feature_path": args.feature_path})
    report = evaluate_vae(cfg)
    print(json.dumps({k: report[k] for k in ("psnr", "ssim", "images", "rfid", "grid") if k in report}, indent=2))


def cmd_demo(args) -> None:
    from latentdiff.demo import run_demo

    cfg = config_from_args(DemoConfig, DEMO_PRESETS, args, {"out": args.out})
    report = run_demo(cfg)
    print(json.dumps(report["summary"], indent=2))


def cmd_judge(args) -> None:
    from latentdiff.data.judge import validate

    print(json.dumps(validate(n=args.n, size=args.size, seed=args.seed), indent=2))


def cmd_check_data(args) -> None:
    from latentdiff.data.health import check_data

    report = check_data(args.data, min_size=args.min_size, near_bits=args.near_bits, bucket_area=args.bucket_area,
                        bucket_step=args.bucket_step)
    print(report.to_text())
    if args.json:
        from dataclasses import asdict

        from latentdiff.io import write_json

        write_json(args.json, {**asdict(report), "problems": report.problems})
    if report.problems:
        raise SystemExit(1)


def cmd_convert(args) -> None:
    from latentdiff.interop.convert import convert

    overrides = json.loads(args.overrides_json) if args.overrides_json else None
    convert(args.src, args.dst, args.format, tokenizer=args.tokenizer, prediction=args.prediction,
            **({"overrides": overrides} if overrides else {}))


def build_parser() -> argparse.ArgumentParser:
    from latentdiff.data.cache import CACHE_PRESETS, CacheConfig
    from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig
    from latentdiff.train.vae import VAE_PRESETS, VAETrainConfig

    parser = argparse.ArgumentParser(prog="latentdiff", description="Latent diffusion: train, generate, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train a small model on the built-in shapes set, generate and judge (~15 min)",
                       description="Train an autoencoder and a text-conditioned denoiser on the built-in shapes set, "
                                   "generate held-out prompts, and score them with the judge.")
    add_config_args(p, DEMO_PRESETS, DemoConfig)
    p.add_argument("--out", default=None, help="output folder (default outputs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-vae", help="train an autoencoder", description="Train a KL autoencoder; writes "
                       "OUT/autoencoder with its latent scale and shift.")
    add_config_args(p, VAE_PRESETS, VAETrainConfig)
    p.add_argument("--out", default=None, help="run folder")
    p.add_argument("--data", default=None, help="'shapes', a folder of images, or tar shards (crop=random and "
                   "buckets=true also for folders)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="time a few steps; report step time, peak memory, ETA")
    p.set_defaults(func=cmd_train_vae)

    p = sub.add_parser("cache", help="encode a data set into a latent cache",
                       description="Encode a data set once with an autoencoder into safetensors shards.")
    add_config_args(p, CACHE_PRESETS, CacheConfig)
    p.add_argument("--autoencoder", default=None, help="autoencoder folder (train-vae's OUT/autoencoder)")
    p.add_argument("--data", default=None, help="'shapes', a folder of images, or tar shards (a folder of .tar, "
                   "a glob, or 'shard-{000..009}.tar')")
    p.add_argument("--out", default=None, help="cache folder to write")
    p.set_defaults(func=cmd_cache)

    from latentdiff.train.latent_stats import LatentStatsConfig

    p = sub.add_parser("latent-stats", help="compute an autoencoder's latent scale/shift and store them in its config",
                       description="Measure the latent scale and shift (optionally per channel) of a saved "
                                   "autoencoder on a data set and rewrite its config.json.")
    add_config_args(p, {}, LatentStatsConfig)
    p.add_argument("--autoencoder", default=None, help="autoencoder folder")
    p.add_argument("--data", default=None, help="'shapes' or a folder of images")
    p.set_defaults(func=cmd_latent_stats)

    from latentdiff.train.preview import PreviewTrainConfig

    p = sub.add_parser("distill-preview", help="distill a tiny preview decoder from an autoencoder",
                       description="Train a small, fast decoder (TAESD-style) to imitate an autoencoder's decoder.")
    add_config_args(p, {}, PreviewTrainConfig)
    p.add_argument("--autoencoder", default=None, help="autoencoder folder (the teacher)")
    p.add_argument("--data", default=None, help="'shapes', 'skimage' or a folder of images")
    p.add_argument("--out", default=None, help="folder for the preview decoder")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.set_defaults(func=cmd_distill_preview)

    from latentdiff.eval.vae import VAEEvalConfig

    p = sub.add_parser("eval-vae", help="held-out PSNR, SSIM and rFID of an autoencoder, and a reconstruction grid",
                       description="Reconstruct held-out images (shapes: unseen renders; skimage: the held-out "
                                   "photographs; or a folder) and write OUT/report.json and OUT/grid.png.")
    add_config_args(p, {}, VAEEvalConfig)
    p.add_argument("--model", default=None, help="autoencoder folder, or a model folder holding autoencoder/")
    p.add_argument("--data", default=None, help="'shapes', 'skimage' or a folder of held-out images")
    p.add_argument("--out", default=None, help="folder for report.json and grid.png")
    p.add_argument("--extractor", default=None, choices=["auto", "shapes", "inception", "inception-tf1", "dinov2", "none"],
                   help="rFID feature space (auto: the shapes net for shapes data, else Inception)")
    p.add_argument("--feature-path", default=None, help="extractor weights: shapes-net folder, Inception .pth, "
                   "or DINOv2 folder")
    p.set_defaults(func=cmd_eval_vae)

    p = sub.add_parser("train", help="train a text-conditioned latent denoiser",
                       description="Train a denoiser on a latent cache; writes OUT/model, a model folder.")
    add_config_args(p, TRAIN_PRESETS, TrainConfig)
    p.add_argument("--cache", default=None, help="latent cache folder")
    p.add_argument("--out", default=None, help="run folder")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--dry-run", action="store_true", help="time a few steps; report step time, peak memory, ETA")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check-data", help="report corrupt, tiny, duplicate and uncaptioned images in a folder",
                       description="Read every image in a folder once and report corrupt, tiny, exact- and "
                                   "near-duplicate files, missing captions, and size / aspect histograms. "
                                   "Exit status 1 when corrupt, tiny or duplicate files were found.")
    p.add_argument("data", help="folder of images, or tar shards (a folder of .tar, a glob, or a {000..009} range)")
    p.add_argument("--min-size", type=int, default=64, help="shorter sides below this are 'tiny' (default 64)")
    p.add_argument("--near-bits", type=int, default=4,
                   help="near duplicates: 64-bit difference hashes at most this many bits apart (default 4)")
    p.add_argument("--bucket-area", type=int, default=0, help="also count aspect-ratio buckets of this area")
    p.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this (default 64)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=cmd_check_data, preset=None)

    p = sub.add_parser("posthoc-ema", help="reconstruct an EMA of any length from post-hoc EMA snapshots",
                       description="Combine a run's power-function EMA snapshots (train with posthoc_every > 0) "
                                   "into the EMA of the given relative length (Karras et al. 2024) and write a "
                                   "loadable model (or autoencoder) folder.")
    p.add_argument("run", help="run folder (holds posthoc_ema/)")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative EMA length, e.g. 0.05 or 0.10")
    p.add_argument("--step", type=int, default=None, help="reconstruct at this step (default: the last snapshot)")
    p.add_argument("--template", default=None, help="folder to take the other components and config from "
                   "(default RUN/model or RUN/autoencoder)")
    p.add_argument("-o", "--out", required=True, help="folder to write")
    p.set_defaults(func=cmd_posthoc_ema)

    p = sub.add_parser("generate", help="generate images from prompts",
                       description="Generate images; each PNG carries its parameters in a text chunk.")
    p.add_argument("prompts", nargs="*", help="one or more prompts")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="TOML file of generate settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting")
    p.add_argument("--model", default=None, help="model folder")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sampler", default=None, help="e.g. dpmpp_2m, euler, heun, ddim, 'DPM++ 2M Karras'")
    p.add_argument("--schedule", default=None, help="sigma grid: karras, exponential, trailing, leading, linspace")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=None, help="images per prompt")
    p.add_argument("--grid", action="store_true", help="write one grid image")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    p.add_argument("-o", "--out", default=None, help="output .png")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="single-file checkpoints: the model's "
                   "diffusers folder (tokenizer/, and tokenizer_2/ for SDXL and SD3) or, for SD 1.x/2.x, a CLIP "
                   "tokenizer folder (vocab.json + merges.txt)")
    p.add_argument("--original-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="size-conditioned models: the original size to announce (default: the output size)")
    p.add_argument("--crop-top-left", type=int, nargs=2, default=None, metavar=("TOP", "LEFT"),
                   help="size-conditioned models: the crop offset to announce (default 0 0)")
    p.add_argument("--label", action="append", default=None, metavar="CLASS", help="class-conditional models: a "
                   "class name or index (repeat for several; one prompt, or none, is used for every label)")
    p.add_argument("--tiled", nargs="?", const="on", default=None, choices=["auto", "on", "off"],
                   help="decode in tiles (bare --tiled: on; default auto: latents over 128x128 positions)")
    p.add_argument("--decode-precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="decode precision; falls back to fp32 when the output is not finite")
    p.add_argument("--preview-every", nargs=2, default=None, metavar=("N", "DIR"),
                   help="every N steps write the preview decoder's image to DIR/step_NNN.png")
    p.set_defaults(func=cmd_generate, preset=None)

    p = sub.add_parser("convert", help="convert a checkpoint to a latentdiff or diffusers folder",
                       description="Read a latentdiff folder, a diffusers SD/SDXL folder or a single-file SD "
                                   "1.x/2.x/XL checkpoint (.safetensors, or .ckpt without pickle code) and write it "
                                   "as a latentdiff or diffusers folder. Prints what it detected and loaded.")
    p.add_argument("src", help="model folder or checkpoint file")
    p.add_argument("dst", help="folder to write (replaced atomically)")
    p.add_argument("--format", default="latentdiff", choices=["latentdiff", "diffusers"])
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="single files: the model's diffusers folder "
                   "(tokenizer/, and tokenizer_2/ for SDXL and SD3) or, for SD 1.x/2.x, a CLIP tokenizer folder")
    p.add_argument("--prediction", default=None, choices=["eps", "v"], help="single files: override the detected "
                   "prediction type (SD 2.x files default to v; the 512px -base models are eps)")
    p.add_argument("--overrides-json", default=None, metavar="JSON", help='single files: config fields the shapes '
                   'cannot tell, e.g. \'{"unet": {"num_heads": 8}, "vae": {"norm_groups": 32}}\'')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("judge", help="validate the shapes judge on rendered ground truth",
                       description="Render shapes images and report how often the judge reads them back right.")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_judge)

    from latentdiff.eval.cli import add_commands as add_eval_commands

    add_eval_commands(sub)  # eval, train-features, duplicates
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
