"""Contracts shared across the package: the Cond dataclass and the component protocols."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class Cond:
    """Everything a denoiser is conditioned on, batched along dim 0."""

    context: Tensor | None = None  # (B, L, D) tokens for cross- or joint attention
    context_mask: Tensor | None = None  # (B, L) bool, True = real token
    vector: Tensor | None = None  # (B, D) pooled text / class / size embedding
    concat: Tensor | None = None  # (B, C, h, w) channels joined to the latent (inpaint mask, low-res)
    control: list[Tensor] | None = None  # ControlNet residuals
    image_kv: list[Tensor] | None = None  # IP-Adapter keys, values per cross-attention layer [k0, v0, k1, ...], (B, N, inner)

    def cat(self, other: Cond) -> Cond:
        """Batch-concatenate two Conds (used to run cond and uncond as one batch)."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if (a is None) != (b is None):
                raise ValueError(f"cannot concatenate Conds: field {f.name!r} is set in only one of them")
            if a is None:
                out[f.name] = None
            elif isinstance(a, list):
                out[f.name] = [torch.cat([x, y]) for x, y in zip(a, b, strict=True)]
            else:
                if f.name in ("context", "context_mask") and a.shape[1] != b.shape[1]:
                    raise ValueError(f"{f.name} lengths differ ({a.shape[1]} vs {b.shape[1]}): pad both to one length")
                out[f.name] = torch.cat([a, b])
        return Cond(**out)

    def map(self, fn) -> Cond:
        """Apply fn to every tensor (e.g. ``cond.map(lambda t: t.to(device))``)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif isinstance(v, list):
                out[f.name] = [fn(t) for t in v]
            else:
                out[f.name] = fn(v)
        return replace(self, **out)

    def repeat(self, n: int) -> Cond:
        """Repeat every row n times (repeat_interleave), e.g. several images per prompt."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))


@runtime_checkable
class Network(Protocol):
    """A raw network: ``network(x_in, c_noise, cond) -> raw output``; x_in (B, C, H, W), c_noise (B,)."""

    def __call__(self, x: Tensor, c_noise: Tensor, cond: Cond | None) -> Tensor: ...


@runtime_checkable
class DenoiserFn(Protocol):
    """A denoiser: ``denoiser(x, sigma, cond) -> x0_hat`` with x = x0 + sigma * eps, sigma (B,)."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor: ...


@runtime_checkable
class Conditioner(Protocol):
    """Turns a batch of prompts into a Cond."""

    def __call__(self, prompts: list[str]) -> Cond: ...
