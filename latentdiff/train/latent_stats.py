"""``latentdiff latent-stats``: (re)compute the latent scale and shift of any saved autoencoder.

Rombach et al. 2022 rescale latents to unit variance before diffusion; the numbers belong to the
autoencoder (its config), so every later stage (``cache``, ``train``, ``generate``) reads them from
there. This command measures them on a data set and rewrites the autoencoder folder's config in place
(atomically; the weights are copied unchanged).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiff.config import COUNT, IMAGE_SIDE, bounds
from latentdiff.models.autoencoder import compute_latent_stats, set_latent_stats


@dataclass
class LatentStatsConfig:
    """``latentdiff latent-stats``: which autoencoder, measured on which images."""

    autoencoder: str = "runs/vae/autoencoder"  # autoencoder folder; its config.json is rewritten
    data: str = "shapes"  # "shapes" (built in) or a folder of images
    num_images: int = 2048  # images measured (shapes: generated; folder: the first N)
    image_size: int = 64  # pixels; must be divisible by the autoencoder's factor
    seed: int = 0  # data seed and posterior-noise seed
    per_channel: bool = False  # one scale and shift per latent channel instead of two scalars
    center: bool = True  # also shift to zero mean (False: shift 0, the SD 1.x convention)
    batch_size: int = 32  # images encoded at once

    OUTPUTS = ("autoencoder",)  # its config.json is rewritten: checked writable before any work
    BOUNDS = bounds({"num_images": COUNT, "image_size": IMAGE_SIDE, "batch_size": COUNT})


def image_batches(dataset, num_images: int, batch_size: int):
    """Yield (B, 3, H, W) batches of the first ``num_images`` items of ``dataset``."""
    n = min(num_images, len(dataset))
    for start in range(0, n, batch_size):
        yield torch.stack([dataset[i]["image"] for i in range(start, min(n, start + batch_size))])


def latent_stats(cfg: LatentStatsConfig) -> dict:
    """Measure the stats of ``cfg.autoencoder`` on ``cfg.data``, store them in its config, return them."""
    from latentdiff.components import load_autoencoder, save_autoencoder
    from latentdiff.data import make_image_dataset

    autoencoder = load_autoencoder(cfg.autoencoder)
    if cfg.image_size % autoencoder.factor:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the autoencoder's factor "
                         f"{autoencoder.factor}")
    dataset = make_image_dataset(cfg.data, cfg.num_images, cfg.image_size, cfg.seed, split="train")
    generator = torch.Generator().manual_seed(cfg.seed)
    scale, shift = compute_latent_stats(autoencoder, image_batches(dataset, cfg.num_images, cfg.batch_size),
                                        center=cfg.center, generator=generator, per_channel=cfg.per_channel)
    set_latent_stats(autoencoder, scale, shift)
    save_autoencoder(Path(cfg.autoencoder), autoencoder)
    print(f"latent stats written to {Path(cfg.autoencoder) / 'config.json'}", file=sys.stderr)
    return {"scale": scale, "shift": shift, "per_channel": cfg.per_channel}
