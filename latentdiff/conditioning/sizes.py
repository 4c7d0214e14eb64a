"""SDXL's size and crop conditioning (Podell et al. 2023, "micro-conditioning"), for networks with a pooled vector.

Each training image carries six integers, ``(original h, original w, crop top, crop left, target h, target w)``:
its size before resizing, where the crop of the resized image began, and the size it was trained at.
Each is embedded with the sinusoidal timestep embedding (``size_embed_dim`` features; SDXL: 256) and the
``6 * size_embed_dim`` features follow the pooled text vector in ``cond.vector``. At generation the
defaults ask for an uncropped image of the requested size (original = target, crop (0, 0)), which is
what steers an SDXL-style model away from the cut-off compositions its cropped training data had.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from latentdiff.models.layers import timestep_embedding
from latentdiff.types import Cond

NUM_IDS = 6  # original (h, w), crop (top, left), target (h, w)


def size_embedding(ids: Tensor, dim: int) -> Tensor:
    """(B, 6) size / crop ids -> (B, 6 * dim): each id's sinusoidal embedding, concatenated in order."""
    if ids.ndim != 2 or ids.shape[1] != NUM_IDS:
        raise ValueError(f"size ids must have shape (B, {NUM_IDS}) (original h, w, crop top, left, target h, w), "
                         f"got {tuple(ids.shape)}")
    return timestep_embedding(ids.reshape(-1), dim).reshape(len(ids), NUM_IDS * dim)


def size_ids(batch: int, height: int, width: int, original_size: tuple[int, int] | None = None,
             crop_top_left: tuple[int, int] = (0, 0)) -> Tensor:
    """The ids a generation asks for: (B, 6), original size defaulting to the target size, crop (0, 0)."""
    oh, ow = original_size or (height, width)
    return torch.tensor([[oh, ow, *crop_top_left, height, width]], dtype=torch.long).expand(batch, -1)


def with_sizes(cond: Cond, ids: Tensor, dim: int) -> Cond:
    """``cond`` with the embedded size ids appended to its pooled vector (which must be there)."""
    return with_vector_features(cond, lambda device: size_embedding(ids.to(device), dim), "size conditioning")


def for_size_conditioning(config: Any, dim: int) -> Any:
    """A text-adapted network config (``families.for_text_data``) whose vector also holds ``6 * dim`` size features."""
    return widen_vector(config, dim, NUM_IDS, "size_embed_dim", "size conditioning")


def with_vector_features(cond: Cond, features, what: str) -> Cond:
    """``cond`` with ``features(device)`` (B, n) appended to its pooled vector, which must be there."""
    if cond.vector is None:
        raise ValueError(f"{what} joins the pooled text vector, but the text encoder gave none")
    emb = features(cond.vector.device).to(cond.vector.dtype)
    return replace(cond, vector=torch.cat([cond.vector, emb], dim=-1))


def widen_vector(config: Any, dim: int, count: int, key: str, what: str) -> Any:
    """A network config whose pooled vector also holds ``count`` embeddings of ``dim`` (even) features each."""
    if dim < 2 or dim % 2:
        raise ValueError(f"{key} must be an even number >= 2, got {dim}")
    if getattr(config, "vector_dim", None) is None:
        raise ValueError(f"{what} needs a network with a pooled vector input (vector_dim)")
    return replace(config, vector_dim=config.vector_dim + count * dim)
