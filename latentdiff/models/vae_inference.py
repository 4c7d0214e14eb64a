"""Autoencoder inference beyond one small batch: tiles for large images, padding, low precision with a fallback.

* **Tiles.** ``tiled_encode`` / ``tiled_decode`` run the autoencoder on overlapping tiles, one at a time, and
  blend the overlaps with linear ramps (weights that fall from 1 to 0 across the overlap and are renormalized
  where tiles meet), so peak activation memory depends on the tile size, not the image size. The result is
  not identical to the untiled one: GroupNorm statistics and the middle self-attention see one tile instead
  of the whole image. tests/test_vae_inference.py and benchmarks/autoencoder.py measure the difference.
* **Sizes the factor does not divide** are refused by ``AutoencoderKL.encode`` with a message; the helpers
  here pad them (reflection) when asked, and ``decode_to_size`` crops the padding off again.
* **Low precision.** ``decode_with_fallback`` decodes under bf16/fp16 autocast and, if any output value is
  NaN or inf (the fp16 overflow SD-family VAEs are known for), decodes again in fp32 and says so.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from latentdiff.models.autoencoder import AutoencoderKL, DiagonalGaussian

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- padding


def pad_to_multiple(images: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Reflect-pad (B, C, H, W) at the bottom and right up to multiples of ``multiple``; also return (H, W)."""
    H, W = images.shape[-2:]
    pad_h, pad_w = -H % multiple, -W % multiple
    if pad_h or pad_w:
        mode = "reflect" if pad_h < H and pad_w < W else "replicate"  # reflect needs pad < size
        images = F.pad(images, (0, pad_w, 0, pad_h), mode=mode)
    return images, (H, W)


def encode_padded(autoencoder: AutoencoderKL, images: Tensor, **tile_args) -> tuple[Tensor, tuple[int, int]]:
    """Encode images of any size: pad to the factor, encode (tiled if ``tile_args`` given); latents and (H, W)."""
    padded, size = pad_to_multiple(images, autoencoder.factor)
    latents = tiled_encode(autoencoder, padded, **tile_args) if tile_args else autoencoder.encode(padded)
    return latents, size


def decode_to_size(autoencoder: AutoencoderKL, latents: Tensor, size: tuple[int, int], **tile_args) -> Tensor:
    """Decode (tiled if ``tile_args`` given) and crop to the (H, W) that ``encode_padded`` returned."""
    images = tiled_decode(autoencoder, latents, **tile_args) if tile_args else autoencoder.decode(latents)
    return images[..., : size[0], : size[1]]


# ----------------------------------------------------------------------------- tiles


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap`` shared; the last ends at
    ``length`` exactly. One tile when it fits."""
    if tile <= overlap:
        raise ValueError(f"tile size {tile} must be larger than the overlap {overlap}")
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    stride = (length - tile) / (n - 1)  # spread evenly: every overlap is >= the requested one
    return [round(i * stride) for i in range(n)]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> Tensor:
    """1-D blending weights of one tile: linear ramps over ``overlap`` on the sides that have a neighbour."""
    w = torch.ones(length)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap  # (0, 1), never exactly 0
        if not at_start:
            w[:overlap] = ramp
        if not at_end:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


def _blend_tiles(fn, x: Tensor, tile: int, overlap: int, scale_num: int, scale_den: int, out_channels: int) -> Tensor:
    """Apply ``fn`` to overlapping ``tile``-sized windows of ``x`` (B, C, H, W) and blend the outputs.

    ``fn`` maps a window of size s to an output of size s * scale_num / scale_den (the autoencoder's factor, up
    or down). Tiles run one at a time; only the blended output and its weight map are held at full size.
    """
    B, _, H, W = x.shape
    oh, ow = H * scale_num // scale_den, W * scale_num // scale_den
    out = torch.zeros(B, out_channels, oh, ow, device=x.device)
    weight = torch.zeros(1, 1, oh, ow, device=x.device)
    unit = scale_den  # encoding: tiles start on the factor's grid so the latent tiles line up
    ys, xs = ([unit * s for s in tile_starts(n // unit, tile // unit, overlap // unit)] for n in (H, W))
    for y in ys:
        for x0 in xs:
            window = x[..., y : y + tile, x0 : x0 + tile]
            result = fn(window).float()  # (B, out_channels, th', tw')
            th, tw = result.shape[-2:]
            oy, ox = y * scale_num // scale_den, x0 * scale_num // scale_den
            ov = overlap * scale_num // scale_den
            wy = _ramp(th, min(ov, th), at_start=y == 0, at_end=y + tile >= H)
            wx = _ramp(tw, min(ov, tw), at_start=x0 == 0, at_end=x0 + tile >= W)
            w = (wy[:, None] * wx[None, :])[None, None].to(x.device)  # (1, 1, th', tw')
            out[..., oy : oy + th, ox : ox + tw] += result * w
            weight[..., oy : oy + th, ox : ox + tw] += w
    return out / weight


@torch.no_grad()
def tiled_encode_posterior(autoencoder: AutoencoderKL, images: Tensor, tile: int = 512,
                           overlap: int = 64) -> DiagonalGaussian:
    """q(z|x) of images (B, 3, H, W) computed on ``tile``-pixel tiles overlapping by ``overlap`` pixels.

    ``tile`` and ``overlap`` must be multiples of the factor; the moments (mean, logvar) are blended.
    """
    f = autoencoder.factor
    if tile % f or overlap % f:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of the autoencoder's factor {f}")
    autoencoder._check_images(images)
    c = autoencoder.latent_channels

    def moments(window: Tensor) -> Tensor:
        posterior = autoencoder.encode_posterior(window)
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    return DiagonalGaussian(_blend_tiles(moments, images, tile, overlap, 1, f, 2 * c))


def tiled_encode(autoencoder: AutoencoderKL, images: Tensor, tile: int = 512, overlap: int = 64) -> Tensor:
    """Images -> normalized latents (posterior mode), tile by tile; see ``tiled_encode_posterior``."""
    return autoencoder.normalize(tiled_encode_posterior(autoencoder, images, tile, overlap).mode())


@torch.no_grad()
def tiled_decode(autoencoder: AutoencoderKL, latents: Tensor, tile: int = 64, overlap: int = 8,
                 precision: str = "fp32") -> Tensor:
    """Normalized latents (B, C, h, w) -> images, decoded on ``tile``-latent tiles overlapping by ``overlap``
    latent pixels (64 and 8 latents = 512 and 64 pixels at factor 8). Each tile goes through
    ``decode_with_fallback`` at ``precision``."""
    if latents.ndim != 4 or latents.shape[1] != autoencoder.latent_channels:
        raise ValueError(f"expected latents of shape (B, {autoencoder.latent_channels}, h, w), "
                         f"got {tuple(latents.shape)}")
    f = autoencoder.factor

    def decode(window: Tensor) -> Tensor:
        return decode_with_fallback(autoencoder, window, precision)

    return _blend_tiles(decode, latents, tile, overlap, f, 1, autoencoder.config.in_channels)


# ----------------------------------------------------------------------------- precision


@torch.no_grad()
def decode_with_fallback(autoencoder: AutoencoderKL, latents: Tensor, precision: str = "bf16",
                         quiet: bool = False) -> Tensor:
    """Decode under ``precision`` autocast ("fp32", "bf16" or "fp16"); if the output holds NaN or inf,
    decode again in fp32 (and say so on stderr unless ``quiet``). Returns float32 images."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    if precision != "fp32":
        with torch.autocast(latents.device.type, dtype=DTYPES[precision]):
            images = autoencoder.decode(latents)
        if torch.isfinite(images).all():
            return images.float()
        if not quiet:
            print(f"decode in {precision} gave non-finite values; decoding again in fp32", file=sys.stderr)
    return autoencoder.decode(latents.float()).float()
