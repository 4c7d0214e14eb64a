"""The guidance scale w as conditioning (LCM's w-embedding, Luo et al. 2023): a distilled student that learned the
teacher's classifier-free guidance at many w is told which one to give.

w is embedded like a timestep (``w * 1000``, sinusoidal, ``dim`` features, as diffusers' LCM
``get_guidance_scale_embedding``) and the features follow the pooled vector in ``cond.vector``, so every
family with a pooled-vector input (U-Net ``add_embedding``, DiT / MMDiT ``vector_embedder``) adds a learned
projection of them to its time embedding. The student is made from its teacher with the new input columns of
that projection at zero (``train/distill.py``), so before training it is the teacher, whatever w.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from latentdiff.conditioning.sizes import widen_vector, with_vector_features
from latentdiff.models.layers import timestep_embedding
from latentdiff.types import Cond

W_SCALE = 1000.0  # w is embedded as the timestep w * 1000


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """(B,) guidance scales -> (B, dim) sinusoidal features of w * 1000."""
    if w.ndim != 1:
        raise ValueError(f"guidance scales must have shape (B,), got {tuple(w.shape)}")
    return timestep_embedding(w.float() * W_SCALE, dim)


def with_guidance_scale(cond: Cond, w: Tensor | float, dim: int) -> Cond:
    """``cond`` with the embedded guidance scale(s) ``w`` (a number, or one per row) appended to its pooled vector."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
    if cond.vector is not None and w.numel() == 1:
        w = w.expand(cond.vector.shape[0])
    return with_vector_features(cond, lambda device: guidance_embedding(w.to(device), dim),
                                "the guidance-scale embedding")


def for_guidance_embedding(config: Any, dim: int) -> Any:
    """A network config whose pooled vector also holds ``dim`` guidance-scale features."""
    return widen_vector(config, dim, 1, "guidance_embed_dim", "the guidance-scale embedding")
