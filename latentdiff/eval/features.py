"""Feature extractors for the distribution metrics, and cached reference features.

An extractor is any callable ``extractor(images) -> (B, D)`` on images ``(B, 3, H, W)`` in [-1, 1],
with a ``name`` (which weights; part of every cache key) and a ``dim``. Three come with latentdiff:

- ``InceptionFeatures``: the FID Inception-v3 (``latentdiff.eval.inception``), 2048-d, the features of
  pytorch-fid / torchmetrics / clean-fid, from the standard weight file on disk;
- ``DinoV2Features``: DINOv2's CLS token through ``transformers`` from a local folder (FD-DINOv2,
  Stein et al. 2023);
- ``ShapesFeatures``: a small CNN trained on the shapes set by latentdiff (``latentdiff.eval.shapes_net``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from latentdiff.io import file_digest, write_safetensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureExtractor(Protocol):
    name: str  # names the network and its weights; part of every cache key
    dim: int  # feature width

    def __call__(self, images: Tensor) -> Tensor: ...


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """(B, 3, H, W) float in [-1, 1], or a clear error."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, 3, H, W) tensor in [-1, 1], got {shape}")
    return images.float()


def check_same_size(a: Tensor, b: Tensor, what: str = "generated and reference images") -> None:
    """Refuse to compare image sets of different sizes (the metrics would measure the resize)."""
    if tuple(a.shape[-2:]) != tuple(b.shape[-2:]):
        raise ValueError(f"{what} differ in size ({a.shape[-2]}x{a.shape[-1]} vs {b.shape[-2]}x{b.shape[-1]}); "
                         "compare sets of one size: generate at the reference size or resize the reference images")


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: Tensor | Iterable[Tensor], batch_size: int = 64) -> np.ndarray:
    """Features (N, D) float64 of images (a (N, 3, H, W) tensor or an iterable of such batches)."""
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size)) \
        if isinstance(images, Tensor) else images
    out = []
    for batch in batches:
        feats = extractor(check_images(batch))
        if feats.ndim != 2 or feats.shape[1] != extractor.dim:
            raise ValueError(f"extractor {extractor.name} returned shape {tuple(feats.shape)}, expected (B, {extractor.dim})")
        out.append(feats.double().cpu().numpy())
    if not out:
        raise ValueError("no images to extract features from")
    return np.concatenate(out)


def feature_cache_path(extractor: FeatureExtractor, key: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """Where :func:`cached_features` keeps the features of ``key`` (None: not cached)."""
    return None if cache_dir is None else Path(cache_dir) / f"{extractor.name}--{key}.safetensors"


def cached_features(extractor: FeatureExtractor, key: str, make_images: Callable[[], Tensor],
                    cache_dir: str | os.PathLike | None, batch_size: int = 64) -> np.ndarray:
    """Reference features, read from ``cache_dir`` when present, else computed and written there.

    The file is keyed by the extractor's name (network + weights digest) and ``key``, which should name the
    data set and the count (e.g. ``shapes-train-s32-n1000-seed7``). ``cache_dir=None`` never caches.
    """
    path = feature_cache_path(extractor, key, cache_dir)
    if path is not None and path.is_file():
        feats = load_file(str(path))["features"]
        if feats.ndim == 2 and feats.shape[1] == extractor.dim:
            return feats.numpy()
    feats = extract(extractor, make_images(), batch_size)
    if path is not None:
        write_safetensors(path, {"features": torch.from_numpy(feats)}, metadata={"extractor": extractor.name,
                                                                               "key": key})
    return feats


# --- the extractors -----------------------------------------------------------------------------------


class InceptionFeatures:
    """FID Inception-v3 pool features (2048-d) from the standard weight file.

    ``resize="tf1"`` resizes non-299 images as torch-fidelity / torchmetrics do (TensorFlow 1.x bilinear)
    instead of pytorch-fid's ``F.interpolate``; it is part of the name, so cached features never mix.
    """

    dim = 2048

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu", resize: str = "bilinear"):
        from latentdiff.eval.inception import load_fid_inception, weight_candidates

        self.model = load_fid_inception(weights, resize).to(device)
        path = next(p for p in weight_candidates(weights) if p.is_file())
        self.name = f"inception-fid-{file_digest(path)}" + ("" if resize == "bilinear" else f"-{resize}")
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.model(images.to(self.device))


class DinoV2Features:
    """DINOv2 CLS features (the final layer-normed CLS token) from a local transformers folder, FD-DINOv2."""

    def __init__(self, folder: str | os.PathLike, image_size: int = 224, device: str = "cpu"):
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no DINOv2 model at {folder} (expected config.json and weights); save one with "
                                    "transformers' Dinov2Model.save_pretrained, e.g. facebook/dinov2-base, and pass "
                                    "its folder")
        from transformers import Dinov2Model

        self.model = Dinov2Model.from_pretrained(str(folder), local_files_only=True).eval().to(device)
        if image_size % self.model.config.patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of the patch size "
                             f"{self.model.config.patch_size}")
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        self.name = f"dinov2-{file_digest(weights[0]) if weights else folder.name}-{image_size}"
        self.dim = self.model.config.hidden_size
        self.image_size, self.device = image_size, device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = (images.to(self.device).float() + 1) / 2  # [0, 1]
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return self.model(pixel_values=(x - mean) / std).pooler_output  # (B, hidden)


class ShapesFeatures:
    """Penultimate features of latentdiff's shapes attribute network (``latentdiff train-features``)."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu"):
        from latentdiff.eval.shapes_net import load_shapes_net

        self.net, digest = load_shapes_net(folder)
        self.net.to(device)
        self.name = f"shapes-net-{digest}"
        self.dim = self.net.config.feature_dim
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.net.features(images.to(self.device))


def make_extractor(kind: str, path: str | None = None, device: str = "cpu") -> FeatureExtractor:
    """An extractor by name: "shapes" (a folder), "inception" (a .pth file or None; "inception-tf1": resized as
    torch-fidelity / torchmetrics do) or "dinov2" (a folder)."""
    if kind == "shapes":
        from latentdiff.eval.shapes_net import default_path

        return ShapesFeatures(path or default_path(), device)
    if kind == "inception":
        return InceptionFeatures(path, device)
    if kind == "inception-tf1":
        return InceptionFeatures(path, device, resize="tf1")
    if kind == "dinov2":
        if path is None:
            raise ValueError("the dinov2 extractor needs a local model folder (--feature-path DIR)")
        return DinoV2Features(path, device=device)
    raise ValueError(f"unknown feature extractor {kind!r}; choose shapes, inception, inception-tf1 or dinov2")
