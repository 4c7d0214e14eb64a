"""Concat conditioning: the channels joined to a denoiser's input (``Cond.concat``), built the same way for training
and generation.

Inpainting (SD inpainting's layout, Rombach et al. 2022): the pixel mask at latent size (nearest neighbour, as
diffusers), then the latents of the image with the repainted pixels zeroed (``image * (mask < 0.5)`` in [-1, 1]).

Super-resolution (LDM's layout, Rombach et al. 2022, section 4.4): the low-resolution image at the latent's spatial
size. When the low-res image is r times the latent's side (an upscale factor smaller than the autoencoder's), it is
folded into 3 r^2 channels by space-to-depth (``pixel_unshuffle``) instead of being resized down, so no low-res pixel
is lost; r = 1 is LDM's layout exactly. SD's x4 upscaler (r = 1) first noises its low-res image to a level it is
told as a class label (``noise_low_res``; ``ModelIndex.noise_augmentation``). The low-res images a model trains on are its targets downsampled by
``downsample`` (bicubic with antialiasing); the benchmark and ``latentdiff upscale`` users give that kind of image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def inpaint_concat(mask: Tensor, masked_latents: Tensor) -> Tensor:
    """(B, 1 + C, h, w): the pixel mask (B, 1, H, W) of 0 / 1 at latent size, then the masked image's latents."""
    mask = F.interpolate(mask, size=masked_latents.shape[-2:]).to(masked_latents)
    return torch.cat([mask, masked_latents], dim=1)


def low_res_factor(autoencoder_factor: int, upscale: int) -> int:
    """r, the low-res image's side over the latent's, for a model that upscales by ``upscale``; an error unless it
    is a whole number."""
    if upscale < 1 or autoencoder_factor % upscale:
        raise ValueError(f"upscale {upscale} must divide the autoencoder's factor {autoencoder_factor} (the low-res "
                         f"image is then factor / upscale times the latent's side): try one of "
                         f"{[u for u in range(2, autoencoder_factor + 1) if autoencoder_factor % u == 0]}")
    return autoencoder_factor // upscale


def low_res_channels(autoencoder_factor: int, upscale: int) -> int:
    """Concat channels of a super-resolution denoiser: 3 r^2."""
    return 3 * low_res_factor(autoencoder_factor, upscale) ** 2


def low_res_concat(low_res: Tensor, r: int) -> Tensor:
    """(B, 3 r^2, h / r, w / r): the low-res image (B, 3, h, w) in [-1, 1] folded to the latent's size."""
    return F.pixel_unshuffle(low_res, r) if r > 1 else low_res


def noise_low_res(low_res: Tensor, noise: Tensor, alpha_cumprod: float) -> Tensor:
    """A low-res image noised to a timestep of a DDPM schedule: sqrt(a) x + sqrt(1 - a) eps (noise conditioning
    augmentation, Ho et al. 2022, "Cascaded Diffusion Models"; SD's x4 upscaler, whose denoiser is told the level)."""
    return alpha_cumprod**0.5 * low_res + (1 - alpha_cumprod) ** 0.5 * noise


def downsample(pixels: Tensor, upscale: int) -> Tensor:
    """The low-res image a super-resolution model learns from: (B, 3, H, W) -> (B, 3, H / upscale, W / upscale),
    bicubic with antialiasing, in [-1, 1]."""
    size = (pixels.shape[-2] // upscale, pixels.shape[-1] // upscale)
    return F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
