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

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from latentdiff.conditioning.image_encoder import as_pil

PROJECTIONS = ("linear", "resampler")


@dataclass
class IPAdapterConfig:
    image_embed_dim: int  # width of the image encoder's output: its projected embedding, or (resampler) hidden states
    context_dim: int  # the U-Net's cross-attention context width (the tokens' width)
    tokens: int = 4  # image tokens the projection makes (the original IP-Adapter: 4; "plus": 16)
    widths: tuple[int, ...] = ()  # each cross-attention layer's width (heads x head_dim), in Cond.image_kv order
    projection: str = "linear"  # "linear" (ImageProjection, on embeddings) or "resampler" ("plus", on hidden states)
    hidden_dim: int = 0  # resampler: width of its latent queries
    depth: int = 0  # resampler: perceiver blocks
    heads: int = 0  # resampler: attention heads (of 64 channels, as in the original and diffusers)
    ff_mult: int = 4  # resampler: MLP expansion

    def __post_init__(self):
        self.widths = tuple(self.widths)
        if min(self.image_embed_dim, self.context_dim, self.tokens) < 1 or not self.widths:
            raise ValueError(f"an IP-Adapter needs positive widths, tokens and at least one layer, got {self}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"IP-Adapter projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.projection == "resampler" and min(self.hidden_dim, self.depth, self.heads, self.ff_mult) < 1:
            raise ValueError("a resampler needs positive hidden_dim, depth, heads and ff_mult")


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


class PerceiverAttention(nn.Module):
    """Latent queries attend to [image features; latents] (the perceiver resampler of Flamingo, Alayrac et al.
    2022, as IP-Adapter plus has it: ``norm1`` / ``norm2``, ``to_q``, fused ``to_kv``, ``to_out``, no biases)."""

    def __init__(self, dim: int, heads: int, head_dim: int = 64):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)  # (B, T, C), (B, N, C)
        B, N, _ = latents.shape
        q = self.to_q(latents)  # (B, N, h*d)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (B, T + N, h*d) each
        q, k, v = (t.reshape(B, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, h, ., d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))  # (B, N, C)


class Resampler(nn.Module):
    """IP-Adapter plus's projection: learned queries read the image encoder's hidden states (B, T, E) through
    perceiver blocks (attention + GELU MLP, each residual) -> (B, tokens, D); key names as in its files."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        c = cfg.hidden_dim
        self.latents = nn.Parameter(torch.randn(1, cfg.tokens, c) / c**0.5)
        self.proj_in = nn.Linear(cfg.image_embed_dim, c)
        self.proj_out = nn.Linear(c, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)
        self.layers = nn.ModuleList([nn.ModuleList([
            PerceiverAttention(c, cfg.heads),
            nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c * cfg.ff_mult, bias=False), nn.GELU(),
                          nn.Linear(c * cfg.ff_mult, c, bias=False))]) for _ in range(cfg.depth)])

    def forward(self, hidden: Tensor) -> Tensor:
        x = self.proj_in(hidden.to(self.proj_in.weight.dtype))  # (B, T, C)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, N, C)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # (B, N, D)


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
        self.image_proj = ImageProjection(config.image_embed_dim, config.context_dim, config.tokens) \
            if config.projection == "linear" else Resampler(config)
        self.layers = nn.ModuleList([IPLayer(config.context_dim, w) for w in config.widths])

    @classmethod
    def for_unet(cls, unet, image_embed_dim: int, tokens: int = 4, **projection) -> IPAdapter:
        """A fresh adapter for ``unet`` (our ``UNet``): one layer per cross-attention, in its order; ``projection``:
        ``IPAdapterConfig``'s projection fields (e.g. ``projection="resampler", hidden_dim=, depth=, heads=``)."""
        widths = [attn.heads * attn.head_dim for _, attn in unet.cross_attentions()]
        if not widths:
            raise ValueError("this U-Net has no cross-attention (context_dim=None): an IP-Adapter has nothing to add to")
        return cls(IPAdapterConfig(image_embed_dim, unet.config.context_dim, tokens, tuple(widths), **projection))

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

    @property
    def takes_hidden_states(self) -> bool:
        """Whether it reads the image encoder's hidden states (B, T, E) ("plus") rather than its embedding (B, E)."""
        return self.config.projection == "resampler"

    def tokens(self, image_embeds: Tensor) -> Tensor:
        """Image embeddings (B, E) (or, for a resampler, hidden states (B, T, E)) -> image tokens (B, N, D)."""
        ndim, what = (3, "T, ") if self.takes_hidden_states else (2, "")
        if image_embeds.ndim != ndim or image_embeds.shape[-1] != self.config.image_embed_dim:
            raise ValueError(f"image embeddings have shape {tuple(image_embeds.shape)}, this IP-Adapter takes "
                             f"(B, {what}{self.config.image_embed_dim}): an image encoder of another width?")
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
