"""Shared building blocks for the autoencoder and the denoisers.

Module and parameter names follow diffusers (``to_q``, ``to_out.0``, ``norm1``, ``conv_shortcut``, ...)
so that pretrained checkpoints map onto these modules name for name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(
    t: Tensor,
    dim: int,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, Vaswani et al. 2017 / Ho et al. 2020.

    The defaults give Stable Diffusion's convention ([cos, sin], frequencies exp(-ln(P) k / half)).
    Returns float32 (B, dim) whatever the input dtype: timesteps up to 1000 need float32 precision.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor of shape (B,), got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - downscale_freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # odd dim: one zero column, as diffusers
    return emb


def group_norm(channels: int, groups: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm, Wu & He 2018; checks that the channels split into the groups."""
    if channels % groups:
        raise ValueError(
            f"{channels} channels cannot be split into {groups} norm groups: "
            f"choose norm_groups dividing every channel count"
        )
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


# How a block applies its GroupNorm layers when the caller decides: ``norm(layer, x) -> normalized x``. Tiled
# autoencoder inference passes one holding whole-image statistics (``vae_inference.WholeImageGroupNorm``).
NormFn = Callable[[nn.GroupNorm, Tensor], Tensor]


def apply_norm(layer: nn.GroupNorm, x: Tensor, norm: NormFn | None) -> Tensor:
    """``layer(x)``, or ``norm(layer, x)`` when the caller passes its own way of normalizing."""
    return layer(x) if norm is None else norm(layer, x)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of a module (zero-init output layers, as in ControlNet and DiT); returns it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def key_padding_mask(mask: Tensor) -> Tensor:
    """(B, L) bool key mask, True = real token -> (B, 1, 1, L) SDPA mask.

    A row with no real token attends to every token (as an additive -10000 bias does in diffusers),
    instead of producing NaN.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"context_mask must be a bool tensor (True = real token), got {mask.dtype}")
    if mask.ndim != 2:
        raise ValueError(f"context_mask must have shape (B, L), got {tuple(mask.shape)}")
    mask = mask | ~mask.any(dim=-1, keepdim=True)  # (B, L)
    return mask[:, None, None, :]  # (B, 1, 1, L)


# Perturbed-attention guidance (Ahn et al. 2024) asks for the network's prediction with every self-attention
# map replaced by the identity (each token attends only to itself). A context variable says so for the current
# call only: thread-safe (one value per thread / task), and no module is changed. ``perturbed_self_attention``.
_IDENTITY_SELF_ATTENTION: ContextVar[bool] = ContextVar("identity_self_attention", default=False)


@contextlib.contextmanager
def perturbed_self_attention():
    """Within this block, every ``Attention`` used as self-attention returns its values unmixed (identity map)."""
    token = _IDENTITY_SELF_ATTENTION.set(True)
    try:
        yield
    finally:
        _IDENTITY_SELF_ATTENTION.reset(token)


def self_attention_perturbed() -> bool:
    """Whether ``perturbed_self_attention`` is on here (a compiled stand-in cannot follow it, so it refuses)."""
    return _IDENTITY_SELF_ATTENTION.get()


class Attention(nn.Module):
    """Multi-head (self or cross) attention through scaled_dot_product_attention, Vaswani et al. 2017."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        bias: bool = False,
        out_bias: bool = True,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(self.context_dim, inner, bias=bias)
        self.to_v = nn.Linear(self.context_dim, inner, bias=bias)
        # A list with one Linear so the keys read `to_out.0.weight`, as in diffusers checkpoints.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias)])

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                image_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, L, D), context (B, S, Dc) or None for self-attention, mask (B, S) bool True = real token;
        ``image_kv``: IP-Adapter's keys and values of image tokens (B, N, h*d) each, attended by the same queries
        in a softmax of their own and added before ``to_out`` (decoupled cross-attention, Ye et al. 2023)."""
        if context is None and _IDENTITY_SELF_ATTENTION.get():
            return self.to_out[0](self.to_v(x))  # identity attention map: each token keeps its own value
        context = x if context is None else context
        B, L, _ = x.shape
        S = context.shape[1]
        q = self.to_q(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)
        k = self.to_k(context).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, h, S, d)
        v = self.to_v(context).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, h, S, d)
        attn_mask = None if mask is None else key_padding_mask(mask)  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, L, d)
        if image_kv is not None:
            k_ip, v_ip = (t.reshape(B, -1, self.heads, self.head_dim).transpose(1, 2) for t in image_kv)  # (B, h, N, d)
            out = out + F.scaled_dot_product_attention(q, k_ip.to(q.dtype), v_ip.to(q.dtype))  # (B, h, L, d)
        out = out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim)  # (B, L, h*d)
        return self.to_out[0](out)  # (B, L, D)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over all pixels with GroupNorm and residual (the VAE's mid block)."""

    def __init__(self, channels: int, norm_groups: int = 32, eps: float = 1e-6):
        super().__init__(channels, heads=1, head_dim=channels, bias=True, out_bias=True)
        self.group_norm = group_norm(channels, norm_groups, eps)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class ResnetBlock2D(nn.Module):
    """Pre-activation residual block with optional time embedding, He et al. 2016 / Ho et al. 2020."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_dim: int | None = None,
        norm_groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels, norm_groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_channels) if temb_dim is not None else None
        self.norm2 = group_norm(out_channels, norm_groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None, norm: NormFn | None = None) -> Tensor:
        """``norm``: how to apply ``norm1`` / ``norm2`` (None: as they are; see ``apply_norm``)."""
        h = self.conv1(F.silu(apply_norm(self.norm1, x, norm)))  # (B, Co, H, W)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock2D was built with temb_dim: pass a time embedding")
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, Co, 1, 1) broadcast
        h = self.conv2(self.dropout(F.silu(apply_norm(self.norm2, h, norm))))  # (B, Co, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; ``asymmetric_pad`` pads right/bottom only, as the LDM/SD VAE encoder does."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


# ----------------------------------------------------------------------------- transformer backbones (DiT, MMDiT)


def check_token_width(hidden_size: int, num_heads: int) -> None:
    """Fail early on a transformer width that the heads or the 2-D sin-cos position embedding cannot split."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} must be divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden size {hidden_size} must be divisible by 4 (2-D sin-cos positions)")


def sincos_pos_embed_2d(dim: int, height: int, width: int, base_size: float, scale: float = 1.0) -> Tensor:
    """Fixed 2-D sine-cosine position embedding of a (height, width) token grid, (height * width, dim) float32.

    As in MAE / DiT / SD3 (and diffusers' ``get_2d_sincos_pos_embed``): the first half of the channels
    encodes the column, the second half the row, each as [sin, cos] with frequencies 10000^(-k / (dim / 4));
    positions are ``index / (size / base_size) / scale``, so a grid of ``base_size`` tokens has unit spacing.
    """
    if dim % 4:
        raise ValueError(f"position embedding width {dim} must be divisible by 4 (sin and cos of rows and columns)")
    rows = torch.arange(height, dtype=torch.float64) / (height / base_size) / scale  # (H,)
    cols = torch.arange(width, dtype=torch.float64) / (width / base_size) / scale  # (W,)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)

    def embed(pos: Tensor) -> Tensor:  # (N,) -> (N, dim/2)
        out = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    col_grid = cols[None, :].expand(height, width).reshape(-1)  # (H*W,) row-major tokens
    row_grid = rows[:, None].expand(height, width).reshape(-1)
    return torch.cat([embed(col_grid), embed(row_grid)], dim=1).float()  # (H*W, dim)


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), tokens row-major, channels last inside a patch."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(tokens: Tensor, p: int, height: int, width: int) -> Tensor:
    """(B, h * w, p * p * C) -> (B, C, h * p, w * p); the inverse of ``patchify`` (h, w in tokens)."""
    B, _, D = tokens.shape
    C = D // (p * p)
    x = tokens.reshape(B, height, width, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, height * p, width * p)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (a strided conv ``proj``) plus a fixed sine-cosine position embedding.

    With ``max_grid`` the table is computed once for a max_grid x max_grid grid, stored (key ``pos_embed``, as
    SD3 checkpoints hold it) and center-cropped to the input; without it, it is computed for the input's grid
    with ``base_size`` tokens at unit spacing (DiT), and not stored.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, base_size: int, max_grid: int | None = None,
                 scale: float = 1.0):
        super().__init__()
        self.patch_size, self.base_size, self.max_grid, self.scale = patch_size, base_size, max_grid, scale
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        if max_grid is not None:
            table = sincos_pos_embed_2d(dim, max_grid, max_grid, base_size, scale)[None]  # (1, G*G, D)
            self.register_buffer("pos_embed", table, persistent=True)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) of an input of this size; refuses sizes the patches or the table do not cover."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} must be divisible by the patch size {p}: pad or crop it")
        h, w = height // p, width // p
        if self.max_grid is not None and max(h, w) > self.max_grid:
            raise ValueError(f"a {height}x{width} latent makes a {h}x{w} token grid, larger than the position "
                             f"table's {self.max_grid}x{self.max_grid}: use a smaller size")
        return h, w

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, h * w, dim)."""
        h, w = self.grid(*x.shape[-2:])
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        if self.max_grid is None:
            pos = sincos_pos_embed_2d(tokens.shape[-1], h, w, self.base_size, self.scale).to(x.device)
        else:
            G = self.max_grid
            top, left = (G - h) // 2, (G - w) // 2
            pos = self.pos_embed.view(G, G, -1)[top:top + h, left:left + w].reshape(h * w, -1)  # center crop
        return tokens + pos[None].to(tokens.dtype)


class GELUProj(nn.Module):
    """Linear then tanh-approximated GELU (diffusers' ``GELU`` with ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class MLP(nn.Module):
    """Transformer MLP, Linear -> GELU(tanh) -> Linear; keys ``net.0.proj`` / ``net.2`` as in diffusers."""

    def __init__(self, dim: int, mult: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mult)
        self.net = nn.Sequential(GELUProj(dim, hidden), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation, Peebles & Xie 2023: x (B, L, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaNorm(nn.Module):
    """Parameter-free LayerNorm whose shift/scale/gate vectors come from the conditioning vector (adaLN).

    ``linear`` maps SiLU(c) to ``chunks`` vectors of width dim; their order is the caller's
    (diffusers: shift, scale, gate, shift, scale, gate for adaLN-Zero; scale, shift for the final norm).
    """

    def __init__(self, dim: int, cond_dim: int, chunks: int, eps: float = 1e-6):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(cond_dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def params(self, c: Tensor) -> tuple[Tensor, ...]:
        """c (B, cond_dim) -> ``chunks`` tensors (B, dim)."""
        return self.linear(F.silu(c)).chunk(self.chunks, dim=1)
