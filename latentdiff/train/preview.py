"""``latentdiff distill-preview``: train a ``PreviewDecoder`` (models/preview.py) to imitate an autoencoder's decoder.

The teacher's outputs on a data set's latents are computed once, then the student fits them with an L1 loss.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from latentdiff.config import COUNT, IMAGE_SIDE, above, at_least, bounds
from latentdiff.models.preview import PreviewConfig, PreviewDecoder, save_preview_decoder
from latentdiff.train.latent_stats import image_batches


@torch.no_grad()
def teacher_pairs(autoencoder, batches) -> tuple[Tensor, Tensor]:
    """(normalized latents, full-decoder images) for every image in ``batches``: the distillation targets."""
    autoencoder.eval()
    latents, targets = [], []
    for images in batches:
        z = autoencoder.encode(images)
        latents.append(z)
        targets.append(autoencoder.decode(z).clamp(-1, 1))
    return torch.cat(latents), torch.cat(targets)


def distill_preview(autoencoder, batches, steps: int = 500, batch_size: int = 16, lr: float = 2e-3,
                    config: PreviewConfig | None = None, seed: int = 0, quiet: bool = True) -> PreviewDecoder:
    """Train a ``PreviewDecoder`` to reproduce ``autoencoder``'s decoder on the latents of ``batches``."""
    config = config or PreviewConfig(latent_channels=autoencoder.latent_channels, factor=autoencoder.factor)
    if (config.latent_channels, config.factor) != (autoencoder.latent_channels, autoencoder.factor):
        raise ValueError(f"preview config ({config.latent_channels} channels, factor {config.factor}) does not fit "
                         f"the autoencoder ({autoencoder.latent_channels} channels, factor {autoencoder.factor})")
    latents, targets = teacher_pairs(autoencoder, batches)
    torch.manual_seed(seed)
    student = PreviewDecoder(config)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # callers may hold no_grad (e.g. inside an evaluation)
        _fit(student, opt, latents, targets, steps, batch_size, lr, g, quiet)
    return student.eval()


def _fit(student: PreviewDecoder, opt, latents: Tensor, targets: Tensor, steps: int, batch_size: int, lr: float,
         g: torch.Generator, quiet: bool) -> None:
    """The distillation loop: L1 between the student's images and the teacher's, cosine learning rate."""
    for step in range(steps):
        idx = torch.randint(len(latents), (min(batch_size, len(latents)),), generator=g)
        lr_now = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr_now
        loss = (student(latents[idx]) - targets[idx]).abs().mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"preview distillation: non-finite loss at step {step + 1}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not quiet and (step + 1) % 50 == 0:
            print(f"\rpreview step {step + 1}/{steps}  L1 {loss.item():.4f}", end="", file=sys.stderr, flush=True)
    if not quiet:
        print(file=sys.stderr)


@dataclass
class PreviewTrainConfig:
    """``latentdiff distill-preview``: distill a preview decoder from a trained autoencoder."""

    autoencoder: str = "runs/vae/autoencoder"  # the teacher
    out: str = "runs/vae/preview"  # folder to write the preview decoder to
    data: str = "shapes"  # "shapes", "skimage" or a folder of images
    num_images: int = 1024  # images whose latents and teacher outputs are distilled on
    image_size: int = 64  # pixels
    steps: int = 500  # optimizer steps
    batch_size: int = 16  # latents per step
    lr: float = 2e-3  # peak AdamW learning rate (cosine to 0)
    channels: int = 64  # preview decoder width at the latent resolution (halved per upsampling)
    blocks: int = 1  # residual blocks per level
    seed: int = 0  # data and initialization seed

    BOUNDS = bounds({"num_images": COUNT, "image_size": IMAGE_SIDE, "steps": COUNT, "batch_size": COUNT, "lr": above(0),
                     "channels": COUNT, "blocks": at_least(0)})


def distill_preview_command(cfg: PreviewTrainConfig) -> Path:
    """Load the teacher, distill, write ``cfg.out``; return it."""
    from latentdiff.components import load_autoencoder
    from latentdiff.data import make_image_dataset

    ae = load_autoencoder(cfg.autoencoder)
    if cfg.image_size % ae.factor:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the autoencoder's factor {ae.factor}")
    dataset = make_image_dataset(cfg.data, cfg.num_images, cfg.image_size, cfg.seed)
    config = PreviewConfig(ae.latent_channels, ae.factor, cfg.channels, blocks=cfg.blocks,
                           out_channels=ae.config.in_channels)
    student = distill_preview(ae, image_batches(dataset, cfg.num_images, 32), cfg.steps, cfg.batch_size, cfg.lr,
                              config, cfg.seed, quiet=False)
    save_preview_decoder(cfg.out, student)
    return Path(cfg.out)
