"""Multimodal Diffusion Transformer (MMDiT), Esser et al. 2024, "Scaling Rectified Flow Transformers" (SD3).

Image patches and text tokens are two streams with their own weights (projections, MLPs, adaLN
modulation) that meet in one joint attention over the concatenated sequence [image tokens, text tokens].
The conditioning vector c = timestep embedding + MLP(pooled text) modulates both streams (adaLN-Zero).
Optionally the queries and keys of each head are RMS-normalized (``qk_norm``, as in SD3.5) for stable
training at scale. The last block is "context pre-only": the text stream only feeds the attention there,
since nothing reads its output afterwards.

Conditioning: ``cond.context`` (B, L, context_dim) text tokens (``cond.context_mask`` masks padding keys;
diffusers' SD3 has no mask, so without one both agree), ``cond.vector`` (B, vector_dim) pooled text.
The network is trained with rectified flow and logit-normal timesteps (parameterization "flow",
sigma sampler "logitnormal"); its c_noise is the flow time t in [0, 1] times 1000, SD3's timestep.

Module and parameter names are those of diffusers' ``SD3Transformer2DModel`` (``pos_embed.proj``,
``time_text_embed.text_embedder``, ``context_embedder``, ``transformer_blocks.N.attn.add_q_proj``,
``norm1_context``, ``ff_context``, ``norm_out``, ``proj_out``), so its state dict loads one to one.
SD3.5's extra self-attention in the first blocks (``dual_attention_layers``) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..types import Cond
from .layers import (
    MLP,
    AdaNorm,
    PatchEmbed,
    check_token_width,
    key_padding_mask,
    modulate,
    timestep_embedding,
    unpatchify,
)
from .unet import TimestepEmbedding


@dataclass
class MMDiTConfig:
    in_channels: int = 16  # latent channels in (and out)
    sample_size: int = 128  # training latent size: the position table has unit spacing at sample_size / patch
    patch_size: int = 2  # p: tokens are p x p patches
    hidden_size: int = 1536  # token width D of both streams (heads x 64 in SD3)
    depth: int = 24  # joint blocks; the last one is context pre-only
    num_heads: int = 24  # attention heads
    context_dim: int = 4096  # width of the text tokens cond.context (SD3: CLIP-L + CLIP-G padded, and T5)
    vector_dim: int = 2048  # width of the pooled text cond.vector (SD3: CLIP-L + CLIP-G pooled)
    pos_embed_max_size: int = 192  # the stored position table covers this many tokens per side (center crop)
    qk_norm: bool = False  # RMS-normalize queries and keys per head (SD3.5)
    mlp_ratio: float = 4.0  # MLP hidden width / D
    gradient_checkpointing: bool = False  # recompute blocks in backward to save memory

    def __post_init__(self):
        check_token_width(self.hidden_size, self.num_heads)
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} must be divisible by patch_size {self.patch_size}")


PRESETS: dict[str, MMDiTConfig] = {
    # Stable Diffusion 3 medium (2B): 24 blocks of width 1536, 128x128x16 latents of 1024 px images.
    "sd3-medium": MMDiTConfig(),
    # Stable Diffusion 3.5 large (8B): 38 blocks of width 2432, QK RMS-norm.
    "sd35-large": MMDiTConfig(hidden_size=2432, depth=38, num_heads=38, qk_norm=True),
    # For 8x8 or 16x16 latents of the shapes data, with the built-in text encoder; trains on a CPU.
    "mmdit-shapes": MMDiTConfig(in_channels=4, sample_size=32, patch_size=2, hidden_size=192, depth=6, num_heads=6,
                                context_dim=256, vector_dim=256, pos_embed_max_size=16, qk_norm=True),
    # For tests of the training loop: the smallest network that still has every part.
    "mmdit-tiny": MMDiTConfig(in_channels=4, sample_size=32, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                              context_dim=256, vector_dim=256, pos_embed_max_size=16, qk_norm=True),
}


class TimeTextEmbed(nn.Module):
    """c = MLP(sinusoidal(t)) + MLP(pooled text): ``timestep_embedder`` and ``text_embedder``."""

    def __init__(self, dim: int, vector_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(vector_dim, dim)  # same shape: linear_1, SiLU, linear_2

    def forward(self, c_noise: Tensor, pooled: Tensor) -> Tensor:
        t = timestep_embedding(c_noise, 256)  # (B, 256) float32, [cos, sin]
        w = self.timestep_embedder.linear_1.weight
        return self.timestep_embedder(t.to(w.dtype)) + self.text_embedder(pooled.to(w.dtype))  # (B, D)


class JointAttention(nn.Module):
    """One attention over [image tokens, text tokens] with separate q/k/v/out weights per stream."""

    def __init__(self, dim: int, heads: int, context_pre_only: bool, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # key to_out.0, as in diffusers
        if not context_pre_only:
            self.to_add_out = nn.Linear(dim, dim)
        if qk_norm:
            hd = self.head_dim
            self.norm_q, self.norm_k = nn.RMSNorm(hd, eps=1e-6), nn.RMSNorm(hd, eps=1e-6)
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(hd, eps=1e-6), nn.RMSNorm(hd, eps=1e-6)

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D) image tokens, ctx (B, L, D) text tokens, mask (B, L) -> (image out, text out or None)."""
        B, N, D = x.shape
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        cq, ck, cv = self._heads(self.add_q_proj(ctx)), self._heads(self.add_k_proj(ctx)), self._heads(self.add_v_proj(ctx))
        if hasattr(self, "norm_q"):
            q, k, cq, ck = self.norm_q(q), self.norm_k(k), self.norm_added_q(cq), self.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)  # (B, h, N+L, d)
        attn_mask = None
        if mask is not None:  # image keys are always real
            attn_mask = key_padding_mask(torch.cat([mask.new_ones(B, N), mask], dim=1))  # (B, 1, 1, N+L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N+L, d)
        out = out.transpose(1, 2).reshape(B, -1, D)  # (B, N+L, D)
        x_out = self.to_out[0](out[:, :N])
        ctx_out = self.to_add_out(out[:, N:]) if hasattr(self, "to_add_out") else None
        return x_out, ctx_out


class JointBlock(nn.Module):
    """MMDiT block: per-stream adaLN-Zero, joint attention, per-stream MLPs; the text stream can end here."""

    def __init__(self, cfg: MMDiTConfig, context_pre_only: bool):
        super().__init__()
        d = cfg.hidden_size
        self.context_pre_only = context_pre_only
        self.norm1 = AdaNorm(d, d, chunks=6)
        self.norm1_context = AdaNorm(d, d, chunks=2 if context_pre_only else 6)
        self.attn = JointAttention(d, cfg.num_heads, context_pre_only, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ff = MLP(d, cfg.mlp_ratio)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.ff_context = MLP(d, cfg.mlp_ratio)

    def forward(self, x: Tensor, ctx: Tensor, c: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D), ctx (B, L, D), c (B, D) -> (x, ctx or None after a pre-only block)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.params(c)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context.params(c)  # diffusers' AdaLayerNormContinuous order
            ctx_in = modulate(self.norm1_context.norm(ctx), c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.params(c)
            ctx_in = modulate(self.norm1_context.norm(ctx), c_shift_msa, c_scale_msa)
        attn_x, attn_ctx = self.attn(modulate(self.norm1.norm(x), shift_msa, scale_msa), ctx_in, mask)

        # Image stream.
        x = x + gate_msa[:, None] * attn_x
        x = x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        # Text stream.
        ctx = ctx + c_gate_msa[:, None] * attn_ctx
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(modulate(self.norm2_context(ctx), c_shift_mlp, c_scale_mlp))
        return x, ctx


class MMDiT(nn.Module):
    """SD3's MMDiT, Esser et al. 2024: ``mmdit(x, c_noise, cond) -> (B, in_channels, H, W)``."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        cfg = self.config = replace(config)  # own copy: presets are never mutated through a model
        d, p = cfg.hidden_size, cfg.patch_size
        self.pos_embed = PatchEmbed(cfg.in_channels, d, p, base_size=cfg.sample_size // p,
                                    max_grid=cfg.pos_embed_max_size)
        self.time_text_embed = TimeTextEmbed(d, cfg.vector_dim)
        self.context_embedder = nn.Linear(cfg.context_dim, d)
        self.transformer_blocks = nn.ModuleList(
            [JointBlock(cfg, context_pre_only=i == cfg.depth - 1) for i in range(cfg.depth)]
        )
        self.norm_out = AdaNorm(d, d, chunks=2)  # scale, shift
        self.proj_out = nn.Linear(d, p * p * cfg.in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears, N(0, 0.02) embedder MLPs, zero adaLN modulation and output (starts as the zero map)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for mlp in (self.time_text_embed.timestep_embedder, self.time_text_embed.text_embedder):
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        zero = [n.linear for b in self.transformer_blocks for n in (b.norm1, b.norm1_context)]
        for layer in zero + [self.norm_out.linear, self.proj_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check(self, c_noise: Tensor, cond: Cond, B: int) -> Tensor:
        """Validate the inputs; returns c_noise as (B,)."""
        cfg = self.config
        if cond.concat is not None or cond.control is not None:
            raise ValueError("MMDiT takes no cond.concat or cond.control")
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(B)
        if c_noise.shape != (B,):
            raise ValueError(f"c_noise must have shape (B,) = ({B},), got {tuple(c_noise.shape)}")
        ctx, vec, mask = cond.context, cond.vector, cond.context_mask
        if ctx is None or ctx.ndim != 3 or ctx.shape[0] != B or ctx.shape[-1] != cfg.context_dim:
            got = "nothing" if ctx is None else str(tuple(ctx.shape))
            raise ValueError(f"MMDiT needs text tokens cond.context of shape ({B}, L, {cfg.context_dim}); got {got}")
        if vec is None or vec.shape != (B, cfg.vector_dim):
            got = "nothing" if vec is None else str(tuple(vec.shape))
            raise ValueError(f"MMDiT needs a pooled text vector cond.vector of shape ({B}, {cfg.vector_dim}); got {got}")
        if mask is not None and mask.shape != ctx.shape[:2]:
            raise ValueError(f"context_mask shape {tuple(mask.shape)} does not match context tokens "
                             f"{tuple(ctx.shape[:2])}")
        return c_noise

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        """x (B, C, H, W), c_noise (B,) = 1000 t -> (B, C, H, W)."""
        cond = cond if cond is not None else Cond()
        B, _, H, W = x.shape
        c_noise = self._check(c_noise, cond, B)
        h, w = self.pos_embed.grid(H, W)
        tokens = self.pos_embed(x)  # (B, h*w, D)
        c = self.time_text_embed(c_noise, cond.vector)  # (B, D)
        ctx = self.context_embedder(cond.context.to(tokens.dtype))  # (B, L, D)
        for block in self.transformer_blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens, ctx = checkpoint(block, tokens, ctx, c, cond.context_mask, use_reentrant=False)
            else:
                tokens, ctx = block(tokens, ctx, c, cond.context_mask)  # (B, h*w, D), (B, L, D)
        scale, shift = self.norm_out.params(c)
        tokens = self.proj_out(modulate(self.norm_out.norm(tokens), shift, scale))  # (B, h*w, p*p*C)
        return unpatchify(tokens, self.config.patch_size, h, w)  # (B, C, H, W)


def config_from_diffusers(config: dict) -> MMDiTConfig:
    """A diffusers ``SD3Transformer2DModel`` config dict -> MMDiTConfig (the state dict then loads as is)."""
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    d = heads * head_dim
    in_ch = config.get("in_channels", 16)
    if (config.get("out_channels") or in_ch) != in_ch:
        raise ValueError(f"out_channels {config.get('out_channels')} differs from in_channels {in_ch}: not supported")
    if config.get("caption_projection_dim", d) != d:
        raise ValueError(f"caption_projection_dim {config['caption_projection_dim']} must equal the width {d}")
    if config.get("dual_attention_layers"):
        raise ValueError("SD3.5's dual_attention_layers are not implemented in latentdiff's MMDiT")
    if config.get("qk_norm") not in (None, "rms_norm"):
        raise ValueError(f"qk_norm {config['qk_norm']!r} is not supported; latentdiff has None or 'rms_norm'")
    return MMDiTConfig(
        in_channels=in_ch,
        sample_size=config.get("sample_size", 128),
        patch_size=config.get("patch_size", 2),
        hidden_size=d,
        depth=config.get("num_layers", 18),
        num_heads=heads,
        context_dim=config.get("joint_attention_dim", 4096),
        vector_dim=config.get("pooled_projection_dim", 2048),
        pos_embed_max_size=config.get("pos_embed_max_size", 96),
        qk_norm=config.get("qk_norm") == "rms_norm",
    )
