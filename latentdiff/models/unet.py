"""The latent-diffusion U-Net with cross-attention (Stable Diffusion 1.x/2.x/XL), Rombach et al. 2022.

Layout and parameter names follow diffusers' ``UNet2DConditionModel`` (``conv_in``, ``time_embedding.linear_1``,
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``, ``mid_block``, ``up_blocks``, ``conv_out``),
so a diffusers state dict loads with ``load_state_dict(strict=True)``.

Conditioning comes in a ``Cond``: ``context`` (+ ``context_mask``) feeds cross-attention; ``vector`` is added to
the time embedding through an MLP (SDXL's ``add_embedding``), or, with ``num_classes``, holds integer labels
for a class embedding; ``concat`` is joined to the input channels; ``control`` holds ControlNet residuals.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..types import Cond
from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, group_norm, timestep_embedding
from .tome import TokenMerge, bipartite_soft_matching, check_ratio


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # channels predicted (eps, v, x0 or flow: the parameterization decides)
    model_channels: int = 320  # channels at the first level; time embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # per level; inputs must be divisible by 2 ** (levels - 1)
    num_res_blocks: int = 2  # resnet blocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # level indices that get transformer blocks
    mid_attention: bool = True  # transformer block between the two middle resnets
    num_heads: int = 8  # attention heads at every level, unless head_dim is set
    head_dim: int | None = None  # if set: channels per head, heads = level channels // head_dim (SD 2, SDXL)
    context_dim: int | None = 768  # dim of cond.context tokens; None = self-attention only
    transformer_depth: int | tuple[int, ...] = 1  # transformer blocks per attention, or one count per level
    cross_only_levels: tuple[int, ...] = ()  # levels whose blocks cross-attend in place of self-attention (attn1
    # reads the context too; the middle keeps self-attention): the x4 upscaler (diffusers' only_cross_attention)
    use_linear_projection: bool = False  # proj_in/proj_out as Linear (SD 2, SDXL) instead of 1x1 conv (SD 1)
    vector_dim: int | None = None  # dim of cond.vector (pooled text, sizes...) added to the time embedding
    num_classes: int | None = None  # class-label embedding; labels come as integer cond.vector of shape (B,)
    concat_channels: int = 0  # extra input channels from cond.concat (inpainting mask + masked latent: 5)
    dropout: float = 0.0  # dropout inside resnet blocks
    norm_groups: int = 32  # GroupNorm groups; must divide every channel count
    norm_eps: float = 1e-5  # GroupNorm / LayerNorm epsilon
    flip_sin_to_cos: bool = True  # timestep embedding order [cos, sin] (SD) or [sin, cos]
    freq_shift: float = 0.0  # timestep embedding downscale_freq_shift (SD: 0)
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        self.cross_only_levels = tuple(self.cross_only_levels)
        levels = len(self.channel_mult)
        if isinstance(self.transformer_depth, (list, tuple)):
            self.transformer_depth = tuple(self.transformer_depth)
            if len(self.transformer_depth) != levels:
                raise ValueError(
                    f"transformer_depth has {len(self.transformer_depth)} entries but there are {levels} levels"
                )
        bad = [i for i in self.attention_levels if not 0 <= i < levels]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range for {levels} levels (0..{levels - 1})")
        bad = [i for i in self.cross_only_levels if i not in self.attention_levels]
        if bad:
            raise ValueError(f"cross_only_levels {bad} have no attention (attention_levels {self.attention_levels})")
        if self.cross_only_levels and self.context_dim is None:
            raise ValueError("cross_only_levels cross-attend to cond.context: they need a context_dim")
        if self.vector_dim is not None and self.num_classes is not None:
            raise ValueError("vector_dim and num_classes both read cond.vector: set only one of them")
        attended = set(self.attention_levels) | ({levels - 1} if self.mid_attention else set())
        for i in sorted(attended):
            self.heads_at(self.model_channels * self.channel_mult[i])  # fail early on indivisible widths

    def heads_at(self, channels: int) -> int:
        """Attention heads for a block of this width."""
        if self.head_dim is None:
            if channels % self.num_heads:
                raise ValueError(f"hidden size {channels} must be divisible by num_heads {self.num_heads}")
            return self.num_heads
        if channels % self.head_dim:
            raise ValueError(f"hidden size {channels} must be divisible by head_dim {self.head_dim}")
        return channels // self.head_dim

    def depth_at(self, level: int) -> int:
        """Transformer blocks per attention at this level."""
        d = self.transformer_depth
        return d[level] if isinstance(d, tuple) else d


PRESETS: dict[str, UNetConfig] = {
    # For 16x16x4 latents of 64x64 shapes images (f=4 autoencoder); trains on a CPU.
    "shapes-tiny": UNetConfig(
        model_channels=48,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        head_dim=24,
        context_dim=256,
        norm_groups=16,
    ),
    # The demo's: shapes-tiny without self-attention at the 8x8 level, which costs 40% of a training
    # step on a CPU and (at equal steps) buys no judge accuracy on 8x8 latents of 32x32 images.
    "shapes-demo": UNetConfig(
        model_channels=48,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        head_dim=24,
        context_dim=256,
        norm_groups=16,
    ),
    "shapes-small": UNetConfig(
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(1, 2),
        head_dim=32,
        context_dim=256,
        norm_groups=32,
    ),
    # Stable Diffusion 1.x (CompVis / runwayml v1-5).
    "sd15": UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        num_heads=8,
        context_dim=768,
    ),
    # Stable Diffusion 2.x: 64-dim heads, linear projections, OpenCLIP-H context.
    "sd21": UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        head_dim=64,
        context_dim=1024,
        use_linear_projection=True,
    ),
    # SDXL base: vector = [pooled text (1280), Fourier(size/crop ids) (6 x 256)].
    "sdxl": UNetConfig(
        model_channels=320,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        attention_levels=(1, 2),
        head_dim=64,
        context_dim=2048,
        transformer_depth=(1, 2, 10),
        use_linear_projection=True,
        vector_dim=2816,
    ),
}


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on an embedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """GELU-gated linear unit, Shazeer 2020."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # (B, L, dim_out) each
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with GEGLU; ``net.0`` / ``net.2`` as in diffusers."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the context, GEGLU MLP, Vaswani et al. 2017.

    ``cross_only``: the first attention reads the context too (no self-attention; SD's x4 upscaler)."""

    def __init__(
        self, dim: int, heads: int, context_dim: int | None, dropout: float = 0.0, eps: float = 1e-5,
        cross_only: bool = False,
    ):
        super().__init__()
        head_dim = dim // heads
        self.cross_only = cross_only
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, context_dim if cross_only else None, heads, head_dim)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=eps)
            self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                image_kv: tuple[Tensor, Tensor] | None = None, merge: TokenMerge | None = None) -> Tensor:
        """``merge``: token merging around the first attention (``tome.TokenMerge``: merged before, unmerged after)."""
        h = self.norm1(x) if merge is None else merge.merge(self.norm1(x))  # (B, HW - r, D) merged
        if self.cross_only:
            h = self.attn1(h, context, mask)
        else:
            h = self.attn1(h)
        x = x + (h if merge is None else merge.unmerge(h))  # (B, HW, D)
        if hasattr(self, "attn2"):
            x = x + self.attn2(self.norm2(x), context, mask, image_kv)  # (B, HW, D)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, with a residual (diffusers Transformer2DModel)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int | None, cfg: UNetConfig,
                 cross_only: bool = False):
        super().__init__()
        self.use_linear_projection = cfg.use_linear_projection
        self.norm = group_norm(channels, cfg.norm_groups, eps=1e-6)
        if cfg.use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(channels, heads, context_dim, cfg.dropout, cfg.norm_eps, cross_only)
                for _ in range(depth)
            ]
        )
        # Position of this module's first cross-attention in the U-Net's list (``UNet.cross_attentions``): where its
        # blocks' IP-Adapter keys and values are in ``Cond.image_kv``; set by the U-Net that holds it.
        self.cross_index: int | None = None

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                image_kv: list[Tensor] | None = None, tome: float = 0.0) -> Tensor:
        """``tome``: the fraction of tokens merged before each block's self-attention (``models/tome.py``; 0: none)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)  # (B, C, H, W)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C) tokens
        if self.use_linear_projection:
            h = self.proj_in(h)
        for b, block in enumerate(self.transformer_blocks):
            pair = None
            if image_kv is not None:
                if self.cross_index is None:
                    raise ValueError("IP-Adapter keys and values (cond.image_kv) reach only the cross-attentions of a "
                                     "whole U-Net, not of a ControlNet or a lone block")
                i = 2 * (self.cross_index + b)
                pair = (image_kv[i], image_kv[i + 1])
            merge = bipartite_soft_matching(h, H, W, tome) if tome else None
            h = block(h, context, mask, pair, merge)  # (B, HW, C)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return x + h


def _same(h: Tensor) -> Tensor:
    return h


class UNetBlock(nn.Module):
    """One level of the U-Net: ``resnets``, optional ``attentions``, optional ``downsamplers``/``upsamplers``."""

    def __init__(
        self, resnets: list[nn.Module], attentions: list[nn.Module] | None, resample: nn.Module | None
    ):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        if isinstance(resample, Downsample2D):
            self.downsamplers = nn.ModuleList([resample])
        elif isinstance(resample, Upsample2D):
            self.upsamplers = nn.ModuleList([resample])


class UNetEncoder(nn.Module):
    """The U-Net's first half: embeddings, input convolution, down path and middle block.

    ``UNet`` adds the up path to it; ``models/controlnet.py``'s ControlNet is a trainable copy of it.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = replace(config)  # own copy, so presets are never mutated through a model
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.chans = chans = [cfg.model_channels * m for m in cfg.channel_mult]
        levels = len(chans)
        temb_dim = 4 * cfg.model_channels

        # Embeddings of noise level, labels and vectors, summed into one (B, temb_dim) vector.
        self.time_embedding = TimestepEmbedding(cfg.model_channels, temb_dim)
        if cfg.num_classes is not None:
            self.class_embedding = nn.Embedding(cfg.num_classes, temb_dim)
        if cfg.vector_dim is not None:
            self.add_embedding = TimestepEmbedding(cfg.vector_dim, temb_dim)

        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.concat_channels, chans[0], 3, padding=1)

        # Down path: every resnet (+attention) output and every downsampler output is a skip.
        down, self.skip_chans, c_in = [], [chans[0]], chans[0]
        for i, c in enumerate(chans):
            resnets, attns = [], []
            for j in range(cfg.num_res_blocks):
                resnets.append(self._resnet(c_in if j == 0 else c, c))
                if i in cfg.attention_levels:
                    attns.append(self._attention(c, i))
                self.skip_chans.append(c)
            last = i == levels - 1
            down.append(UNetBlock(resnets, attns, None if last else Downsample2D(c)))
            if not last:
                self.skip_chans.append(c)
            c_in = c
        self.down_blocks = nn.ModuleList(down)

        self.mid_block = UNetBlock(
            [self._resnet(chans[-1], chans[-1]), self._resnet(chans[-1], chans[-1])],
            [self._attention(chans[-1], levels - 1, mid=True)] if cfg.mid_attention else None,
            None,
        )

    def _resnet(self, c_in: int, c_out: int) -> ResnetBlock2D:
        cfg = self.config
        return ResnetBlock2D(c_in, c_out, 4 * cfg.model_channels, cfg.norm_groups, cfg.norm_eps, cfg.dropout)

    def _attention(self, c: int, level: int, mid: bool = False) -> Transformer2D:
        cfg = self.config
        cross_only = not mid and level in cfg.cross_only_levels
        return Transformer2D(c, cfg.heads_at(c), cfg.depth_at(level), cfg.context_dim, cfg, cross_only)

    def _run(self, module: nn.Module, *args):
        """Call a block, recomputing it in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _embed(self, c_noise: Tensor, cond: Cond, B: int) -> Tensor:
        """Time embedding plus label / vector embeddings: (B, temb_dim)."""
        cfg = self.config
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(B)
        if c_noise.shape != (B,):
            raise ValueError(f"c_noise must have shape (B,) = ({B},), got {tuple(c_noise.shape)}")
        t = timestep_embedding(
            c_noise,
            cfg.model_channels,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            downscale_freq_shift=cfg.freq_shift,
        )  # (B, mc) float32
        emb = self.time_embedding(t.to(self.time_embedding.linear_1.weight.dtype))  # (B, temb)
        vec = cond.vector
        if cfg.num_classes is not None or cfg.vector_dim is not None:
            if vec is None:
                what = (
                    "integer class labels (B,)" if cfg.num_classes is not None else f"(B, {cfg.vector_dim})"
                )
                raise ValueError(f"this UNet is conditioned on cond.vector: pass {what}")
            if cfg.num_classes is not None:
                if vec.shape != (B,) or vec.is_floating_point():
                    raise ValueError(
                        f"with num_classes, cond.vector holds integer labels of shape ({B},), "
                        f"got {vec.dtype} {tuple(vec.shape)}"
                    )
                emb = emb + self.class_embedding(vec)
            else:
                if vec.shape != (B, cfg.vector_dim):
                    raise ValueError(
                        f"cond.vector has shape {tuple(vec.shape)} but the UNet expects (B, vector_dim) = "
                        f"({B}, {cfg.vector_dim})"
                    )
                emb = emb + self.add_embedding(vec.to(emb.dtype))
        elif vec is not None:
            raise ValueError("cond.vector was given but this UNet has neither vector_dim nor num_classes")
        return emb

    def _check_context(self, cond: Cond, B: int) -> tuple[Tensor | None, Tensor | None]:
        cfg = self.config
        context, mask = cond.context, cond.context_mask
        if cfg.context_dim is None:
            if context is not None:
                raise ValueError(
                    "cond.context was given but this UNet has no cross-attention (context_dim=None)"
                )
            return None, None
        if context is None:
            raise ValueError(
                f"this UNet cross-attends to cond.context: pass (B, L, {cfg.context_dim}) tokens"
            )
        if context.ndim != 3 or context.shape[0] != B:
            raise ValueError(
                f"cond.context must have shape ({B}, L, {cfg.context_dim}), got {tuple(context.shape)}"
            )
        if context.shape[-1] != cfg.context_dim:
            raise ValueError(
                f"context dim {context.shape[-1]} does not match the UNet's context_dim {cfg.context_dim}"
            )
        if mask is not None and mask.shape != context.shape[:2]:
            raise ValueError(
                f"context_mask shape {tuple(mask.shape)} does not match context tokens {tuple(context.shape[:2])}"
            )
        return context, mask

    def _check_size(self, x: Tensor) -> None:
        f = 2 ** (len(self.config.channel_mult) - 1)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"latent size {x.shape[-2]}x{x.shape[-1]} must be divisible by {f} (2 ** (levels - 1)): pad or crop it"
            )

    def _tome_site(self, x: Tensor, tome: float) -> tuple[float, int] | None:
        """Where token merging applies: (ratio, positions of the highest-resolution level with attention), or None."""
        if not check_ratio(tome):
            return None
        cfg = self.config
        levels = set(cfg.attention_levels) | ({len(cfg.channel_mult) - 1} if cfg.mid_attention else set())
        if not levels:
            return None
        top = min(levels)
        return tome, (x.shape[-2] >> top) * (x.shape[-1] >> top)

    def _attend(self, attn: nn.Module, h: Tensor, context: Tensor | None, mask: Tensor | None,
                image_kv: list[Tensor] | None, tome: tuple[float, int] | None) -> Tensor:
        """An attention block, with token merging where ``h`` is at ``tome``'s resolution (``_tome_site``)."""
        if tome is not None and h.shape[-2] * h.shape[-1] == tome[1]:
            return self._run(attn, h, context, mask, image_kv, tome[0])
        return self._run(attn, h, context, mask, image_kv)

    def _down(self, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None, mix=_same,
              image_kv: list[Tensor] | None = None, tome: tuple[float, int] | None = None
              ) -> tuple[Tensor, list[Tensor]]:
        """The down path from conv_in's output: (lowest-resolution features, skips); ``mix`` transforms the features
        after each resnet and its attention (the video U-Net's temporal layers); ``tome``: ``_tome_site``."""
        skips = [h]
        for block in self.down_blocks:
            attns = getattr(block, "attentions", [None] * len(block.resnets))
            for resnet, attn in zip(block.resnets, attns):
                h = self._run(resnet, h, emb)
                if attn is not None:
                    h = self._attend(attn, h, context, mask, image_kv, tome)
                h = mix(h)
                skips.append(h)
            for down in getattr(block, "downsamplers", ()):
                h = down(h)  # (B, c, H/2, W/2)
                skips.append(h)
        return h, skips

    def _middle(self, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None, mix=_same,
                image_kv: list[Tensor] | None = None, tome: tuple[float, int] | None = None) -> Tensor:
        h = self._run(self.mid_block.resnets[0], h, emb)
        for attn in getattr(self.mid_block, "attentions", ()):
            h = self._attend(attn, h, context, mask, image_kv, tome)
        h = mix(h)
        return self._run(self.mid_block.resnets[1], h, emb)  # (B, c_last, H/f, W/f)


class UNet(UNetEncoder):
    """Latent-diffusion U-Net with cross-attention, Rombach et al. 2022 (Ronneberger et al. 2015, Ho et al. 2020)."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        cfg, chans = self.config, self.chans
        skip_chans = list(self.skip_chans)

        # Up path, lowest resolution first: each resnet eats one skip (concatenated on channels).
        up, c_in = [], chans[-1]
        for i, c in reversed(list(enumerate(chans))):
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(self._resnet(c_in + skip_chans.pop(), c))
                if i in cfg.attention_levels:
                    attns.append(self._attention(c, i))
                c_in = c
            up.append(UNetBlock(resnets, attns, None if i == 0 else Upsample2D(c)))
        self.up_blocks = nn.ModuleList(up)

        self.conv_norm_out = group_norm(chans[0], cfg.norm_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)
        if cfg.context_dim is not None:
            count = 0
            for t in self._transformers():
                t.cross_index, count = count, count + len(t.transformer_blocks)

    def _transformers(self) -> list[Transformer2D]:
        """The attention modules in diffusers' ``attn_processors`` order: down path, up path, then the middle (the
        order ``UNet2DConditionModel`` registers its children in, which IP-Adapter files number their layers by)."""
        blocks = [*self.down_blocks, *self.up_blocks, self.mid_block]
        return [t for block in blocks for t in getattr(block, "attentions", ())]

    def cross_attentions(self) -> list[tuple[str, Attention]]:
        """(module path, attention) of every cross-attention (``attn2``), in diffusers' ``attn_processors`` order:
        the order of ``Cond.image_kv``'s pairs."""
        names = {id(m): name for name, m in self.named_modules()}
        return [(names[id(block.attn2)], block.attn2) for t in self._transformers()
                for block in t.transformer_blocks if hasattr(block, "attn2")]

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None, tome: float = 0.0) -> Tensor:
        """x (B, in_channels, H, W), c_noise (B,) -> (B, out_channels, H, W). ``tome`` in [0, 1): token merging
        (Bolya & Hoffman 2023, ``models/tome.py``) of that fraction of the tokens before each self-attention at the
        highest-resolution level with transformer blocks; 0 is the plain network exactly."""
        return self._forward(x, c_noise, cond, tome=tome)

    def encoder_features(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> list[Tensor]:
        """The down path's features at every resolution (each level's last resnet and attention, before its
        downsampler) and the middle block's output; widths ``feature_channels()``. What adversarial distillation's
        discriminator reads (``train/add.py``), the up path never runs."""
        cond = cond if cond is not None else Cond()
        if cond.control is not None:
            raise ValueError("encoder_features takes no ControlNet residuals (cond.control)")
        x, emb, context, mask, image_kv = self._inputs(x, c_noise, cond)
        h, skips = self._down(self.conv_in(x), emb, context, mask, image_kv=image_kv)
        r = self.config.num_res_blocks  # skips: conv_in, then per level r resnets and (but the last) a downsampler
        ends = [(r + 1) * i + r for i in range(len(self.down_blocks))]
        return [skips[i] for i in ends] + [self._middle(h, emb, context, mask, image_kv=image_kv)]

    def feature_channels(self) -> list[int]:
        """Channel widths of ``encoder_features``' tensors, in order."""
        return [*self.chans, self.chans[-1]]

    def mixing_sites(self) -> list[int]:
        """Channel width at each point where ``_forward``'s ``between`` is called, in call order."""
        width = lambda resnet: resnet.conv2.out_channels
        down = [width(r) for block in self.down_blocks for r in block.resnets]
        up = [width(r) for block in self.up_blocks for r in block.resnets]
        return down + [width(self.mid_block.resnets[0])] + up

    def forward_deep_cache(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None, deep: Tensor | None = None,
                           keep_deep: bool = False, tome: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """DeepCache, Ma et al. 2023. Without ``deep``: the whole network, and with ``keep_deep`` also its deep
        features (what enters the last up block's second-to-last resnet). With ``deep`` (from a neighbouring step):
        only the shallow path, conv_in, the first down block's first resnet (+ attention), the last up block's last
        two resnets (+ attentions) and the output head, on the cached deep features. Returns (output, deep).
        ``tome``: token merging, as ``forward``'s."""
        if deep is None:
            kept: dict = {} if keep_deep else None
            return self._forward(x, c_noise, cond, kept=kept, tome=tome), (kept or {}).get("deep")
        cond = cond if cond is not None else Cond()
        if cond.control is not None:
            raise ValueError("DeepCache's shallow steps cannot take ControlNet residuals (cond.control)")
        x, emb, context, mask, image_kv = self._inputs(x, c_noise, cond)
        site = self._tome_site(x, tome)
        s0 = self.conv_in(x)  # (B, c0, H, W)
        first = self.down_blocks[0]
        s1 = self._run(first.resnets[0], s0, emb)
        attn = getattr(first, "attentions", [None])[0]
        if attn is not None:
            s1 = self._attend(attn, s1, context, mask, image_kv, site)
        block = self.up_blocks[-1]
        attns = getattr(block, "attentions", [None] * len(block.resnets))
        h = deep
        for resnet, attn, skip in zip(block.resnets[-2:], attns[-2:], (s1, s0)):
            h = self._run(resnet, torch.cat([h, skip], dim=1), emb)
            if attn is not None:
                h = self._attend(attn, h, context, mask, image_kv, site)
        return self.conv_out(F.silu(self.conv_norm_out(h))), deep

    def _inputs(self, x: Tensor, c_noise: Tensor, cond: Cond) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None,
                                                                       list[Tensor] | None]:
        """Checked inputs: x with cond.concat joined, the embedding (B, temb), the context and its mask, the
        IP-Adapter keys and values."""
        cfg = self.config
        B, _, H, W = x.shape
        self._check_size(x)
        if cond.concat is not None:
            if cond.concat.shape != (B, cfg.concat_channels, H, W):
                raise ValueError(
                    f"cond.concat has shape {tuple(cond.concat.shape)}, expected ({B}, {cfg.concat_channels}, {H}, {W})"
                )
            x = torch.cat([x, cond.concat.to(x.dtype)], dim=1)  # (B, C + Cc, H, W)
        elif cfg.concat_channels:
            raise ValueError(f"this UNet expects cond.concat with {cfg.concat_channels} channels")
        emb = self._embed(c_noise, cond, B)  # (B, temb)
        context, mask = self._check_context(cond, B)
        return x, emb, context, mask, self._check_image_kv(cond.image_kv, B)

    def _check_image_kv(self, image_kv: list[Tensor] | None, B: int) -> list[Tensor] | None:
        """``Cond.image_kv`` must hold (B, N, width) keys and values for every cross-attention, in order."""
        if image_kv is None:
            return None
        layers = self.cross_attentions()
        if len(image_kv) != 2 * len(layers):
            raise ValueError(f"cond.image_kv holds {len(image_kv)} tensors; this UNet needs a key and a value for each "
                             f"of its {len(layers)} cross-attention layers ({2 * len(layers)}): an IP-Adapter made for "
                             "another model?")
        for k, t in enumerate(image_kv):
            name, attn = layers[k // 2]
            width = attn.heads * attn.head_dim
            if t.ndim != 3 or t.shape[0] != B or t.shape[2] != width:
                raise ValueError(f"cond.image_kv[{k}] has shape {tuple(t.shape)}, {name} needs ({B}, N, {width})")
        return image_kv

    def _forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None, between=None,
                 kept: dict | None = None, tome: float = 0.0) -> Tensor:
        """The forward pass; ``between(h, site)``, if given, transforms the features after each resnet (and its
        attention) on the way down and up, and after the middle's first resnet and attention (the video U-Net's
        temporal layers: ``models/video_unet.py``); sites are numbered in call order (``mixing_sites``).
        ``kept``, if given, receives DeepCache's deep features under "deep" (``forward_deep_cache``); ``tome``:
        token merging (``forward``)."""
        site = itertools.count()
        mix = (lambda h: between(h, next(site))) if between is not None else _same
        cond = cond if cond is not None else Cond()
        x, emb, context, mask, image_kv = self._inputs(x, c_noise, cond)
        merge_at = self._tome_site(x, tome)

        # Down.
        h, skips = self._down(self.conv_in(x), emb, context, mask, mix, image_kv, merge_at)  # conv_in: (B, c0, H, W)

        # ControlNet residuals (diffusers' down_block_additional_residuals, then mid_block_additional_residual):
        # one added to each skip, the last to the middle block's output.
        control = cond.control
        if control is not None:
            _check_control(control, skips + [h])
            skips = [s + r for s, r in zip(skips, control)]

        # Middle.
        h = self._middle(h, emb, context, mask, mix, image_kv, merge_at)  # (B, c_last, H/f, W/f)
        if control is not None:
            h = h + control[-1]

        # Up.
        for block in self.up_blocks:
            attns = getattr(block, "attentions", [None] * len(block.resnets))
            for r, (resnet, attn) in enumerate(zip(block.resnets, attns)):
                if kept is not None and block is self.up_blocks[-1] and r == len(block.resnets) - 2:
                    kept["deep"] = h  # DeepCache's cached features
                h = torch.cat([h, skips.pop()], dim=1)  # (B, c + c_skip, h, w)
                h = self._run(resnet, h, emb)
                if attn is not None:
                    h = self._attend(attn, h, context, mask, image_kv, merge_at)
                h = mix(h)
            for up in getattr(block, "upsamplers", ()):
                h = up(h)  # (B, c, 2h, 2w)

        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)


def _check_control(control: list[Tensor], targets: list[Tensor]) -> None:
    """ControlNet residuals must match the skips and the middle block's output (the middle keeps its input's shape)."""
    if len(control) != len(targets):
        raise ValueError(f"cond.control has {len(control)} residuals, this UNet needs {len(targets)}")
    for k, (t, r) in enumerate(zip(targets, control)):
        if r.shape != t.shape:
            what = "the middle block's output" if k == len(targets) - 1 else "the skip it adds to"
            raise ValueError(f"cond.control[{k}] has shape {tuple(r.shape)}, {what} has {tuple(t.shape)}")


def _check_image_unet(unet: nn.Module, what: str) -> None:
    if type(unet) is not UNet:  # a video U-Net's temporal layers have no shallow path and ToMe is not made for them
        raise TypeError(f"{what} works on our U-Net in torch, not on {type(unet).__name__}")


class StepCache(nn.Module):
    """DeepCache, Ma et al. 2023: a U-Net that runs whole every ``interval`` calls (the first included) and only its
    shallow path in between, on the deep features of the last whole call. One per generation: it holds them.
    ``tome``: token merging on every call (``UNet.forward``)."""

    def __init__(self, unet: UNet, interval: int, tome: float = 0.0):
        super().__init__()
        _check_image_unet(unet, "step caching (cache_interval)")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"cache_interval must be a whole number >= 1, got {interval!r}")
        self.unet, self.interval, self.tome = unet, interval, check_ratio(tome)
        self.calls, self.deep = 0, None

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        full = self.calls % self.interval == 0 or self.deep is None or self.deep.shape[0] != x.shape[0]
        self.calls += 1
        if full:
            out, deep = self.unet.forward_deep_cache(x, c_noise, cond, keep_deep=self.interval > 1, tome=self.tome)
            self.deep = deep
            return out
        return self.unet.forward_deep_cache(x, c_noise, cond, self.deep, tome=self.tome)[0]


class TokenMerging(nn.Module):
    """A U-Net run with token merging (``UNet.forward``'s ``tome``): a network of its own, holding no state, so a
    pipeline passes the ratio without changing the U-Net, and a backend can convert it whole."""

    def __init__(self, unet: UNet, ratio: float):
        super().__init__()
        _check_image_unet(unet, "token merging (tome)")
        self.unet, self.ratio = unet, check_ratio(ratio)

    @property
    def config(self) -> UNetConfig:
        return self.unet.config

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        return self.unet(x, c_noise, cond, tome=self.ratio)
