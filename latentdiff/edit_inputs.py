"""The inputs of an edit (img2img, inpainting, outpainting): the image, the mask and the canvas, read, checked and
brought to the output size before any work; the soft masks in latent and pixel space; pasting the input back.

Sizes. The output is the size asked for, else the image's own (each side rounded to the nearest multiple of the
autoencoder's factor), plus the outpainting border. An image (or a mask) of another size is resized to it (bicubic
with antialiasing; a mask by nearest neighbour) and that is said on stderr, as long as the aspect ratio changes by
at most ``MAX_ASPECT_CHANGE`` (10 %); beyond that it is refused: the image would be visibly stretched, and cropping
or padding it is the caller's choice to make.

Masks. White (1) is repainted, black (0) kept; a mask that is not black and white is thresholded at 0.5 (said once
on stderr). In latent space (``latent_mask``) a latent cell is fully repainted when any of its pixels is
(max pooling), then a soft ring one latent cell wide outside it (``max(cover, blur(cover))``, a [1, 2, 1]
binomial blur): the repainted latent region covers every repainted pixel and fades into the kept one, so the
sampler blends the seam. Max pooling, not the share of repainted pixels (area interpolation): a cell half inside
the mask holds an object's corner, and blending it half back to the input's latent rounds the corner off (held-out
squares and triangles inpainted as circles: the asked object right in 0.83 of the shapes cases with area
interpolation against 0.89 with max pooling, BENCHMARKS.md). While noise dominates, the sampler uses the mask grown
by ``grow`` cells (``grown_latent_mask``; ``diffusion/editing.py`` says why). In pixel space (``paste_mask``, for pasting the input back after decoding) the ramp lies
inside the mask (``min(mask, blur(mask))``, ``factor`` binomial passes: a blur of standard deviation
sqrt(factor / 2) pixels): every black pixel is the input's exactly, and the generated pixels fade in from half
weight at the mask's edge to full weight about 2 sqrt(factor / 2) pixels inside it (4 at factor 8); a white
stroke narrower than that keeps part of the input's pixels.

Outpainting is inpainting on a larger canvas: the image padded by (left, top, right, bottom) pixels, the border
filled by repeating the image's edge pixels (a start that matters where strength < 1, and at the soft edge), and
the mask white on the border (and wherever a given mask is white inside the image).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

MAX_ASPECT_CHANGE = 1.1  # an image or mask resized to the output may change its aspect ratio by this factor at most
IMG2IMG_STRENGTH = 0.8  # strength of img2img when none is given (diffusers' default); inpainting and outpainting: 1
SIDES = ("left", "top", "right", "bottom")  # the order of ``outpaint``


def say(text: str) -> None:
    """A note about the inputs of an edit, on stderr."""
    print(f"latentdiff: {text}", file=sys.stderr)


@dataclass
class Edit:
    """An edit's inputs at the output size."""

    pixels: Tensor  # (1, 3, H, W) in [-1, 1]: the image (outpainting: on its canvas, the border filled)
    mask: Tensor | None  # (1, 1, H, W), 1 = repaint, 0 = keep; None: img2img (the whole image is repainted)
    strength: float  # in (0, 1]: the share of the grid's steps that are run
    paste_back: bool = True  # inpainting: the input's pixels pasted back outside the mask after decoding
    paste_weight: Tensor | None = None  # (1, 1, H, W): the generated pixels' weight when pasting (``paste_mask``)
    grow: int = 1  # latent cells the repainted region grows by while noise dominates (``grown_latent_mask``)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the output."""
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])

    def paste(self, images: Tensor) -> Tensor:
        """Decoded images (B, 3, H, W) with the input's pixels outside the mask; as they are for img2img or
        ``paste_back=False``."""
        if self.paste_weight is None or not self.paste_back:
            return images
        m = self.paste_weight.to(images.device, images.dtype)
        return m * images + (1 - m) * self.pixels.to(images.device, images.dtype)


def edit_strength(strength: float | None, masked: bool) -> float:
    """The strength an edit runs at: the one given, else 1 for inpainting and outpainting, ``IMG2IMG_STRENGTH``
    for img2img."""
    if strength is not None:
        return float(strength)
    return 1.0 if masked else IMG2IMG_STRENGTH


def read_image(image) -> Tensor:
    """An image as (1, 3, H, W) float32 in [-1, 1]: a path, a PIL image (any mode; alpha is dropped), a uint8
    array (H, W, 3) as ``generate(output="np")`` gives, or a float tensor (3, H, W) / (1, 3, H, W) in [-1, 1] as
    ``generate(output="pt")`` gives (clamped to [-1, 1])."""
    if isinstance(image, (str, os.PathLike)):
        image = _open(image, "image")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3 or image.size == 0:
            raise ValueError(f"an image array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        image = torch.from_numpy(np.array(image.reshape(-1, *image.shape[-3:]))).permute(0, 3, 1, 2)
        image = image.float() / 127.5 - 1
    if not torch.is_tensor(image):
        raise ValueError(f"image must be a path, a PIL image, a uint8 array or a tensor, got {type(image).__name__}")
    image = image[None] if image.ndim == 3 else image
    if image.ndim != 4 or image.shape[:2] != (1, 3) or not image.is_floating_point():
        raise ValueError(f"an image tensor must be float (3, H, W) or (1, 3, H, W) in [-1, 1] (one image), got "
                         f"{image.dtype} {tuple(image.shape)}")
    if not bool(torch.isfinite(image).all()) or image.min() < -2 or image.max() > 2:  # a decoder overshoots a bit
        raise ValueError(f"an image tensor's values must lie in [-1, 1] (a little beyond is clamped), got "
                         f"[{image.min():g}, {image.max():g}]: is it in [0, 255]?")
    return image.detach().float().cpu().clamp(-1, 1).contiguous()  # NCHW, whatever layout it came in


def read_mask(mask) -> Tensor:
    """A mask as (1, 1, H, W) float32 of 0 (keep) and 1 (repaint), thresholded at 0.5 if it is not black and white
    (said): a path, a PIL image (L, RGB, ...; its luminance), a uint8, bool or float [0, 1] array or tensor
    (H, W), (1, H, W) or (1, 1, H, W)."""
    if isinstance(mask, (str, os.PathLike)):
        mask = _open(mask, "mask")
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask))
    if not torch.is_tensor(mask):
        raise ValueError(f"mask must be a path, a PIL image, an array or a tensor, got {type(mask).__name__}")
    mask = mask.detach().cpu()
    mask = mask.float() / 255 if mask.dtype == torch.uint8 else mask.float()
    while mask.ndim < 4:
        mask = mask[None]
    if mask.ndim != 4 or mask.shape[:2] != (1, 1) or mask.numel() == 0:
        raise ValueError(f"a mask must be (H, W), (1, H, W) or (1, 1, H, W), got {tuple(mask.shape)}")
    if not bool(torch.isfinite(mask).all()) or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"a mask's values must lie in [0, 1] (1 = repaint; uint8: 0..255), got "
                         f"[{mask.min():g}, {mask.max():g}]")
    grey = int(((mask > 0) & (mask < 1)).sum())
    if grey:
        say(f"the mask is not black and white ({grey} of {mask.numel()} pixels grey): thresholded at 0.5")
    return (mask >= 0.5).float()


def _open(path, what: str) -> Image.Image:
    """A PIL image read from ``path``, or an error naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError as e:
        raise FileNotFoundError(e.errno, f"no {what} file", str(path)) from None
    except OSError as e:
        if e.errno is not None:
            raise
        raise ValueError(f"{what} {path} cannot be read as an image ({e}): give a PNG, JPEG or another format "
                         "Pillow reads") from None


def check_outpaint(outpaint, factor: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) pixels to add: each a non-negative multiple of ``factor``, not all 0."""
    if outpaint is None:
        return None
    pad = tuple(outpaint)
    if len(pad) != 4 or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in pad):
        raise ValueError(f"outpaint must be 4 whole numbers of pixels ({', '.join(SIDES)}), got {outpaint!r}")
    bad = [f"{side}={p}" for side, p in zip(SIDES, pad) if p < 0 or p % factor]
    if bad:
        raise ValueError(f"outpaint {', '.join(bad)}: each side must be a non-negative multiple of the autoencoder's "
                         f"factor {factor}")
    if not any(pad):
        raise ValueError("outpaint adds no pixels: give at least one side, e.g. left=32")
    return tuple(int(p) for p in pad)


def _fit(t: Tensor, size: tuple[int, int], what: str, target: str, mode: str, rounding: bool = False) -> Tensor:
    """``t`` (1, C, h, w) resized to ``size`` (said), or refused when that changes its aspect ratio too much (not
    when ``rounding``: its own size rounded to the factor, at most factor / 2 pixels a side)."""
    h, w = t.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return t
    change = (w / h) / (W / H)
    if not rounding and max(change, 1 / change) > MAX_ASPECT_CHANGE:
        raise ValueError(f"{what} is {w}x{h} but {target} is {W}x{H}: resizing would stretch it (aspect ratios "
                         f"{w / h:.3g} and {W / H:.3g} differ by more than {MAX_ASPECT_CHANGE - 1:.0%}); crop or pad "
                         "it to the aspect ratio asked for, or ask for its own size")
    say(f"{what} {w}x{h} resized to {W}x{H} ({target})")
    if mode == "nearest":
        return F.interpolate(t, size=(H, W), mode="nearest-exact")
    return F.interpolate(t, size=(H, W), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def prepare_edit(image, *, mask=None, outpaint=None, strength: float | None = None, paste_back: bool = True,
                 height: int | None = None, width: int | None = None, factor: int, grow: int = 1) -> Edit | None:
    """The edit of a ``generate`` call, checked and at the output size; None without an image (a mask, outpaint
    or strength without one is an error). ``height`` / ``width``: the output asked for (None: the image's own
    size plus the outpainting border, rounded to multiples of ``factor``)."""
    if image is None:
        given = [name for name, value in (("mask", mask), ("outpaint", outpaint), ("strength", strength))
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} given without an image: pass image= (--image FILE), the image "
                             "to edit")
        return None
    left, top, right, bottom = check_outpaint(outpaint, factor) or (0, 0, 0, 0)
    strength = edit_strength(strength, mask is not None or outpaint is not None)
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if isinstance(grow, bool) or not isinstance(grow, int) or not 0 <= grow <= 16:
        raise ValueError(f"mask_grow must be a whole number of latent cells in [0, 16], got {grow!r}")
    pixels = read_image(image)
    keep = read_mask(mask) if mask is not None else None
    h, w = pixels.shape[-2:]
    fit = lambda n: max(factor, round(n / factor) * factor)
    inner = ((height - top - bottom) if height else fit(h), (width - left - right) if width else fit(w))
    if min(inner) < factor:
        raise ValueError(f"an output of {width}x{height} leaves the image {inner[1]}x{inner[0]} pixels inside the "
                         f"outpainting border: ask for a larger size or a smaller border")
    asked = "the requested size" if height or width else f"multiples of the autoencoder's factor {factor}"
    pixels = _fit(pixels, inner, "image", asked + (" less the outpainting border" if outpaint else ""), "bicubic",
                  rounding=not (height or width))
    if keep is not None:
        if keep.shape[-2:] != (h, w):
            keep = _fit(keep, (h, w), "mask", "the image", "nearest")
        keep = F.interpolate(keep, size=inner, mode="nearest-exact") if keep.shape[-2:] != inner else keep
    if outpaint is not None:
        pixels = F.pad(pixels, (left, right, top, bottom), mode="replicate")
        keep = F.pad(keep if keep is not None else torch.zeros(1, 1, *inner), (left, right, top, bottom), value=1.0)
    return Edit(pixels, keep, strength, paste_back, paste_mask(keep, factor) if keep is not None else None, grow)


def read_control(image, size: tuple[int, int], channels: int = 3) -> Tensor:
    """A ControlNet's control image as (1, channels, H, W) in [0, 1] (diffusers' control images are not normalized
    to [-1, 1]) at the output ``size`` (height, width): any input ``read_image`` takes, resized when its size differs
    (said on stderr; refused when that would stretch it, as for an edit's image); one channel: its luminance."""
    pixels = (_fit(read_image(image), size, "control image", "the requested size", "bicubic") + 1) / 2
    if channels == 3:
        return pixels
    if channels == 1:
        return (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    raise ValueError(f"a ControlNet that reads {channels}-channel control images cannot take an RGB image")


def _blur(x: Tensor, passes: int = 1) -> Tensor:
    """``passes`` [1, 2, 1] x [1, 2, 1] / 16 binomial blurs of (B, 1, H, W), edges replicated."""
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    for _ in range(passes):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
    return x


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """A pixel mask (1, 1, H, W) of 0 / 1 at latent size (H / factor, W / factor), in [0, 1]: 1 on every cell
    with a repainted pixel (max pooling), grown by a soft ring one latent cell wide (module docstring)."""
    cover = F.max_pool2d(mask, factor)
    return torch.maximum(cover, _blur(cover)).clamp(0, 1)


def grown_latent_mask(m: Tensor, cells: int) -> Tensor:
    """A latent mask (``latent_mask``) whose fully repainted cells are grown by ``cells`` latent cells, hard-edged
    (covering its soft ring): the mask the sampler uses while noise dominates (``diffusion/editing.py``); 0: ``m``."""
    if cells == 0:
        return m
    cover = (m >= 1).to(m.dtype)
    return torch.maximum(F.max_pool2d(cover, 2 * cells + 1, stride=1, padding=cells), m)


def paste_mask(mask: Tensor, factor: int) -> Tensor:
    """The weight of the generated pixels when the input is pasted back: 0 wherever ``mask`` is 0 (those pixels
    are the input's exactly), rising from about 0.5 at its edge to 1 a few pixels inside it (module docstring)."""
    return torch.minimum(mask, _blur(mask, passes=factor)).clamp(0, 1)

