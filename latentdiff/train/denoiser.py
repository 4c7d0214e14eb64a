"""Denoiser training on cached latents: setup -> build -> loop (loss, step, EMA, log, samples, checkpoint) -> save.

The result is a complete model folder (autoencoder, denoiser, text encoder) that
``latentdiff.load`` opens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from latentdiff.components import (
    DenoiserSpec,
    NoiseSchedule,
    build_denoiser,
    load_autoencoder,
    save_autoencoder,
    save_denoiser,
    save_text_encoder,
    write_model_index,
)
from latentdiff.conditioning.text import TextEncoderConfig, build_text_encoder
from latentdiff.config import to_dict
from latentdiff.data.cache import LatentCache
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.losses import denoising_loss, make_sigma_sampler, min_snr_weight
from latentdiff.images import make_grid, save_png
from latentdiff.io import atomic_folder
from latentdiff.models.families import find_preset, for_text_data
from latentdiff.train.common import (
    EMA,
    MetricsLog,
    NonFiniteSkipper,
    autocast,
    batch_indices,
    check_finite_params,
    find_checkpoint,
    interrupt_message,
    load_training_checkpoint,
    lr_at,
    save_training_checkpoint,
)


@dataclass
class TrainConfig:
    """``latentdiff train``: a text-conditioned latent denoiser on a latent cache."""

    out: str = "runs/model"  # run folder: checkpoints/, metrics.jsonl, samples/, and the final model/
    cache: str = "runs/cache"  # latent cache folder (from `latentdiff cache`)
    autoencoder: str | None = None  # autoencoder folder; default: the one the cache was built with
    seed: int = 0  # seeds weights, data order, noise and caption dropout
    model: str = "shapes-tiny"  # network preset: U-Net (models/unet.py), DiT (models/dit.py) or MMDiT (models/mmdit.py)
    parameterization: str = "eps"  # what the network predicts: "eps", "v", "x0", "edm" or "flow"
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)  # discrete noise schedule (eps, v, x0)
    sigma_sampler: str = "discrete"  # training noise levels: "discrete", "lognormal" (EDM), "logitnormal" (SD3)
    min_snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5
    offset_noise: float = 0.0  # offset-noise strength (0 = off)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # prompt encoder
    caption_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)
    steps: int = 4000  # optimizer steps
    batch_size: int = 64  # latents per step
    lr: float = 5e-4  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 200  # linear warm-up
    lr_schedule: str = "cosine"  # "constant" or "cosine" (to 10% of lr)
    grad_clip: float = 1.0  # max gradient norm
    ema_decay: float = 0.999  # EMA of weights: the weights saved in the model
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; slower where the CPU lacks native bf16, see BENCHMARKS.md)
    log_every: int = 25  # steps between metrics lines
    sample_every: int = 1000  # steps between sample grids (0 = never)
    sample_prompts: tuple = ("a large red circle on the left", "a small blue square at the top",
                             "a large green triangle on the right", "a small yellow circle at the bottom")
    sample_steps: int = 20  # sampler steps for the grids
    sample_guidance: float = 4.0  # CFG scale for the grids
    save_every: int = 1000  # steps between checkpoints
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the run folder's latest checkpoint
    quiet: bool = False  # no progress line
    sample_schedule: str = "karras"  # sigma grid for the sample grids ("flow" for flow models: karras needs a finite sigma_max)


_DEMO = {"steps": 600, "batch_size": 64, "lr": 1e-3, "warmup_steps": 50, "ema_decay": 0.995, "sample_every": 200,
         "save_every": 200, "text_encoder": {"dim": 128, "num_layers": 1}}
_MINILM = {"text_encoder": {"kind": "pretrained", "path": "minilm", "max_length": 32}}

TRAIN_PRESETS: dict[str, dict] = {
    "shapes": {},
    "shapes-minilm": _MINILM,
    # The demo's stage 3: 8x8x4 latents of 32x32 images, about 8 minutes on 2 CPU cores.
    "shapes-demo": _DEMO,
    "shapes-demo-minilm": {**_DEMO, "text_encoder": _MINILM["text_encoder"]},
    "shapes-test": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "sample_every": 2,
                    "save_every": 2, "sample_steps": 2, "precision": "fp32", "quiet": True,
                    "text_encoder": {"dim": 32, "num_layers": 1}},
}


# The other network families on the same data (models/families.py); MMDiT with rectified flow, as SD3.
_MMDIT = {"model": "mmdit-shapes", "parameterization": "flow", "sigma_sampler": "logitnormal",
          "sample_schedule": "flow"}
TRAIN_PRESETS["shapes-dit-test"] = {**TRAIN_PRESETS["shapes-test"], "model": "dit-tiny"}
TRAIN_PRESETS["shapes-mmdit-test"] = {**TRAIN_PRESETS["shapes-test"], **_MMDIT, "model": "mmdit-tiny"}
TRAIN_PRESETS["shapes-demo-dit"] = {**_DEMO, "model": "dit-shapes"}
TRAIN_PRESETS["shapes-demo-mmdit"] = {**_DEMO, **_MMDIT}


class Trainable(nn.Module):
    """The modules the optimizer updates: the network, and the text encoder when it is trained jointly."""

    def __init__(self, network: nn.Module, text_encoder: nn.Module | None):
        super().__init__()
        self.network = network
        self.text_encoder = text_encoder


def train_denoiser(cfg: TrainConfig) -> Path:
    """Train a denoiser on a latent cache; write ``cfg.out/model`` (a model folder) and return it."""
    # Setup.
    family, network_cfg = find_preset(cfg.model)
    run = Path(cfg.out)
    checkpoint = find_checkpoint(run) if cfg.resume else None
    cache = LatentCache(cfg.cache)
    ae_path = cfg.autoencoder or cache.autoencoder_path
    if ae_path is None:
        raise ValueError("the cache does not say which autoencoder made it: pass --set autoencoder=DIR")
    autoencoder = load_autoencoder(ae_path)
    image_size = cache.info["latent_shape"][1] * autoencoder.factor
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    device = torch.device("cpu")

    # Build.
    text_encoder = build_text_encoder(cfg.text_encoder)
    joint = cfg.text_encoder.kind == "hashed"
    channels = cache.info["latent_shape"][0]
    network_cfg = for_text_data(family, network_cfg, channels, text_encoder.dim, cache.info["latent_shape"][1])
    spec = DenoiserSpec(network=family, parameterization=cfg.parameterization, schedule=cfg.schedule,
                        **{family: network_cfg})
    denoiser = build_denoiser(spec)
    model = Trainable(denoiser.network, text_encoder if joint else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay)
    sigma_sampler = make_sigma_sampler(cfg.sigma_sampler, denoiser.parameterization)
    start = 0
    if checkpoint is not None:
        start = load_training_checkpoint(checkpoint, model, ema, opt, generator)
        print(f"resumed from {checkpoint} at step {start}", file=sys.stderr)
    if not cfg.quiet:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"denoiser {cfg.model} ({cfg.parameterization}), text encoder {cfg.text_encoder.kind}: "
              f"{n_params / 1e6:.2f}M trained parameters; {len(cache)} cached latents", file=sys.stderr)
    log = MetricsLog(run / "metrics.jsonl", cfg.steps, start, quiet=cfg.quiet)
    skipper = NonFiniteSkipper()

    # Loop.
    step = start
    try:
        for step in range(start, cfg.steps):
            model.train()
            idx = batch_indices(step, cfg.batch_size, len(cache), cfg.seed)
            raw, captions = cache.sample(idx, generator)
            x0 = autoencoder.normalize(raw)
            drop = torch.rand(len(captions), generator=generator) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            sigma = sigma_sampler(len(captions), generator=generator)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
            with autocast(cfg.precision, device):
                cond = text_encoder(captions)
                weighting = (lambda s: min_snr_weight(s, cfg.min_snr_gamma, denoiser.parameterization)) \
                    if cfg.min_snr_gamma > 0 else None
                loss = denoising_loss(denoiser, x0, sigma, cond, weighting=weighting,
                                      offset_noise=cfg.offset_noise, generator=generator).mean()
            grad_norm = skipper.step(loss, step, opt, model, cfg.grad_clip)
            if grad_norm is None:
                continue
            ema.update(model)

            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                log.log(step, loss=loss.item(), grad_norm=grad_norm, lr=opt.param_groups[0]["lr"])
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                sample_grid(*_with_ema(ema.module, text_encoder, denoiser), autoencoder, cfg, image_size,
                            run / "samples" / f"step_{step + 1:07d}.png")
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                check_finite_params(model)
                save_training_checkpoint(run, step + 1, model, ema, opt, generator, to_dict(cfg), cfg.keep_last)
    except KeyboardInterrupt:
        log.close()
        raise SystemExit(interrupt_message(run, step)) from None
    log.close()

    # Save: the training checkpoint, then the model folder with the EMA weights.
    check_finite_params(ema.module)
    save_training_checkpoint(run, cfg.steps, model, ema, opt, generator, to_dict(cfg), cfg.keep_last)
    folder = save_model_folder(run / "model", *_with_ema(ema.module, text_encoder, denoiser), spec, autoencoder,
                               image_size)
    if not cfg.quiet:
        print(f"model written to {folder}", file=sys.stderr)
    return folder


def _with_ema(ema_model: Trainable, text_encoder: nn.Module, denoiser: Denoiser) -> tuple[Denoiser, nn.Module]:
    """The denoiser and text encoder with the EMA weights."""
    te = ema_model.text_encoder if ema_model.text_encoder is not None else text_encoder
    return Denoiser(ema_model.network, denoiser.parameterization), te


def save_model_folder(folder: Path, denoiser: Denoiser, text_encoder: nn.Module, spec: DenoiserSpec,
                      autoencoder, cache_image_size: int) -> Path:
    """Write a complete model folder atomically: autoencoder, denoiser, text encoder, model_index.json."""
    with atomic_folder(folder) as tmp:
        save_autoencoder(tmp / "autoencoder", autoencoder)
        save_denoiser(tmp / "denoiser", denoiser, spec)
        save_text_encoder(tmp / "text_encoder", text_encoder)
        write_model_index(tmp, ["autoencoder", "denoiser", "text_encoder"], {"sample_size": cache_image_size})
    return folder


def sample_grid(denoiser: Denoiser, text_encoder: nn.Module, autoencoder, cfg: TrainConfig, image_size: int,
                path: Path) -> None:
    """Generate the fixed sample prompts and save them as one row."""
    from latentdiff.pipeline import Pipeline

    images = Pipeline(autoencoder, denoiser, text_encoder, default_size=image_size).generate(
        list(cfg.sample_prompts), steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=0,
        schedule=cfg.sample_schedule)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(images, ncols=len(images)), path)
