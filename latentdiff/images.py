"""Image helpers: tensors in [-1, 1] to PIL, grids, and PNG files that carry their generation parameters."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from latentdiff.io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8; one channel (a mel spectrogram) is shown as grey."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images)]


def make_grid(images: list[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized images into one, ``ncols`` per row (default: near square)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (32, 32, 32))
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % ncols) * (w + pad), pad + (i // ncols) * (h + pad)))
    return grid


def _png_info(parameters: dict | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    return info


def save_png(image: Image.Image, path: str | Path, parameters: dict | None = None) -> Path:
    """Save a PNG atomically; ``parameters`` go into a ``parameters`` text chunk as JSON."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(parameters))
    return path


def png_bytes(image: Image.Image, parameters: dict | None = None) -> bytes:
    """The PNG file :func:`save_png` writes, as bytes (the server's responses)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(parameters))
    return buffer.getvalue()


def save_gif(frames: list[Image.Image], path: str | Path, fps: float = 8.0) -> Path:
    """Save frames as an animated GIF (looping) atomically."""
    if not frames:
        raise ValueError("an animated GIF needs at least one frame")
    path = Path(path)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


def read_parameters(path) -> dict | None:
    """The generation parameters a PNG written by :func:`save_png` carries (a path or a binary file), or None."""
    with Image.open(path) as im:
        text = im.text.get("parameters") if hasattr(im, "text") else None
    return json.loads(text) if text else None
