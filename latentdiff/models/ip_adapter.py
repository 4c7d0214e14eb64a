"""IP-Adapter, Ye et al. 2023: an image prompt through decoupled cross-attention.

An image encoder's embedding of a reference image is projected to ``tokens`` context-width tokens (``ImageProjection``:
a linear map + LayerNorm, the original IP-Adapter's ``image_proj``), and every cross-attention layer of the U-Net gets
two extra projections, ``to_k_ip`` / ``to_v_ip`` (context width -> the layer's width, no bias), of those tokens. The
layer's queries attend to them in a softmax of their own, and that output, times ``scale``, is added to the text
cross-attention's before ``to_out``.

The U-Net holds none of this: ``IPAdapter(image_embeds, scale)`` computes each layer's keys and values once per
generation and they travel in ``Cond.image_kv`` (``scale`` folded into the values: the attention output is linear in
them), so a loaded adapter changes no module and a U-Net shared between threads serves calls with and without one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from latentdiff.conditioning.image_encoder import as_pil
from latentdiff.types import Cond


@dataclass
class IPAdapterConfig:
    image_embed_dim: int  # width of the image encoder's embedding (CLIP's projected image_embeds)
    context_dim: int  # the U-Net's cross-attention context width (the tokens' width)
    tokens: int = 4  # image tokens the projection makes (the original IP-Adapter: 4)
    widths: tuple[int, ...] = ()  # each cross-attention layer's width (heads x head_dim), in Cond.image_kv order

    def __post_init__(self):
        self.widths = tuple(self.widths)
        if min(self.image_embed_dim, self.context_dim, self.tokens) < 1 or not self.widths:
            raise ValueError(f"an IP-Adapter needs positive widths, tokens and at least one layer, got {self}")


class ImageProjection(nn.Module):
    """Image embedding (B, E) -> (B, tokens, D) tokens: Linear then LayerNorm (IP-Adapter's ``image_proj``)."""

    def __init__(self, image_embed_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(image_embed_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        B = embeds.shape[0]
        h = self.proj(embeds.to(self.proj.weight.dtype))  # (B, N * D)
        return self.norm(h.reshape(B, self.tokens, -1))  # (B, N, D)


class IPLayer(nn.Module):
    """The two projections one cross-attention layer adds: image tokens -> its keys and values."""

    def __init__(self, context_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)


class IPAdapter(nn.Module):
    """The image projection and one ``IPLayer`` per cross-attention layer of the U-Net it was made for."""

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = config
        self.image_proj = ImageProjection(config.image_embed_dim, config.context_dim, config.tokens)
        self.layers = nn.ModuleList([IPLayer(config.context_dim, w) for w in config.widths])

    @classmethod
    def for_unet(cls, unet, image_embed_dim: int, tokens: int = 4) -> IPAdapter:
        """A fresh adapter for ``unet`` (our ``UNet``): one layer per cross-attention, in its order."""
        widths = [attn.heads * attn.head_dim for _, attn in unet.cross_attentions()]
        if not widths:
            raise ValueError("this U-Net has no cross-attention (context_dim=None): an IP-Adapter has nothing to add to")
        return cls(IPAdapterConfig(image_embed_dim, unet.config.context_dim, tokens, tuple(widths)))

    def check_unet(self, unet, name: str = "the IP-Adapter") -> None:
        """Refuse a U-Net this adapter was not made for, naming the first layer that differs."""
        layers = unet.cross_attentions() if hasattr(unet, "cross_attentions") else []
        if not layers:
            raise ValueError(f"{name} needs a U-Net with cross-attention; this model's denoiser is "
                             f"{type(unet).__name__}")
        if unet.config.context_dim != self.config.context_dim:
            raise ValueError(f"{name} makes {self.config.context_dim}-wide tokens, this U-Net's cross-attention "
                             f"context is {unet.config.context_dim} wide: it was made for another base model")
        if len(layers) != len(self.config.widths):
            raise ValueError(f"{name} has {len(self.config.widths)} layers, this U-Net {len(layers)} cross-attention "
                             "layers: it was made for another base model")
        for (path, attn), w in zip(layers, self.config.widths):
            if attn.heads * attn.head_dim != w:
                raise ValueError(f"{name}: {path} is {attn.heads * attn.head_dim} wide, the adapter's layer {w}")

    def tokens(self, image_embeds: Tensor) -> Tensor:
        """Image embeddings (B, E) -> image tokens (B, N, D)."""
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.config.image_embed_dim:
            raise ValueError(f"image embeddings have shape {tuple(image_embeds.shape)}, this IP-Adapter takes "
                             f"(B, {self.config.image_embed_dim}): an image encoder of another width?")
        return self.image_proj(image_embeds)

    def forward(self, image_embeds: Tensor, scale: float | Tensor = 1.0) -> list[Tensor]:
        """``Cond.image_kv`` for image embeddings (B, E): [k0, v0, k1, v1, ...], each (B, N, width), the values
        times ``scale`` (a number, or (B,) one per row)."""
        tokens = self.tokens(image_embeds)  # (B, N, D)
        s = torch.as_tensor(scale, dtype=tokens.dtype, device=tokens.device).reshape(-1, 1, 1)  # (1 or B, 1, 1)
        out = []
        for layer in self.layers:
            out += [layer.to_k_ip(tokens), layer.to_v_ip(tokens) * s]
        return out


def with_image_prompt(cond: Cond, adapter: IPAdapter, image_embeds: Tensor, scale: float | Tensor) -> Cond:
    """``cond`` with the adapter's keys and values of ``image_embeds`` (one row per row of cond) added."""
    return replace(cond, image_kv=adapter(image_embeds, scale))


@dataclass
class ShapesEncoderConfig:
    size: int = 32  # pixels a reference image is resized to (the model's image size)
    channels: tuple[int, ...] = (32, 64, 64)  # widths of the stride-2 convolutions
    embed_dim: int = 128  # width of the embedding

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if self.size % 2 ** len(self.channels) or min(self.size, self.embed_dim, *self.channels) < 1:
            raise ValueError(f"the image size {self.size} must be divisible by 2 ** {len(self.channels)} (one halving "
                             f"per convolution), and every width positive")


class ShapesImageEncoder(nn.Module):
    """The built-in image encoder for image prompts on small models: an image (B, 3, S, S) in [-1, 1] -> stride-2
    3x3 convolutions with SiLU -> a linear map of the flattened features (so where things are is kept) -> (B, E).
    Trained together with the adapter (``latentdiff train-ip-adapter``); what CLIP is for SD's IP-Adapter."""

    def __init__(self, config: ShapesEncoderConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.SiLU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = config.size // 2 ** len(config.channels)
        self.proj = nn.Linear(c_in * side * side, config.embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def preprocess(self, image) -> Tensor:
        """One image (a path, PIL image, uint8 array or tensor in [-1, 1]) as (1, 3, S, S) in [-1, 1] (bicubic)."""
        size = self.config.size
        pixels = np.asarray(as_pil(image).resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, embed_dim)."""
        S = self.config.size
        if pixels.shape[1:] != (3, S, S):
            raise ValueError(f"the shapes image encoder takes (B, 3, {S}, {S}) pixels, got {tuple(pixels.shape)}")
        h = self.convs(pixels.to(self.proj.weight.dtype))  # (B, c, S / 2^k, S / 2^k)
        return self.proj(h.flatten(1))  # (B, E)
