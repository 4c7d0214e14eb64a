"""Image encoders for image prompts (IP-Adapter): a CLIP vision model through transformers, from a local folder,
with CLIP's preprocessing written here (Pillow, numpy, torch; no torchvision).

``clip_preprocess`` is what transformers' ``CLIPImageProcessor`` does: RGB, the shorter side resized to the model's
size (bicubic, on 8-bit pixels), a centre crop of that size, values / 255, normalized with CLIP's mean and std.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_pil(image) -> Image.Image:
    """A path, a PIL image, a uint8 array (H, W, 3) or a float tensor (3, H, W) / (1, 3, H, W) in [-1, 1] as an RGB
    PIL image."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image prompt {path} does not exist")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"image prompt {path} is not a readable image ({e}): give a PNG or JPEG file") from e
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if torch.is_tensor(image):
        t = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if t.ndim != 3 or t.shape[0] != 3 or not t.is_floating_point():
            raise ValueError(f"an image-prompt tensor must be float (3, H, W) or (1, 3, H, W) in [-1, 1], got "
                             f"{t.dtype} {tuple(image.shape)}")
        image = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"an image-prompt array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    raise ValueError(f"an image prompt must be a path, a PIL image, a uint8 array or a tensor, got "
                     f"{type(image).__name__}")


def clip_preprocess(image, size: int, crop: int | None = None, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """One image as CLIP's pixel values (1, 3, crop, crop) float32: shorter side to ``size`` (bicubic), centre crop
    ``crop`` (default ``size``), [0, 1], then (x - mean) / std per channel (transformers' ``CLIPImageProcessor``)."""
    crop = crop or size
    im = as_pil(image)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    im = im.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    if top < 0 or left < 0:
        raise ValueError(f"crop {crop} is larger than the resized image {new_w}x{new_h}")
    x = np.asarray(im, dtype=np.uint8)[top:top + crop, left:left + crop].astype(np.float32) / 255.0  # (crop, crop, 3)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]  # (1, 3, crop, crop)


class CLIPImageEncoder(nn.Module):
    """transformers' ``CLIPVisionModelWithProjection`` from a local folder: images -> projected image embeddings
    (B, projection_dim), or with ``hidden_states=True`` the penultimate hidden states (B, tokens, width) (what the
    IP-Adapter "plus" models read). Its preprocessing is read from the folder's ``preprocessor_config.json``
    (size, crop, mean, std), else CLIP's at the model's ``image_size``."""

    def __init__(self, folder: str | Path):
        super().__init__()
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"image encoder {folder}: no config.json there; expected a folder saved by "
                                    "transformers' CLIPVisionModelWithProjection.save_pretrained")
        from transformers import CLIPVisionModelWithProjection

        self.folder = folder
        self.model = CLIPVisionModelWithProjection.from_pretrained(folder).eval().requires_grad_(False)
        size = self.model.config.image_size
        self.size, self.crop, self.mean, self.std = size, size, CLIP_MEAN, CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            s, c = cfg.get("size", size), cfg.get("crop_size", size)
            self.size = s.get("shortest_edge", size) if isinstance(s, dict) else int(s)
            self.crop = c.get("height", size) if isinstance(c, dict) else int(c)
            self.mean, self.std = tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))

    @property
    def embed_dim(self) -> int:
        """Width of the projected image embedding."""
        return self.model.config.projection_dim

    @property
    def hidden_dim(self) -> int:
        """Width of the hidden states (what IP-Adapter plus reads)."""
        return self.model.config.hidden_size

    def preprocess(self, image) -> Tensor:
        """One image (a path, PIL image, uint8 array or tensor in [-1, 1]) as this model's pixel values."""
        return clip_preprocess(image, self.size, self.crop, self.mean, self.std)

    def forward(self, pixels: Tensor, hidden_states: bool = False) -> Tensor:
        """Pixel values (B, 3, S, S) -> image embeddings (B, projection_dim)."""
        param = next(self.model.parameters())
        out = self.model(pixel_values=pixels.to(param.device, param.dtype), output_hidden_states=hidden_states)
        return out.hidden_states[-2] if hidden_states else out.image_embeds
