"""Autoencoder inference beyond one small batch: tiles for large images, padding, low precision with a fallback.

* **Tiles.** ``tiled_encode`` / ``tiled_decode`` run the autoencoder's full-resolution convolutions on
  overlapping tiles, one at a time, and blend the overlaps with linear ramps (weights that fall from 1 to 0
  across the overlap and are renormalized where tiles meet), so peak activation memory depends on the tile
  size, not the image size. Two things would make tiles differ from the whole image, and neither is left to
  the tile: GroupNorm uses statistics of the whole image (``WholeImageGroupNorm``: a few passes over the tiles,
  each gathering every layer's per-group sums over the region its tile owns), and the middle self-attention,
  which sees every position, runs once on the whole latent-resolution feature map (64x fewer positions than
  pixels at factor 8). What remains is the convolutions' zero padding at tile edges, which the overlap
  hides. tests/test_vae_inference.py and benchmarks/autoencoder.py measure the difference.
* **Sizes the factor does not divide** are refused by ``AutoencoderKL.encode`` with a message; the helpers
  here pad them (reflection) when asked, and ``decode_to_size`` crops the padding off again.
* **Low precision.** ``decode_with_fallback`` decodes under bf16/fp16 autocast and, if any output value is
  NaN or inf (the fp16 overflow SD-family VAEs are known for), decodes again in fp32 and says so. Low
  precision goes through ``runtime.autocast`` (also the way to encode in bf16), which on the CPU keeps the
  convolution weights channels-last for the call: on a CPU without native bf16, NCHW bf16 convolutions are
  20-35x slower than NHWC ones (BENCHMARKS.md). fp32 is untouched.
* **Threads.** Tiling changes no module: the tiles' statistics live in one ``WholeImageGroupNorm`` per call,
  passed to ``Encoder.down`` / ``Decoder.up`` as their ``norm`` argument, and the tiled part reaches the
  autoencoder as the ``down`` / ``up`` argument of ``encode_posterior`` / ``decode``. One autoencoder can serve
  tiled calls from several threads at once (in fp32; the low-precision layout switch is per call, see
  ``runtime.low_precision_layout``).
"""

from __future__ import annotations

import itertools
import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentdiff.models.autoencoder import AutoencoderKL, Part
from latentdiff.models.runtime import autocast, check_precision

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


def _owned(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Per tile, the [begin, end) it owns, relative to its start: the tiles' ranges cut at the middle of every
    overlap, so each position belongs to exactly one tile (for statistics, which must count a pixel once)."""
    cuts = [0] + [(b + a + tile) // 2 for a, b in itertools.pairwise(starts)] + [length]
    return [(lo - s, hi - s) for s, lo, hi in zip(starts, cuts[:-1], cuts[1:], strict=True)]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> Tensor:
    """1-D blending weights of one tile: on the sides that have a neighbour, 0 over the outer quarter of the
    overlap (where the convolutions' zero padding reaches), then a linear ramp to 1 over its middle half."""
    w = torch.ones(length)
    if overlap > 0:
        edge = overlap // 4
        ramp = ((torch.arange(overlap, dtype=torch.float32) - edge + 0.5) / (overlap - 2 * edge)).clamp(0, 1)
        if not at_start:
            w[:overlap] = ramp
        if not at_end:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


Box = tuple[int, int, int, int]  # (top, bottom, left, right) of a tile's own region, in the tile's coordinates


def _blend_tiles(fn, x: Tensor, tile: int, overlap: int, scale_num: int, scale_den: int, out_channels: int) -> Tensor:
    """Apply ``fn(window, owned)`` to overlapping ``tile``-sized windows of ``x`` (B, C, H, W) and blend the outputs.

    ``fn`` maps a window of size s to an output of size s * scale_num / scale_den (the autoencoder's factor, up
    or down); ``owned`` is the window's share of ``x`` (a ``Box``, on the same grid as the starts). Tiles run one
    at a time; only the blended output and its weight map are held at full size.
    """
    B, _, H, W = x.shape
    oh, ow = H * scale_num // scale_den, W * scale_num // scale_den
    out = torch.zeros(B, out_channels, oh, ow, device=x.device)
    weight = torch.zeros(1, 1, oh, ow, device=x.device)
    unit = scale_den  # encoding: tiles start on the factor's grid so the latent tiles line up
    grids = []
    for n in (H, W):
        starts = tile_starts(n // unit, tile // unit, overlap // unit)
        owned = _owned(starts, tile // unit, n // unit)
        grids.append([(unit * s, unit * a, unit * b) for s, (a, b) in zip(starts, owned, strict=True)])
    for y, oy0, oy1 in grids[0]:
        for x0, ox0, ox1 in grids[1]:
            window = x[..., y : y + tile, x0 : x0 + tile]
            result = fn(window, (oy0, oy1, ox0, ox1)).float()  # (B, out_channels, th', tw')
            th, tw = result.shape[-2:]
            oy, ox = y * scale_num // scale_den, x0 * scale_num // scale_den
            ov = overlap * scale_num // scale_den
            wy = _ramp(th, min(ov, th), at_start=y == 0, at_end=y + tile >= H)
            wx = _ramp(tw, min(ov, tw), at_start=x0 == 0, at_end=x0 + tile >= W)
            w = (wy[:, None] * wx[None, :])[None, None].to(x.device)  # (1, 1, th', tw')
            out[..., oy : oy + th, ox : ox + tw] += result * w
            weight[..., oy : oy + th, ox : ox + tw] += w
    return out / weight


class WholeImageGroupNorm:
    """GroupNorm with statistics of the whole image, gathered tile by tile: a ``NormFn`` passed to a tile's
    ``Encoder.down`` / ``Decoder.up`` as ``norm``. One object per tiled call; the modules are not touched.

    GroupNorm normalizes by the mean and variance of each (sample, group) over all positions, so a tile
    normalized by its own statistics differs from the same region of the whole image. Here each GroupNorm layer
    adds the sum and sum of squares of the region its tile owns (float64) to a tally and normalizes by the
    statistics frozen by the last ``freeze()`` (its own tile's before the first). A pass over all tiles,
    ``freeze()``, and another pass makes every layer's statistics those of the whole image given the layers
    before it; each further pass corrects one more layer exactly and the rest to second order, while memory
    stays that of one tile (the statistics are (B, groups) per layer).
    """

    def __init__(self):
        self.frozen: dict[nn.GroupNorm, tuple[Tensor, Tensor]] = {}  # layer -> (mean, var), each (B, G) float64
        self.tally: dict[nn.GroupNorm, list] = {}  # layer -> [sum, sum of squares, count]
        self.box: tuple[Box, int, int] | None = None  # the running tile's owned box and its (height, width)

    def wrap(self, part):
        """``part(window, norm=)`` -> ``run(window, owned)`` for ``_blend_tiles``: tells the norms which region
        is the tile's and passes them to ``part``."""
        def run(window: Tensor, owned: Box) -> Tensor:
            self.box = (owned, *window.shape[-2:])
            return part(window, norm=self)
        return run

    def freeze(self) -> None:
        """The statistics gathered since the last call become the ones every norm uses."""
        for layer, (s, ss, n) in self.tally.items():
            mean = s / n
            self.frozen[layer] = (mean, (ss / n - mean * mean).clamp_min(0.0))
        self.tally = {}

    def __call__(self, layer: nn.GroupNorm, x: Tensor) -> Tensor:
        B, C, h, w = x.shape
        G = layer.num_groups
        xg = x.float().view(B, G, C // G, h, w)  # (B, G, C/G, h, w)
        (top, bottom, left, right), th, tw = self.box
        region = xg[..., top * h // th : bottom * h // th, left * w // tw : right * w // tw].double()
        s, ss, n = self.tally.get(layer, (0.0, 0.0, 0))
        self.tally[layer] = [s + region.sum((2, 3, 4)), ss + region.pow(2).sum((2, 3, 4)),
                             n + region[0, 0].numel()]
        if layer in self.frozen:
            mean, var = (t.float() for t in self.frozen[layer])
        else:
            var, mean = torch.var_mean(xg, dim=(2, 3, 4), unbiased=False)  # this tile's own, the first pass
        y = (xg - mean[..., None, None, None]) * torch.rsqrt(var[..., None, None, None] + layer.eps)
        y = y.view(B, C, h, w)
        if layer.affine:
            y = y * layer.weight.float().view(1, C, 1, 1) + layer.bias.float().view(1, C, 1, 1)
        return y


def _tile_runner(part, tile: int, overlap: int, scale_num: int, scale_den: int, out_channels: int,
                 passes: int | None) -> Part:
    """``part`` (``Encoder.down`` or ``Decoder.up``, bound) run on tiles with whole-image GroupNorm statistics:
    ``passes`` passes over the tiles; None: one per GroupNorm layer the tiles run and one more (exact)."""
    if passes is not None and passes < 1:
        raise ValueError(f"passes must be at least 1 (or None for exact statistics), got {passes}")

    def run_tiles(x: Tensor) -> Tensor:
        norms = WholeImageGroupNorm()  # this call's statistics: nothing is stored on the modules
        one_tile = x.shape[-2] <= tile and x.shape[-1] <= tile  # its own statistics are the image's
        done, n = 0, 1
        while done < n:
            out = _blend_tiles(norms.wrap(part), x, tile, overlap, scale_num, scale_den, out_channels)
            if done == 0 and not one_tile:  # the first pass shows which norms the tiles run
                n = len(norms.tally) + 1 if passes is None else passes
            norms.freeze()
            done += 1
        return out

    return run_tiles


@torch.no_grad()
def tiled_encode_posterior(autoencoder: AutoencoderKL, images: Tensor, tile: int = 512,
                           overlap: int = 64, passes: int | None = 4):
    """q(z|x) of images (B, 3, H, W), the encoder's full-resolution convolutions run on ``tile``-pixel tiles
    overlapping by ``overlap`` pixels (``WholeImageGroupNorm``, ``passes`` passes over the tiles), its
    latent-resolution head (mid self-attention) on the whole blended feature map.

    ``tile`` and ``overlap`` must be multiples of the factor. Works for KL and VQ autoencoders alike. Four
    passes bring a trained autoencoder's latents to 0.4-0.9 % mean relative difference from the untiled ones
    (BENCHMARKS.md; one pass, each tile's own statistics: 14-19 %); ``passes=None`` (one per GroupNorm layer,
    plus one) makes the statistics exact, and the result then equals the untiled one wherever the
    overlap's outer quarter covers the convolutions' reach (BENCHMARKS.md).
    """
    f = autoencoder.factor
    if tile % f or overlap % f:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of the autoencoder's factor {f}")
    encoder = autoencoder.encoder
    width = encoder.conv_norm_out.num_channels
    return autoencoder.encode_posterior(images, down=_tile_runner(encoder.down, tile, overlap, 1, f, width, passes))


def tiled_encode(autoencoder: AutoencoderKL, images: Tensor, tile: int = 512, overlap: int = 64,
                 passes: int | None = 4) -> Tensor:
    """Images -> normalized latents (posterior mode), tile by tile; see ``tiled_encode_posterior``."""
    return autoencoder.normalize(tiled_encode_posterior(autoencoder, images, tile, overlap, passes).mode())


@torch.no_grad()
def tiled_decode(autoencoder: AutoencoderKL, latents: Tensor, tile: int = 64, overlap: int = 8,
                 precision: str = "fp32", passes: int | None = 4) -> Tensor:
    """Normalized latents (B, C, h, w) -> images: the decoder's latent-resolution stem (mid self-attention) on
    the whole latent, its upsampling convolutions on ``tile``-latent tiles overlapping by ``overlap`` latent
    pixels (64 and 8 latents = 512 and 64 pixels at factor 8) with whole-image GroupNorm statistics
    (``WholeImageGroupNorm``, ``passes`` passes). Runs through ``decode_with_fallback`` at ``precision``."""
    if latents.ndim != 4 or latents.shape[1] != autoencoder.latent_channels:
        raise ValueError(f"expected latents of shape (B, {autoencoder.latent_channels}, h, w), "
                         f"got {tuple(latents.shape)}")
    tiles = _tile_runner(autoencoder.decoder.up, tile, overlap, autoencoder.factor, 1, autoencoder.config.in_channels,
                         passes)
    return decode_with_fallback(autoencoder, latents, precision, up=tiles)


# ----------------------------------------------------------------------------- precision


@torch.no_grad()
def decode_with_fallback(autoencoder: AutoencoderKL, latents: Tensor, precision: str = "bf16",
                         quiet: bool = False, up: Part | None = None) -> Tensor:
    """Decode under ``precision`` (``runtime.autocast``: "fp32", "bf16" or "fp16"); if the output holds NaN or inf,
    decode again in fp32 (and say so on stderr unless ``quiet``). ``up``: the decoder's full-resolution part run
    another way (tiles; ``AutoencoderKL.decode``). Returns float32 NCHW images."""
    check_precision(precision)
    if precision != "fp32":
        with autocast(precision, latents.device, autoencoder):
            images = autoencoder.decode(latents, up)
        if torch.isfinite(images).all():
            return images.to(torch.float32, memory_format=torch.contiguous_format)
        if not quiet:
            print(f"decode in {precision} gave non-finite values; decoding again in fp32", file=sys.stderr)
    return autoencoder.decode(latents.float(), up).float()


# ----------------------------------------------------------------------------- one entry point for generation

AUTO_TILE_LATENTS = 128 * 128  # latent positions above which ``decode_latents`` tiles by itself (1024 px at f=8)


def decode_latents(autoencoder: AutoencoderKL, latents: Tensor, *, tiled: bool | None = None,
                   precision: str = "fp32", tile: int = 64, overlap: int = 8, passes: int | None = 4) -> Tensor:
    """Normalized latents -> float32 images, as generation wants them: tiled when ``tiled`` (None: when the
    latent has more than ``AUTO_TILE_LATENTS`` positions), decoded at ``precision`` with the fp32 fallback."""
    if tiled is None:
        tiled = latents.shape[-2] * latents.shape[-1] > AUTO_TILE_LATENTS
    if tiled:
        return tiled_decode(autoencoder, latents, tile, overlap, precision, passes)
    return decode_with_fallback(autoencoder, latents, precision)


def encode_image(autoencoder: AutoencoderKL, images: Tensor, *, tiled: bool | None = None, tile: int = 512,
                 overlap: int = 64, passes: int | None = 4) -> Tensor:
    """Images in [-1, 1] -> normalized latents (the posterior's mode), as editing wants them: tiled (``tile`` and
    ``overlap`` in pixels) when ``tiled`` (None: when the latent has more than ``AUTO_TILE_LATENTS`` positions)."""
    if tiled is None:
        f = autoencoder.factor
        tiled = (images.shape[-2] // f) * (images.shape[-1] // f) > AUTO_TILE_LATENTS
    if tiled:
        return tiled_encode(autoencoder, images, tile, overlap, passes)
    return autoencoder.encode(images)
