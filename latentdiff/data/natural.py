"""Natural images that ship inside scikit-image (``skimage.data``): random crops to train on, whole images held out.

The shapes set is too easy to show an autoencoder works; these are real photographs and micrographs,
available offline wherever scikit-image is installed (an optional dependency, in the ``dev`` extra). The
three held-out photographs (astronaut, coffee, chelsea) are never cropped for training.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Bundled with scikit-image (no download); grayscale ones are repeated to RGB.
SKIMAGE_TRAIN = ("rocket", "hubble_deep_field", "motorcycle_left", "motorcycle_right", "retina",
                 "immunohistochemistry", "colorwheel", "camera", "moon", "coins", "gravel", "brick", "grass",
                 "horse", "page", "text", "cell", "clock", "logo")
SKIMAGE_HELDOUT = ("astronaut", "coffee", "chelsea")


def load_skimage(name: str) -> np.ndarray:
    """One bundled ``skimage.data`` image as (H, W, 3) uint8 RGB (alpha composited on white, gray repeated)."""
    try:
        from skimage import data
    except ImportError as e:
        raise ImportError("the 'skimage' data source needs scikit-image: pip install scikit-image") from e
    if name == "motorcycle_left":
        arr = data.stereo_motorcycle()[0]
    elif name == "motorcycle_right":
        arr = data.stereo_motorcycle()[1]
    else:
        arr = getattr(data, name)()
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float64) / max(1.0, float(arr.max())) * 255.0, 0, 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float64) / 255.0
        arr = (arr[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class RandomCrops:
    """``num`` square crops of ``size`` px from the given images; item i is a fixed function of (seed, i).

    Each crop comes from an image drawn in proportion to its area, at a random scale (the image first
    shrunk by 1 to 2x, so crops see both fine texture and larger structure), with a random horizontal flip.
    """

    def __init__(self, images: list[np.ndarray], size: int, num: int, seed: int = 0):
        small = [a.shape[:2] for a in images if min(a.shape[:2]) < 2 * size]
        if small:
            raise ValueError(f"images of size {small} are too small for {size}px crops at up to 2x reduction")
        self.images, self.size, self.num, self.seed = images, size, num, seed
        areas = np.array([a.shape[0] * a.shape[1] for a in images], dtype=np.float64)
        self.p = areas / areas.sum()

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num:
            raise IndexError(f"index {i} out of range for {self.num} crops")
        rng = np.random.default_rng((self.seed, i))
        arr = self.images[rng.choice(len(self.images), p=self.p)]
        side = round(self.size * rng.uniform(1.0, 2.0))  # crop this many source pixels, then resize
        y, x = rng.integers(0, arr.shape[0] - side + 1), rng.integers(0, arr.shape[1] - side + 1)
        crop = Image.fromarray(arr[y:y + side, x:x + side])
        if side != self.size:
            crop = crop.resize((self.size, self.size), Image.LANCZOS)
        out = np.asarray(crop)
        if rng.random() < 0.5:
            out = out[:, ::-1]
        return {"image": to_tensor(np.ascontiguousarray(out)), "caption": "", "scene": None}


def skimage_crops(size: int, num: int, seed: int = 0) -> RandomCrops:
    """Training crops from the bundled scikit-image images, held-out photographs excluded."""
    return RandomCrops([load_skimage(n) for n in SKIMAGE_TRAIN], size, num, seed)


def skimage_heldout(multiple: int = 16, max_side: int = 512) -> list[torch.Tensor]:
    """The held-out photographs whole, each (1, 3, H, W) in [-1, 1], shrunk to fit ``max_side`` and
    centre-cropped to multiples of ``multiple`` (so any factor up to it divides them)."""
    out = []
    for name in SKIMAGE_HELDOUT:
        im = Image.fromarray(load_skimage(name))
        scale = min(1.0, max_side / max(im.size))
        if scale < 1.0:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        w, h = im.width // multiple * multiple, im.height // multiple * multiple
        left, top = (im.width - w) // 2, (im.height - h) // 2
        out.append(to_tensor(np.asarray(im.crop((left, top, left + w, top + h))))[None])
    return out
