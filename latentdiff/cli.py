"""``latentdiff <command>``: thin glue between argparse and the library.

Every training-like command takes ``--preset NAME``, ``--config FILE.toml`` and ``--set key=value``
overrides (applied in that order, after the defaults), plus a few common flags as shortcuts.

Errors: whatever a command raises ends as one line on stderr that says what failed, where (the file, the key)
and what to do, and a non-zero exit status (2; 1 for an error latentdiff did not foresee, a bug); ``--debug``
or ``LATENTDIFF_DEBUG=1`` prints the traceback too. Ctrl-C is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import sys
import traceback
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.backends import BACKENDS
from latentdiff.config import (
    COUNT,
    FINITE,
    add_config_args,
    add_options,
    at_least,
    between,
    bounds,
    config_from_args,
)
from latentdiff.diffusion.schedules import GRIDS
from latentdiff.io import check_writable
from latentdiff.model_index import DEFAULT_GENERATION, GUIDANCE_METHODS, GenerateRequest, GenerationSettings

DEFAULT_MODEL = "default"  # the bundled default model (latentdiff/default/)


def _opt(default, help: str, **argparse_kw):
    """A setting declared once: its default, its help, and how its command-line flag reads (argparse keywords,
    plus ``flags`` (default ``--the-name``) and ``to_config`` (the flag's value -> config keys))."""
    return field(default=default, metadata={"help": help, **argparse_kw})


def _preview_flag(value: list[str]) -> dict:
    n, folder = value
    if not n.isdigit() or int(n) < 1:
        raise ValueError(f"--preview-every N must be a positive whole number, got {n!r}")
    return {"preview_every": int(n), "preview_dir": folder}


def _outpaint_flag(text: str) -> dict:
    """``--outpaint left=32,right=32`` (sides left, top, right, bottom; the others 0) or ``--outpaint 32`` (all)."""
    sides = ("left", "top", "right", "bottom")
    if text.strip().isdigit():
        return {"outpaint": (int(text),) * 4}
    pixels = dict.fromkeys(sides, 0)
    for part in text.split(","):
        side, _, value = part.partition("=")
        side = side.strip()
        if side not in sides or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--outpaint {text!r}: expected SIDE=PIXELS pairs joined by commas, e.g. left=32,right=32 "
                             f"(sides {', '.join(sides)}), or one number for all four")
        pixels[side] = int(value)
    return {"outpaint": tuple(pixels.values())}


@dataclass
class GenerateConfig:
    """``latentdiff generate``: sampling settings (prompts come from the command line)."""

    model: str = _opt(DEFAULT_MODEL, "model folder (ours or a diffusers one) or single-file checkpoint; without "
                      "--model, the bundled default model (shapes, 32x32)", metavar="PATH")
    negative_prompt: str = _opt("", "what to steer away from", metavar="TEXT")
    steps: int | None = _opt(None, "sampler steps (default: the model's recommendation, else "
                             f"{DEFAULT_GENERATION.steps})", metavar="N")
    sampler: str | None = _opt(None, "sampler or alias: dpmpp_2m, euler, heun, ddim, 'DPM++ 2M Karras', ... "
                               f"(default: the model's recommendation, else {DEFAULT_GENERATION.sampler})",
                               metavar="NAME")
    schedule: str | None = _opt(None, "sigma grid (default: the model's recommendation, else the sampler's own "
                                "grid on the model's terms: 'flow' for flow models; 'default' is the model's "
                                "own grid: flow, trailing for 1000-step models, karras for EDM)", choices=sorted(GRIDS))
    guidance: float | None = _opt(None, "classifier-free guidance scale, 1 = off (default: the model's "
                                  f"recommendation, else {DEFAULT_GENERATION.guidance})", metavar="SCALE")
    guidance_method: str | None = _opt(None, "cfg (classifier-free), apg (adaptive projected, Sadat et al. 2024) or "
                                       "autoguidance (Karras et al. 2024; needs the model folder's guide/) (default: "
                                       f"the model's recommendation, else {DEFAULT_GENERATION.guidance_method})",
                                       choices=GUIDANCE_METHODS)
    pag_scale: float | None = _opt(None, "perturbed-attention guidance scale on top (Ahn et al. 2024; 0: off; "
                                   "default: the model's recommendation, else 0)", metavar="SCALE")
    guidance_rescale: float = _opt(0.0, "guidance rescale phi in [0, 1] (Lin et al. 2023)", metavar="PHI")
    guidance_interval: tuple = _opt((), "guide only where sigma_lo < sigma <= sigma_hi (Kynkaanniemi et al. 2024; "
                                    "default: everywhere)", nargs=2, type=float, metavar=("LO", "HI"))
    dynamic_threshold: float = _opt(0.0, "dynamic thresholding percentile, e.g. 0.995 (Saharia et al. 2022; 0: off)",
                                    metavar="P")
    seed: int = _opt(0, "noise seed")
    height: int | None = _opt(None, "pixels, a multiple of the autoencoder's factor (default: the model's training "
                              "size)")
    width: int | None = _opt(None, "pixels, a multiple of the autoencoder's factor (default: the model's training "
                             "size)")
    num_images: int = _opt(1, "images per prompt", metavar="N")
    grid: bool = _opt(False, "write one grid instead of numbered files")
    precision: str | None = _opt(None, "denoiser precision (default: fp32; with --backend openvino OpenVINO's hint, "
                                 "default bf16 where the CPU has it)", choices=("fp32", "bf16"))
    backend: str = _opt("torch", "what runs the networks: torch, openvino (compiled per size, cached under "
                        "$LATENTDIFF_CACHE/openvino), openvino-or-torch (torch for what OpenVINO cannot convert)",
                        choices=BACKENDS)
    int8: bool = _opt(False, "--backend openvino: the denoiser's weights in int8 (weight-only)")
    cache_interval: int = _opt(1, "DeepCache (U-Nets, torch backend): the whole network every N steps, only its "
                               "shallow path in between (1: off)", metavar="N")
    tome: float = _opt(0.0, "token merging (U-Nets, torch backend): merge this fraction of the tokens before each "
                       "self-attention of the highest-resolution transformer blocks (0: off; e.g. 0.5)",
                       metavar="RATIO")
    out: str = _opt("out.png", "output .png (numbered when several images); a video model's clips: .gif, .webp or "
                    ".mp4 (see --frames); an audio model's: .wav", flags=("-o", "--out"), metavar="FILE")
    tokenizer: str = _opt("", "single-file checkpoints: the model's diffusers folder (tokenizer/, and tokenizer_2/ "
                          "for SDXL and SD3) or, for SD 1.x/2.x, a CLIP tokenizer folder", metavar="DIR")
    labels: tuple = _opt((), "class-conditional models: a class name or index (repeat for several; one prompt, or "
                         "none, is used for every label)", flags=("--label",), action="append", metavar="CLASS",
                         to_config=lambda v: {"labels": tuple(v)})
    original_size: tuple = _opt((), "size-conditioned models: the original size to announce (default: the output "
                                "size)", nargs=2, type=int, metavar=("H", "W"))
    crop_top_left: tuple = _opt((0, 0), "size-conditioned models: the crop offset to announce", nargs=2, type=int,
                                metavar=("TOP", "LEFT"))
    tiled: str = _opt("auto", "decode in tiles: auto (latents over 128x128 positions), on (a bare --tiled), off",
                      nargs="?", const="on", choices=("auto", "on", "off"))
    decode_precision: str = _opt("fp32", "decode precision; falls back to fp32 when the output is not finite",
                                 choices=("fp32", "bf16", "fp16"))
    preview_every: int = _opt(0, "every N sampler steps write the preview decoder's image to DIR/step_NNN.png",
                              nargs=2, metavar=("N", "DIR"), to_config=_preview_flag)
    preview_dir: str = ""  # folder for the preview images (--preview-every N DIR)
    image: str = _opt("", "edit this image (img2img; with --mask inpainting, with --outpaint outpainting); the output "
                      "is its size unless --height / --width say otherwise", metavar="FILE")
    strength: float | None = _opt(None, "how far the image is noised before sampling, in (0, 1]: the share of the "
                                  "steps that are run; 1 repaints from pure noise (default: 0.8, with --mask or "
                                  "--outpaint 1)", metavar="S")
    mask: str = _opt("", "inpainting: white repaints, black keeps (grey is thresholded at 0.5)", metavar="FILE")
    outpaint: tuple = _opt((), "outpainting: pixels to add around the image, e.g. left=32,right=32 (sides left, top, "
                           "right, bottom; multiples of the autoencoder's factor) or 32 for all four",
                           metavar="SIDE=PX,...", to_config=_outpaint_flag)
    loras: tuple = _opt((), "attach a LoRA file (ours, diffusers / PEFT, kohya) at a strength (default 1); repeat "
                        "for several", flags=("--lora",), action="append", metavar="FILE[:WEIGHT]",
                        to_config=lambda v: {"loras": tuple(v)})
    frames: int | None = _opt(None, "video models (`latentdiff train-video`): frames per clip (default: the model's "
                              "clip length); writes the clips (numbered when several) in OUT's format: .gif, .webp "
                              "(lossless), .mp4 (H.264; needs `pip install av`; frames under 128 px enlarged by a "
                              "whole factor, nearest neighbour), .png: GIFs; and OUT with .png, the frames as a "
                              "grid, one row per clip", metavar="N")
    fps: float = _opt(8.0, "video models: frames per second of the written clips", metavar="FPS")
    seconds: float | None = _opt(None, "audio models (`latentdiff train-audio`): clip length in seconds (default: the "
                                 "model's); writes OUT with .wav (16-bit PCM, numbered when several) and OUT with "
                                 ".png, the mel spectrograms as a grid", metavar="S")
    paste_back: bool = _opt(True, "inpainting: keep the decoded pixels outside the mask instead of pasting the "
                            "image's own back", flags=("--no-paste-back",), const=False)
    mask_grow: int = _opt(1, "inpainting: latent cells the repainted region reaches beyond the mask while noise "
                          "dominates (the early steps), so an object at the mask's edge can form; 0 turns it off",
                          flags=("--mask-grow",), type=int, metavar="N")
    controls: tuple = _opt((), "ControlNet: a control image (edges, layout or depth map; resized to the output if "
                           "its size differs); repeat together with --controlnet, one per ControlNet",
                           flags=("--control",), action="append", metavar="FILE", to_config=lambda v: {"controls": tuple(v)})
    controlnets: tuple = _opt((), "ControlNet folder (train-controlnet's OUT/controlnet, or a diffusers "
                              "ControlNetModel folder) or original control_*.safetensors file, for the --control "
                              "of the same position",
                              flags=("--controlnet",), action="append", metavar="DIR",
                              to_config=lambda v: {"controlnets": tuple(v)})
    control_scales: tuple = _opt((), "ControlNet strength (default 1; once for all, or once per --controlnet)",
                                 flags=("--control-scale",), action="append", type=float, metavar="S",
                                 to_config=lambda v: {"control_scales": tuple(v)})
    control_starts: tuple = _opt((), "fraction of the steps where the ControlNet starts acting (default 0; once for "
                                 "all, or once per --controlnet)", flags=("--control-start",), action="append",
                                 type=float, metavar="A", to_config=lambda v: {"control_starts": tuple(v)})
    control_ends: tuple = _opt((), "fraction of the steps where it stops (default 1; once for all, or once per "
                               "--controlnet)", flags=("--control-end",), action="append", type=float, metavar="B",
                               to_config=lambda v: {"control_ends": tuple(v)})
    ip_image: str = _opt("", "IP-Adapter: the image prompt (a reference image whose look the output borrows; needs "
                         "--ip-adapter and --image-encoder)", metavar="FILE")
    ip_scale: float = _opt(1.0, "IP-Adapter: the image prompt's weight (0: none)", metavar="S")
    ip_adapter: str = _opt("", "IP-Adapter weights (ip-adapter_sd15.safetensors / .bin layout, or train-ip-adapter's)",
                           metavar="FILE")
    image_encoder: str = _opt("", "IP-Adapter: its image encoder, a transformers CLIPVisionModelWithProjection folder "
                              "(not needed for train-ip-adapter's files, which carry theirs)", metavar="DIR")
    upscale: str = _opt("", "a super-resolution model's low-resolution input; the output is its size times the "
                        "model's upscale factor (`latentdiff upscale IN.png` says the same)", metavar="FILE")
    noise_level: int | None = _opt(None, "SD x4 upscaler: the noise added to the --upscale image, a DDPM timestep "
                                   "0..its max_noise_level (default: the model's, 20)", metavar="N")

    OUTPUTS = ("out", "preview_dir")  # checked writable before any work (config.check_outputs)

    BOUNDS = bounds({**GenerationSettings.BOUNDS, **GenerateRequest.BOUNDS, "preview_every": at_least(0),
                     "original_size": COUNT, "crop_top_left": at_least(0), "cache_interval": COUNT,
                     "ip_scale": FINITE, "tome": between(0, 1, hi_open=True), "fps": between(0.1, 100)})


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

    BOUNDS = bounds({"eval_prompts": COUNT, "steps": GenerationSettings.BOUNDS["steps"], "guidance": FINITE})


DEMO_PRESETS: dict[str, dict] = {
    "shapes-demo": {},
    "shapes-demo-minilm": {"train_preset": "shapes-demo-minilm", "cache_preset": "shapes-demo-minilm"},
    # The demo's budget with the other backbones (train presets of the same names).
    "shapes-demo-dit": {"train_preset": "shapes-demo-dit"},
    "shapes-demo-mmdit": {"train_preset": "shapes-demo-mmdit"},
    "shapes-64": {"vae_preset": "shapes", "cache_preset": "shapes", "train_preset": "shapes"},
    "shapes-test": {"eval_prompts": 4, "steps": 2, "vae_preset": "shapes-test", "cache_preset": "shapes-test",
                    "train_preset": "shapes-test"},
}


def cmd_train_vae(args) -> None:
    from latentdiff.train.vae import VAE_PRESETS, VAETrainConfig, train_vae

    _print_result(train_vae(config_from_args(VAETrainConfig, VAE_PRESETS, args)))


def cmd_latent_stats(args) -> None:
    from latentdiff.train.latent_stats import LatentStatsConfig, latent_stats

    print(json.dumps(latent_stats(config_from_args(LatentStatsConfig, {}, args))))


def cmd_distill_preview(args) -> None:
    from latentdiff.train.preview import PreviewTrainConfig, distill_preview_command

    print(distill_preview_command(config_from_args(PreviewTrainConfig, {}, args)))


def cmd_cache(args) -> None:
    from latentdiff.data.cache import CACHE_PRESETS, CacheConfig, cache_dataset

    print(cache_dataset(config_from_args(CacheConfig, CACHE_PRESETS, args)))


def cmd_train(args) -> None:
    from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser

    _print_result(train_denoiser(config_from_args(TrainConfig, TRAIN_PRESETS, args)))


def cmd_distill(args) -> None:
    from latentdiff.train.distill import DISTILL_PRESETS, DistillConfig, distill

    _print_result(distill(config_from_args(DistillConfig, DISTILL_PRESETS, args)))
def cmd_train_lora(args) -> None:
    from latentdiff.train.lora import LORA_PRESETS, LoRATrainConfig, train_lora

    _print_result(train_lora(config_from_args(LoRATrainConfig, LORA_PRESETS, args)))


def cmd_train_ip_adapter(args) -> None:
    from latentdiff.train.ip_adapter import IP_ADAPTER_PRESETS, IPAdapterTrainConfig, train_ip_adapter

    _print_result(train_ip_adapter(config_from_args(IPAdapterTrainConfig, IP_ADAPTER_PRESETS, args)))


def cmd_train_controlnet(args) -> None:
    from latentdiff.train.controlnet import CONTROLNET_PRESETS, ControlNetTrainConfig, train_controlnet

    cfg = config_from_args(ControlNetTrainConfig, CONTROLNET_PRESETS, args)
    if cfg.model == "default":
        from latentdiff.default import verify

        cfg = dataclasses.replace(cfg, model=str(verify()))
    _print_result(train_controlnet(cfg))


def _print_result(result) -> None:
    """A training command prints the folder it wrote (rank 0 only), or the dry-run report."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    print(json.dumps(result, indent=2) if isinstance(result, dict) else result)


def cmd_train_video(args) -> None:
    from latentdiff.train.video import VIDEO_PRESETS, VideoTrainConfig, train_video

    _print_result(train_video(config_from_args(VideoTrainConfig, VIDEO_PRESETS, args)))


def cmd_train_audio(args) -> None:
    from latentdiff.train.audio import AUDIO_PRESETS, AudioTrainConfig, train_audio

    _print_result(train_audio(config_from_args(AudioTrainConfig, AUDIO_PRESETS, args)))


def cmd_posthoc_ema(args) -> None:
    from latentdiff.train.posthoc_export import export

    check_writable(args.out, "output folder")
    print(export(args.run, args.sigma_rel, args.out, step=args.step, template=args.template))


def cmd_export_checkpoint(args) -> None:
    from latentdiff.train.posthoc_export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, template=args.template))


def cmd_generate(args) -> None:
    from latentdiff.images import ANIMATION_SUFFIXES, import_av
    from latentdiff.pipeline import load, save_clips, save_images

    cfg = config_from_args(GenerateConfig, {}, args)
    prompts = [p for p in args.prompts if p.strip()] or ([""] if cfg.labels or cfg.upscale or cfg.ip_image else [])
    if not prompts:
        raise ValueError("no prompt given: latentdiff generate \"a large red circle on the left\" --model DIR")
    if len(cfg.labels) > 1 and len(prompts) == 1:
        prompts = prompts * len(cfg.labels)  # one prompt for every label, as Pipeline.generate does
    out = Path(cfg.out)
    clip_out = out.suffix.lower() in ANIMATION_SUFFIXES
    if out.suffix.lower() not in (".png", ".wav", *ANIMATION_SUFFIXES):
        raise ValueError(f"output {out} must end in .png (or, for a video model's clips, {', '.join(ANIMATION_SUFFIXES)}"
                         "; for an audio model, .wav)")
    if out.suffix.lower() == ".mp4":
        import_av()  # a missing PyAV is said before the model is loaded
    options = _generate_options(cfg)  # the edit's image and mask are read here, before the model is loaded
    loras = [_lora_flag(spec) for spec in cfg.loras]  # checked before the model loads
    controlnets = _controlnet_args(cfg)  # the control images are read here too, before the model is loaded
    ip_image = _ip_adapter_args(cfg)  # the image prompt is read here, before the model is loaded
    torch_backend = cfg.backend == "torch"
    if not torch_backend:
        from latentdiff.backends.openvino import import_openvino

        import_openvino()  # a missing package is said before the model is loaded
    pipe = load(cfg.model, precision=cfg.precision if torch_backend and cfg.precision else "fp32",
                **({"tokenizer": cfg.tokenizer} if cfg.tokenizer else {}))
    for path, weight in loras:
        lora = pipe.load_lora(path, weight)
        if not torch_backend or cfg.int8:
            lora.merge()  # a compiled network takes the merged weights (and its cache key sees them)
    for folder, kw in controlnets:
        pipe.add_controlnet(folder, **kw)  # one built for another base model is refused here
    if ip_image is not None:
        pipe.load_ip_adapter(cfg.ip_adapter, image_encoder=cfg.image_encoder or None)  # refused if it does not fit
    if not torch_backend or cfg.int8:
        pipe = pipe.to_backend(cfg.backend, precision=cfg.precision or "auto", int8=cfg.int8)
    use = pipe.settings(sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance, schedule=cfg.schedule,
                        guidance_method=cfg.guidance_method, pag_scale=cfg.pag_scale)
    if clip_out and (pipe.index.audio is not None or pipe.clip_length(cfg.frames) is None):
        raise ValueError(f"output {out} is a video model's clip, and {cfg.model!r} is not a video model: write a .png "
                         "(an image model) or .wav (an audio model)")
    if pipe.index.audio is not None or cfg.seconds is not None or out.suffix.lower() == ".wav":
        for path in _generate_audio(pipe, prompts, cfg, use, options, out):
            print(path)
        return
    images = pipe.generate(prompts, **dataclasses.asdict(use), **options, frames=cfg.frames,
                           **({"ip_image": ip_image, "ip_scale": cfg.ip_scale} if ip_image is not None else {}))
    clips = isinstance(images[0], list)  # a video model's clips, each a list of frames
    w, h = images[0][0].size if clips else images[0].size
    params = {**dataclasses.asdict(use), "negative_prompt": cfg.negative_prompt, "seed": cfg.seed, "width": w,
              "height": h, "model": cfg.model if cfg.model == "default" else str(Path(cfg.model).resolve()), "num_images": cfg.num_images,
              "guidance_rescale": cfg.guidance_rescale,
              **{k: options[k] for k in ("guidance_interval", "dynamic_threshold", "original_size") if options[k]},
              **_edit_parameters(cfg), **({"loras": [f"{Path(p).resolve()}:{w:g}" for p, w in loras]} if loras else {}),
              **({"controlnets": [{"control": str(Path(c).resolve()), "controlnet": str(Path(f).resolve()), **kw}
                                  for c, (f, kw) in zip(cfg.controls, controlnets)]} if controlnets else {}),
              **({"cache_interval": cfg.cache_interval} if cfg.cache_interval > 1 else {}),
              **({"tome": cfg.tome} if cfg.tome else {}),
              **({"ip_image": str(Path(cfg.ip_image).resolve()), "ip_scale": cfg.ip_scale,
                  "ip_adapter": str(Path(cfg.ip_adapter).resolve())} if ip_image is not None else {}),
              **({"backend": pipe.backend} if pipe.backend != "torch" else {})}
    labels = [{"label": cfg.labels[i if len(cfg.labels) > 1 else 0]} if cfg.labels else {} for i in range(len(prompts))]
    per_image = [{"prompt": p, **labels[i]} for i, p in enumerate(prompts) for _ in range(cfg.num_images)]
    saved = save_clips(images, out, params, per_image, fps=cfg.fps) if clips else \
        save_images(images, out, params, grid=cfg.grid, per_image=per_image)
    for path in saved:
        print(path)


def _ip_adapter_args(cfg: GenerateConfig):
    """The --ip-image read as a PIL image (None without one), after checking the IP-Adapter flags come together and
    name existing files: all before the model is loaded."""
    given = {"--ip-image": cfg.ip_image, "--ip-adapter": cfg.ip_adapter}
    if not any(given.values()) and not cfg.image_encoder:
        return None
    missing = [flag for flag, v in given.items() if not v]
    if missing:
        raise ValueError(f"an image prompt needs --ip-image FILE --ip-adapter FILE together (and --image-encoder DIR "
                         f"unless the adapter file carries its encoder); missing {', '.join(missing)}")
    if not Path(cfg.ip_adapter).is_file():
        raise FileNotFoundError(f"--ip-adapter {cfg.ip_adapter}: no such file")
    if cfg.image_encoder and not (Path(cfg.image_encoder) / "config.json").is_file():
        raise FileNotFoundError(f"--image-encoder {cfg.image_encoder}: no config.json there (expected a "
                                "CLIPVisionModelWithProjection folder saved by transformers)")
    from latentdiff.conditioning.image_encoder import as_pil

    return as_pil(cfg.ip_image)


def _generate_audio(pipe, prompts: list[str], cfg: GenerateConfig, use, options: dict, out: Path) -> list[Path]:
    """An audio model's generation (``Pipeline.generate_audio``): WAV files and a mel-spectrogram grid."""
    from latentdiff.pipeline import save_audio

    if pipe.index.audio is None:
        raise ValueError(f"{cfg.model} is an image model: --seconds and a .wav output need an audio model (make one "
                         "with `latentdiff train-audio`)")
    if cfg.height or cfg.width or cfg.frames is not None:
        raise ValueError("an audio model's clip size follows from --seconds and its mel bands: drop --height, --width "
                         "and --frames")
    options = {k: v for k, v in options.items() if k not in ("height", "width")}
    waves, mels = pipe.generate_audio(prompts, seconds=cfg.seconds, **dataclasses.asdict(use), **options)
    spec = pipe.index.audio
    params = {**dataclasses.asdict(use), "negative_prompt": cfg.negative_prompt, "seed": cfg.seed,
              "seconds": waves.shape[1] / spec.sample_rate, "num_images": cfg.num_images,
              "model": cfg.model if cfg.model == "default" else str(Path(cfg.model).resolve())}
    per_clip = [{"prompt": p} for p in prompts for _ in range(cfg.num_images)]
    return save_audio(waves, mels, spec.sample_rate, out, params, per_clip)


def _lora_flag(spec: str) -> tuple[str, float]:
    """``--lora FILE[:WEIGHT]`` -> (file, weight); the file must exist."""
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            path = spec
    if not Path(path).is_file():
        raise FileNotFoundError(f"--lora {spec}: no file {path} (expected FILE or FILE:WEIGHT, e.g. "
                                "style.safetensors:0.8)")
    if not math.isfinite(weight):
        raise ValueError(f"--lora {spec}: the weight must be a finite number")
    return path, weight


def _generate_options(cfg: GenerateConfig) -> dict:
    """``generate``'s other settings as ``Pipeline.generate`` keywords (sampler, steps, guidance, schedule aside)."""
    tiled = {"auto": None, "on": True, "off": False}
    if cfg.tiled not in tiled:
        raise ValueError(f"tiled must be 'auto', 'on' or 'off', got {cfg.tiled!r}")
    options = {"negative_prompt": cfg.negative_prompt, "seed": cfg.seed, "height": cfg.height,
               "width": cfg.width, "num_images": cfg.num_images, "guidance_rescale": cfg.guidance_rescale,
               "guidance_interval": tuple(cfg.guidance_interval) or None,
               "dynamic_threshold": cfg.dynamic_threshold or None, "label": list(cfg.labels) or None,
               "original_size": tuple(cfg.original_size) or None, "crop_top_left": tuple(cfg.crop_top_left),
               "tiled": tiled[cfg.tiled], "decode_precision": cfg.decode_precision, "cache_interval": cfg.cache_interval,
               "tome": cfg.tome}
    if cfg.controls:
        from latentdiff.edit_inputs import read_image

        options["control"] = [read_image(c) for c in cfg.controls]
    if cfg.image:
        from latentdiff.edit_inputs import read_image, read_mask

        options.update(image=read_image(cfg.image), mask=read_mask(cfg.mask) if cfg.mask else None,
                       strength=cfg.strength, outpaint=tuple(cfg.outpaint) or None, paste_back=cfg.paste_back,
                       mask_grow=cfg.mask_grow)
    elif cfg.mask or cfg.outpaint or cfg.strength is not None:
        raise ValueError("--mask, --outpaint and --strength edit an image: give it with --image FILE")
    if cfg.upscale:
        if cfg.image:
            raise ValueError("--upscale and --image: a super-resolution model takes its low-res image only")
        from latentdiff.edit_inputs import read_image

        options.update(low_res=read_image(cfg.upscale), noise_level=cfg.noise_level)
    elif cfg.noise_level is not None:
        raise ValueError("--noise-level is the noise added to an --upscale image: give it with --upscale FILE")
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


def _controlnet_args(cfg: GenerateConfig) -> list[tuple[str, dict]]:
    """(folder, scale / start / end) of each --controlnet, checked against the --control images (read here)."""
    if len(cfg.controls) != len(cfg.controlnets):
        raise ValueError(f"{len(cfg.controls)} --control image(s) for {len(cfg.controlnets)} --controlnet folder(s): "
                         "give them in pairs, --control FILE --controlnet DIR")
    n, out = len(cfg.controlnets), []
    for name in ("control_scales", "control_starts", "control_ends"):
        values = getattr(cfg, name)
        if values and (not n or len(values) not in (1, n)):
            raise ValueError(f"--{name[:-1].replace('_', '-')} given {len(values)} times for {n} ControlNet(s): give "
                             "it once for all, or once per --controlnet")
    for i, folder in enumerate(cfg.controlnets):
        pick = lambda values, default, i=i: values[i if len(values) > 1 else 0] if values else default
        out.append((folder, {"scale": pick(cfg.control_scales, 1.0), "start": pick(cfg.control_starts, 0.0),
                             "end": pick(cfg.control_ends, 1.0)}))
    return out


def _edit_parameters(cfg: GenerateConfig) -> dict:
    """What a PNG records of an edit: the image and mask files, the strength used, the outpainting border; the
    low-res input of an upscale."""
    if cfg.upscale:
        level = {"noise_level": cfg.noise_level} if cfg.noise_level is not None else {}
        return {"upscale": str(Path(cfg.upscale).resolve()), **level}
    if not cfg.image:
        return {}
    from latentdiff.edit_inputs import edit_strength

    out = {"image": str(Path(cfg.image).resolve()),
           "strength": edit_strength(cfg.strength, bool(cfg.mask or cfg.outpaint))}
    if cfg.mask:
        out["mask"] = str(Path(cfg.mask).resolve())
    if cfg.outpaint:
        out["outpaint"] = dict(zip(("left", "top", "right", "bottom"), cfg.outpaint))
    if (cfg.mask or cfg.outpaint) and not cfg.paste_back:
        out["paste_back"] = False
    if (cfg.mask or cfg.outpaint) and cfg.mask_grow != 1:
        out["mask_grow"] = cfg.mask_grow
    return out


def cmd_upscale(args) -> None:
    """``latentdiff upscale IN.png -o OUT.png --model DIR``: ``generate --upscale IN.png`` with its options."""
    argv = ["generate", args.prompt, "--upscale", args.image, "-o", args.out, "--model", args.model,
            "--seed", str(args.seed)]
    for flag, value in (("--steps", args.steps), ("--sampler", args.sampler), ("--guidance", args.guidance),
                        ("--noise-level", args.noise_level)):
        argv += [flag, str(value)] if value is not None else []
    cmd_generate(build_parser().parse_args(argv))


def cmd_eval_vae(args) -> None:
    from latentdiff.eval.vae import VAEEvalConfig, evaluate_vae

    report = evaluate_vae(config_from_args(VAEEvalConfig, {}, args))
    print(json.dumps({k: report[k] for k in ("psnr", "ssim", "images", "rfid", "grid") if k in report}, indent=2))


def cmd_demo(args) -> None:
    from latentdiff.demo import run_demo

    report = run_demo(config_from_args(DemoConfig, DEMO_PRESETS, args))
    print(json.dumps(report["summary"], indent=2))


def cmd_judge(args) -> None:
    from latentdiff.data.judge import validate

    print(json.dumps(validate(n=args.n, size=args.size, seed=args.seed), indent=2))


def cmd_check_data(args) -> None:
    from latentdiff.data.health import check_data

    if args.json:
        check_writable(args.json, "JSON report")
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

    check_writable(args.dst, "output folder")
    overrides = json.loads(args.overrides_json) if args.overrides_json else None
    convert(args.src, args.dst, args.format, tokenizer=args.tokenizer, prediction=args.prediction,
            **({"overrides": overrides} if overrides else {}))


_OUT, _DATA, _STEPS = "run folder", "'shapes', a folder of images, or tar shards", "optimizer steps"
_RESUME = "continue from the run folder's latest checkpoint"
_DRY = "time a few steps; report step time, peak memory, ETA"


class _Command(typing.NamedTuple):
    """A command built on a config dataclass: defaults <- --preset <- --config <- --set <- its flags."""

    name: str
    func: typing.Callable
    cls: type
    presets: dict
    help: str
    description: str
    flags: dict  # config key -> help (or argparse keywords, as _opt takes them)


def _config_commands() -> list[_Command]:
    from latentdiff.data.cache import CACHE_PRESETS, CacheConfig
    from latentdiff.eval.vae import VAEEvalConfig
    from latentdiff.train.audio import AUDIO_PRESETS, AudioTrainConfig
    from latentdiff.train.controlnet import CONTROLNET_PRESETS, ControlNetTrainConfig
    from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig
    from latentdiff.train.distill import DISTILL_PRESETS, DistillConfig
    from latentdiff.train.ip_adapter import IP_ADAPTER_PRESETS, IPAdapterTrainConfig
    from latentdiff.train.latent_stats import LatentStatsConfig
    from latentdiff.train.lora import LORA_PRESETS, LoRATrainConfig
    from latentdiff.train.preview import PreviewTrainConfig
    from latentdiff.train.vae import VAE_PRESETS, VAETrainConfig
    from latentdiff.train.video import VIDEO_PRESETS, VideoTrainConfig

    ae_dir, images = "autoencoder folder (train-vae's OUT/autoencoder)", "'shapes', 'skimage' or a folder of images"
    extractor = {"help": "rFID feature space (auto: the shapes net for shapes data, else Inception)",
                 "choices": ["auto", "shapes", "inception", "inception-tf1", "dinov2", "none"]}
    return [
        _Command("demo", cmd_demo, DemoConfig, DEMO_PRESETS,
                 help="train a small model on the built-in shapes set, generate and judge (~15 min)",
                 description="Train an autoencoder and a text-conditioned denoiser on the built-in shapes set, "
                             "generate held-out prompts, and score them with the judge.",
                 flags={"out": "output folder (default outputs/demo)"}),
        _Command("train-vae", cmd_train_vae, VAETrainConfig, VAE_PRESETS, help="train an autoencoder",
                 description="Train a KL autoencoder; writes OUT/autoencoder with its latent scale and shift.",
                 flags={"out": _OUT, "data": _DATA + " (crop=random and buckets=true also for folders)",
                        "steps": _STEPS, "resume": _RESUME, "dry_run": _DRY}),
        _Command("cache", cmd_cache, CacheConfig, CACHE_PRESETS, help="encode a data set into a latent cache",
                 description="Encode a data set once with an autoencoder into safetensors shards.",
                 flags={"autoencoder": ae_dir, "data": _DATA + " (a folder of .tar, a glob, or 'shard-{000..009}.tar')",
                        "out": "cache folder to write"}),
        _Command("latent-stats", cmd_latent_stats, LatentStatsConfig, {},
                 help="compute an autoencoder's latent scale/shift and store them in its config",
                 description="Measure the latent scale and shift (optionally per channel) of a saved autoencoder on "
                             "a data set and rewrite its config.json.",
                 flags={"autoencoder": "autoencoder folder", "data": "'shapes' or a folder of images"}),
        _Command("distill-preview", cmd_distill_preview, PreviewTrainConfig, {},
                 help="distill a tiny preview decoder from an autoencoder",
                 description="Train a small, fast decoder (TAESD-style) to imitate an autoencoder's decoder.",
                 flags={"autoencoder": "autoencoder folder (the teacher)", "data": images,
                        "out": "folder for the preview decoder", "steps": _STEPS}),
        _Command("eval-vae", cmd_eval_vae, VAEEvalConfig, {},
                 help="held-out PSNR, SSIM and rFID of an autoencoder, and a reconstruction grid",
                 description="Reconstruct held-out images (shapes: unseen renders; skimage: the held-out "
                             "photographs; or a folder) and write OUT/report.json and OUT/grid.png.",
                 flags={"model": "autoencoder folder, or a model folder holding autoencoder/",
                        "data": images + " (held out)", "out": "folder for report.json and grid.png",
                        "extractor": extractor,
                        "feature_path": "extractor weights: shapes-net folder, Inception .pth, or DINOv2 folder"}),
        _Command("train", cmd_train, TrainConfig, TRAIN_PRESETS, help="train a text-conditioned latent denoiser",
                 description="Train a denoiser on a latent cache; writes OUT/model, a model folder.",
                 flags={"cache": "latent cache folder", "out": _OUT, "steps": _STEPS, "resume": _RESUME,
                        "dry_run": _DRY}),
        _Command("distill", cmd_distill, DistillConfig, DISTILL_PRESETS,
                 help="distill a model into a few-step consistency student (LCM)",
                 description="Latent consistency distillation (Luo et al. 2023) of a teacher model folder on the "
                             "latent cache it was trained on, with its classifier-free guidance learned through a "
                             "guidance-scale embedding; or consistency training (--method ct). Writes OUT/model, a "
                             "model folder that generates in 1-8 steps with the 'lcm' sampler; with --lora-rank an "
                             "LCM-LoRA, OUT/lora.safetensors. --method add (--preset shapes-add): adversarial diffusion "
                             "distillation (Sauer et al. 2023), a 1-4 step student sampled the same way.",
                 flags={"teacher": {"help": "the teacher's model folder ('default': the bundled model)",
                                    "metavar": "MODEL"},
                        "method": {"help": "lcm (distill the teacher's ODE), ct (consistency training) or add "
                                           "(adversarial diffusion distillation, a U-Net teacher)",
                                   "choices": ["lcm", "ct", "add"]},
                        "cache": "latent cache the teacher was trained on", "out": _OUT, "steps": _STEPS,
                        "lora_rank": "LCM-LoRA: train a LoRA of this rank on the frozen teacher instead of a whole "
                                     "student (writes OUT/lora.safetensors, for generate --lora)",
                        "lora_alpha": "the LoRA's alpha (scale alpha / rank; default: the rank)",
                        "lora_targets": {"help": "layer patterns or groups the LoRA adapts (default: attention conv "
                                                 "ff)", "nargs": "+", "metavar": "PATTERN",
                                         "to_config": lambda v: {"lora_targets": tuple(v)}},
                        "resume": _RESUME, "dry_run": _DRY}),
        _Command("train-lora", cmd_train_lora, LoRATrainConfig, LORA_PRESETS,
                 help="train a LoRA for a frozen model's denoiser",
                 description="Train low-rank adapters for a frozen model's denoiser on a latent cache made with its "
                             "autoencoder (with --set decoder_rank=R also for its autoencoder's decoder, on the "
                             "cache's shapes scenes rendered); writes OUT/lora.safetensors (load it with generate "
                             "--lora).",
                 flags={"model": "base model: a model folder, a diffusers folder, or 'default'",
                        "cache": "latent cache folder", "out": _OUT, "rank": "LoRA rank", "steps": _STEPS,
                        "resume": _RESUME, "dry_run": _DRY}),
        _Command("train-ip-adapter", cmd_train_ip_adapter, IPAdapterTrainConfig, IP_ADAPTER_PRESETS,
                 help="train an IP-Adapter (image prompts) with a built-in image encoder for a frozen model",
                 description="Train a small image encoder and an IP-Adapter (decoupled cross-attention on image "
                             "tokens, Ye et al. 2023) for a frozen U-Net model on a latent cache made with its "
                             "autoencoder; each sample's own image is its image prompt. Writes "
                             "OUT/ip_adapter.safetensors (generate --ip-image REF.png --ip-adapter FILE).",
                 flags={"model": "base model: a model folder, a diffusers folder, or 'default'",
                        "cache": "latent cache folder", "out": _OUT, "steps": _STEPS, "resume": _RESUME,
                        "dry_run": _DRY}),
        _Command("train-video", cmd_train_video, VideoTrainConfig, VIDEO_PRESETS,
                 help="inflate an image U-Net or DiT to video and train it on moving-shapes clips",
                 description="Add zero-initialized temporal layers to an image model's U-Net or DiT (by default "
                             "the bundled U-Net) and train them (train=all: everything) on the built-in moving-shapes "
                             "clips; writes OUT/model, a video model folder (`generate --frames N`).",
                 flags={"model": "image model folder to inflate ('default': the bundled model)", "out": _OUT,
                        "steps": _STEPS, "resume": _RESUME, "dry_run": _DRY}),
        _Command("train-audio", cmd_train_audio, AudioTrainConfig, AUDIO_PRESETS,
                 help="train a text-to-audio denoiser on the built-in tones (mel spectrograms)",
                 description="Train a text-conditioned U-Net on the latents of mel spectrograms of the built-in "
                             "tones clips, encoded with a 1-channel autoencoder (`latentdiff train-vae --preset "
                             "tones`); writes OUT/model, an audio model folder (`generate` writes WAV files).",
                 flags={"autoencoder": "1-channel autoencoder folder (train-vae --preset tones: OUT/autoencoder)",
                        "out": _OUT, "steps": _STEPS, "resume": _RESUME, "dry_run": _DRY}),
        _Command("train-controlnet", cmd_train_controlnet, ControlNetTrainConfig, CONTROLNET_PRESETS,
                 help="train a ControlNet (edges, layout or depth maps) for a model",
                 description="Train a ControlNet for a model folder (its denoiser frozen) on a latent cache that "
                             "stores condition maps (`latentdiff cache --set control=edges`); writes "
                             "OUT/controlnet, for `generate --control FILE --controlnet OUT/controlnet`.",
                 flags={"model": "base model folder (default: the bundled model)", "cache": "latent cache folder "
                        "with condition maps", "control": {"help": "condition map (default: the cache's)",
                                                           "choices": ["edges", "layout", "depth"]},
                        "out": _OUT, "steps": _STEPS, "resume": _RESUME, "dry_run": _DRY}),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description="Latent diffusion: train, generate, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in _config_commands():
        p = sub.add_parser(c.name, help=c.help, description=c.description)
        add_config_args(p, c.presets, c.cls)
        add_options(p, c.cls, c.flags)
        p.set_defaults(func=c.func)

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
    p.set_defaults(func=cmd_check_data)

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

    p = sub.add_parser("export-checkpoint", help="write a training checkpoint's EMA weights as a model folder",
                       description="A denoiser run's checkpoint (its EMA weights) as a loadable model folder, e.g. an "
                                   "early one as the weak guide of autoguidance (MODEL/guide/).")
    p.add_argument("checkpoint", help="a RUN/checkpoints/step_XXXXXXX folder, or a run folder (its latest)")
    p.add_argument("--template", default=None, help="model folder of the same configuration to take configs and "
                   "the untrained parts from (default: the run config the checkpoint holds)")
    p.add_argument("-o", "--out", required=True, help="folder to write")
    p.set_defaults(func=cmd_export_checkpoint)

    p = sub.add_parser("generate", help="generate images from prompts", description="Generate images; each PNG "
                       "carries its parameters (its own prompt among them) in a text chunk, each WAV in its ICMT "
                       "comment.")
    p.add_argument("prompts", nargs="*", help="one or more prompts")
    add_config_args(p, {}, GenerateConfig)
    add_options(p, GenerateConfig, {f.name: dict(f.metadata) for f in dataclasses.fields(GenerateConfig)
                                     if f.metadata}, show_defaults=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("upscale", help="upscale an image with a super-resolution model",
                       description="Upscale an image with a super-resolution model (train --preset shapes-sr, or "
                                   "a diffusers StableDiffusionUpscalePipeline folder such as SD's x4 upscaler); "
                                   "the same as generate --upscale IN.png.")
    p.add_argument("image", help="the low-resolution image")
    p.add_argument("-o", "--out", required=True, help="output .png")
    p.add_argument("--model", required=True, help="super-resolution model folder")
    p.add_argument("--prompt", default="", help="what the image shows (optional)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's recommendation)")
    p.add_argument("--sampler", default=None, help="sampler or alias (default: the model's recommendation)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--noise-level", type=int, default=None, metavar="N",
                   help="SD x4 upscaler: the noise added to the image, 0..its max_noise_level (default: 20)")
    p.set_defaults(func=cmd_upscale)

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
    from latentdiff.serve.cli import add_command as add_serve_command

    add_serve_command(sub)  # serve
    from latentdiff.threed.cli import add_command as add_sds_command

    add_sds_command(sub)  # sds
    debug = "print the traceback of an error too (or set LATENTDIFF_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug)
    for command in sub.choices.values():  # also after the command's name; SUPPRESS keeps the global flag's value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return parser


# What to do about an error the operating system reports, by errno.
_OS_ADVICE = {
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOSPC: "the disk is full: free some space, or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space, or write somewhere else",
    errno.EACCES: "check the permissions of the file and its folder, or write somewhere else",
    errno.EPERM: "check the permissions of the file and its folder, or write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "a file is in the way of a folder (or the other way round): choose another path",
    errno.EISDIR: "that is a folder: name a file",
    errno.ENOENT: "check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENAMETOOLONG: "use a shorter path",
}
_EXPECTED = (ValueError, OSError, ImportError, RuntimeError, MemoryError)  # errors latentdiff raises on purpose


def error_line(e: BaseException) -> str:
    """One line for an error: what failed, which file or key, what to do."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:  # from the operating system
        paths = " -> ".join(os.fsdecode(f) for f in (e.filename, e.filename2) if f is not None)
        advice = _OS_ADVICE.get(e.errno, "check the path and try again")
        return f"{e.strerror}{f': {paths}' if paths else ''} ({advice})"
    text = " ".join(str(e).split("\n", 1)[0].split()) or type(e).__name__
    if isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text:
        ours = isinstance(e, MemoryError) and str(e)  # latentdiff's own refusal says what to do
        return f"out of memory: {text}" + ("" if ours else " (lower batch_size, the image size or the number of images)")
    if isinstance(e, _EXPECTED):
        return text
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "latentdiff" in Path(f.filename).parts]
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    return (f"unexpected {type(e).__name__}{where}: {text} -- a bug in latentdiff or an input it does not check; "
            "rerun with --debug for the traceback and report it")


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # a library warning (e.g. steps outside a student's range) as one line
            warnings.showwarning = _warning_line  # restored when the command ends
            args.func(args)
    except Exception as e:  # noqa: BLE001 -- every error ends as one line (KeyboardInterrupt, SystemExit pass)
        if getattr(args, "debug", False) or os.environ.get("LATENTDIFF_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"error: {error_line(e)}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, _EXPECTED) else 1) from None


if __name__ == "__main__":
    main()
