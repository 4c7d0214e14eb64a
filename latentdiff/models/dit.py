"""Diffusion Transformer (DiT), Peebles & Xie 2023, "Scalable Diffusion Models with Transformers".

The latent is cut into p x p patches (tokens) with a fixed sine-cosine position embedding; each block is
pre-LN self-attention and an MLP, both modulated by adaLN-Zero: the conditioning vector c (timestep embedding
+ class or pooled-text embedding) gives per-block shift, scale and gate vectors, and the gates start at zero
so every block starts as the identity. A final adaLN layer and a linear map tokens back to patches.

Conditioning (our choice for text, written down here):

- class labels: ``num_classes`` set, ``cond.vector`` holds integer labels (B,); label ``num_classes`` is the
  "null" class for classifier-free guidance (the table has ``num_classes + 1`` rows, as in DiT);
- text: ``context_dim`` set -> every block gets a cross-attention to ``cond.context`` (with
  ``cond.context_mask``) between self-attention and MLP, ungated, after a parameter-free LayerNorm (as in
  PixArt-alpha and diffusers' BasicTransformerBlock with adaLN-Zero), its output layer zero-initialized as in
  PixArt-alpha so that the block still starts as the identity; ``vector_dim`` set -> the pooled text
  vector ``cond.vector`` goes through an MLP and is added to c, so it modulates every block too.
  Tokens carry the detail of a prompt, the pooled vector its gist; the text presets use both.

Learned sigma (``learn_sigma``, off by default): the network has 2 x in_channels outputs, as the original
DiT checkpoints, so they load; forward returns only the first half (the mean prediction). latentdiff has no
variational-bound loss, so the variance half is carried, not trained.

Parameter names follow diffusers' ``DiTTransformer2DModel`` (``pos_embed.proj``, ``transformer_blocks.N.norm1
.linear``, ``attn1.to_q``, ``ff.net.0.proj``, ``proj_out_1``, ``proj_out_2``) except for the embedders:
diffusers keeps a copy of the timestep and class embedders in every block (``transformer_blocks.N.norm1.emb``),
DiT and we keep one (``timestep_embedder``, ``class_embedder``). ``from_diffusers_state_dict`` is the table.
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
    Attention,
    PatchEmbed,
    check_token_width,
    modulate,
    timestep_embedding,
    unpatchify,
)
from .unet import TimestepEmbedding


@dataclass
class DiTConfig:
    in_channels: int = 4  # latent channels in
    sample_size: int = 32  # latent height/width the position embedding is laid out for (other sizes work)
    patch_size: int = 2  # p: tokens are p x p patches
    hidden_size: int = 1152  # token width D
    depth: int = 28  # transformer blocks
    num_heads: int = 16  # attention heads; D must be divisible by it
    mlp_ratio: float = 4.0  # MLP hidden width / D
    num_classes: int | None = None  # class-label conditioning (labels in cond.vector); None = off
    class_dropout: bool = True  # keep a "null class" row (index num_classes) for classifier-free guidance
    context_dim: int | None = None  # cross-attention to cond.context tokens of this width; None = off
    vector_dim: int | None = None  # pooled vector cond.vector of this width added to c; None = off
    learn_sigma: bool = False  # 2 x in_channels outputs (variance half carried, not used)
    freq_embed_dim: int = 256  # sinusoidal timestep features fed to the timestep MLP
    freq_shift: float = 0.0  # timestep embedding downscale_freq_shift: DiT 0, diffusers' DiT port 1
    norm_eps: float = 1e-5  # eps of the MLP / cross-attention LayerNorms (the adaLN norms use 1e-6)
    dropout: float = 0.0  # dropout inside the MLP
    gradient_checkpointing: bool = False  # recompute blocks in backward to save memory

    def __post_init__(self):
        check_token_width(self.hidden_size, self.num_heads)
        if self.num_classes is not None and self.vector_dim is not None:
            raise ValueError("num_classes and vector_dim both read cond.vector: set only one of them")
        if self.patch_size < 1 or self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} must be divisible by patch_size {self.patch_size}")

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels


# The four sizes of the paper (Table 1), each with patch 2, 4 or 8 ("DiT-XL/2"), for 32x32x4 latents of
# 256x256 images; class-conditional on ImageNet-1k with learned sigma, as in the released checkpoints.
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
PRESETS: dict[str, DiTConfig] = {
    f"DiT-{name}/{p}": DiTConfig(patch_size=p, hidden_size=d, depth=n, num_heads=h, num_classes=1000,
                                 learn_sigma=True)
    for name, (d, n, h) in _SIZES.items()
    for p in (2, 4, 8)
}
# Text-conditioned, for 8x8 or 16x16 latents of the shapes data; trains on a CPU in minutes.
PRESETS["dit-shapes"] = DiTConfig(sample_size=8, patch_size=2, hidden_size=192, depth=6, num_heads=6,
                                  context_dim=256, vector_dim=256)
# For tests of the training loop: the smallest network that still has every part.
PRESETS["dit-tiny"] = DiTConfig(sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                                context_dim=256, vector_dim=256)


class LabelEmbedding(nn.Module):
    """Class label -> vector; the key ``embedding_table`` as in DiT and diffusers."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulated self-attention, optional cross-attention, modulated MLP; gated residuals."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d, heads = cfg.hidden_size, cfg.num_heads
        self.norm1 = AdaNorm(d, d, chunks=6)
        self.attn1 = Attention(d, None, heads, d // heads, bias=True)
        if cfg.context_dim is not None:
            self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
            self.attn2 = Attention(d, cfg.context_dim, heads, d // heads, bias=True)
        self.norm3 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.ff = MLP(d, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        """x (B, N, D), c (B, D), context (B, L, Dc) -> (B, N, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.params(c)  # (B, D) each
        x = x + gate_msa[:, None] * self.attn1(modulate(self.norm1.norm(x), shift_msa, scale_msa))
        if hasattr(self, "attn2"):
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + gate_mlp[:, None] * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    """Diffusion Transformer, Peebles & Xie 2023: ``dit(x, c_noise, cond) -> (B, in_channels, H, W)``."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        cfg = self.config = replace(config)  # own copy: presets are never mutated through a model
        d = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg.in_channels, d, cfg.patch_size, base_size=cfg.sample_size // cfg.patch_size)
        self.timestep_embedder = TimestepEmbedding(cfg.freq_embed_dim, d)
        if cfg.num_classes is not None:
            self.class_embedder = LabelEmbedding(cfg.num_classes + int(cfg.class_dropout), d)
        if cfg.vector_dim is not None:
            self.vector_embedder = TimestepEmbedding(cfg.vector_dim, d)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(d, 2 * d)  # final adaLN: shift, scale
        self.proj_out_2 = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialization: Xavier linears, N(0, 0.02) embedders, zero adaLN, cross-attention-out and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        for mlp in (self.timestep_embedder, getattr(self, "vector_embedder", None)):
            if mlp is not None:
                nn.init.normal_(mlp.linear_1.weight, std=0.02)
                nn.init.normal_(mlp.linear_2.weight, std=0.02)
        if hasattr(self, "class_embedder"):
            nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        zero = [b.norm1.linear for b in self.transformer_blocks] + [self.proj_out_1, self.proj_out_2]
        # The ungated cross-attention's output layer too (PixArt-alpha does the same), so every block starts as
        # the identity: with a random one, six blocks of dit-shapes add text-dependent vectors half the size of
        # the tokens, and a fresh network's last tokens are only half the input (BENCHMARKS.md, issue 5).
        zero += [b.attn2.to_out[0] for b in self.transformer_blocks if hasattr(b, "attn2")]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, c_noise: Tensor, cond: Cond, B: int) -> Tensor:
        """The conditioning vector c = timestep embedding + class or pooled-text embedding, (B, D)."""
        cfg = self.config
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(B)
        if c_noise.shape != (B,):
            raise ValueError(f"c_noise must have shape (B,) = ({B},), got {tuple(c_noise.shape)}")
        t = timestep_embedding(c_noise, cfg.freq_embed_dim, downscale_freq_shift=cfg.freq_shift)  # (B, 256)
        c = self.timestep_embedder(t.to(self.timestep_embedder.linear_1.weight.dtype))  # (B, D)
        vec = cond.vector
        if cfg.num_classes is not None:
            if vec is None or vec.shape != (B,) or vec.is_floating_point():
                got = "nothing" if vec is None else f"{vec.dtype} {tuple(vec.shape)}"
                raise ValueError(f"this DiT is class-conditional: cond.vector must hold integer labels of shape "
                                 f"({B},) in [0, {cfg.num_classes}] ({cfg.num_classes} = no class); got {got}")
            return c + self.class_embedder(vec)
        if cfg.vector_dim is not None:
            if vec is None or vec.shape != (B, cfg.vector_dim):
                got = "nothing" if vec is None else str(tuple(vec.shape))
                raise ValueError(f"this DiT adds a pooled vector: cond.vector must be ({B}, {cfg.vector_dim}), got {got}")
            return c + self.vector_embedder(vec.to(c.dtype))
        if vec is not None:
            raise ValueError("cond.vector was given but this DiT has neither num_classes nor vector_dim")
        return c

    def _context(self, cond: Cond, B: int) -> tuple[Tensor | None, Tensor | None]:
        cfg = self.config
        if cfg.context_dim is None:
            if cond.context is not None:
                raise ValueError("cond.context was given but this DiT has no cross-attention (context_dim=None)")
            return None, None
        ctx, mask = cond.context, cond.context_mask
        if ctx is None or ctx.ndim != 3 or ctx.shape[0] != B or ctx.shape[-1] != cfg.context_dim:
            got = "nothing" if ctx is None else str(tuple(ctx.shape))
            raise ValueError(f"this DiT cross-attends to cond.context of shape ({B}, L, {cfg.context_dim}); got {got}")
        if mask is not None and mask.shape != ctx.shape[:2]:
            raise ValueError(f"context_mask shape {tuple(mask.shape)} does not match context tokens "
                             f"{tuple(ctx.shape[:2])}")
        return ctx, mask

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        """x (B, C, H, W), c_noise (B,) timesteps in [0, 1000) -> (B, C, H, W)."""
        return self._forward(x, c_noise, cond)

    def _run(self, module: nn.Module, *args):
        """Call a block, recomputing it in backward when gradient checkpointing is on."""
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None, between=None) -> Tensor:
        """The forward pass; ``between(tokens, c, i)``, if given, transforms the tokens (B, N, D) after block i,
        with the block's conditioning vector c (B, D) (the video DiT's temporal blocks: ``models/video_dit.py``)."""
        cond = cond if cond is not None else Cond()
        if cond.concat is not None or cond.control is not None:
            raise ValueError("DiT takes no cond.concat or cond.control")
        B, _, H, W = x.shape
        h, w = self.pos_embed.grid(H, W)
        c = self.embed(c_noise, cond, B)  # (B, D)
        context, mask = self._context(cond, B)
        tokens = self.pos_embed(x)  # (B, h*w, D)
        for i, block in enumerate(self.transformer_blocks):
            tokens = self._run(block, tokens, c, context, mask)  # (B, h*w, D)
            if between is not None:
                tokens = between(tokens, c, i)
        shift, scale = self.proj_out_1(F.silu(c)).chunk(2, dim=1)  # (B, D) each
        tokens = self.proj_out_2(modulate(self.norm_out(tokens), shift, scale))  # (B, h*w, p*p*C_out)
        out = unpatchify(tokens, self.config.patch_size, h, w)  # (B, C_out, H, W)
        return out[:, : self.config.in_channels]  # learned sigma: the mean half


# diffusers' per-block embedder copies -> our shared embedders.
_DIFFUSERS_EMB = "transformer_blocks.{i}.norm1.emb."
_EMB_TABLE = {
    "timestep_embedder.linear_1.weight": "timestep_embedder.linear_1.weight",
    "timestep_embedder.linear_1.bias": "timestep_embedder.linear_1.bias",
    "timestep_embedder.linear_2.weight": "timestep_embedder.linear_2.weight",
    "timestep_embedder.linear_2.bias": "timestep_embedder.linear_2.bias",
    "class_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}


def from_diffusers_state_dict(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """A diffusers ``DiTTransformer2DModel`` state dict -> ours (the key table is ``_EMB_TABLE``).

    Every other key is the same. diffusers holds one timestep/class embedder per block; the converted DiT
    checkpoints hold the same one in each, which is what this model can represent: blocks that differ are
    refused, naming the tensor.
    """
    out = {k: v for k, v in state.items() if ".norm1.emb." not in k}
    for ours, theirs in _EMB_TABLE.items():
        first = _DIFFUSERS_EMB.format(i=0) + theirs
        if first not in state:
            continue
        for i in range(1, depth):
            other = state.get(_DIFFUSERS_EMB.format(i=i) + theirs)
            if other is None or not torch.equal(other, state[first]):
                raise ValueError(f"{_DIFFUSERS_EMB.format(i=i) + theirs} differs from block 0's copy: this DiT "
                                 f"shares one embedder across blocks and cannot hold per-block ones")
        out[ours] = state[first]
    return out


def config_from_diffusers(config: dict) -> DiTConfig:
    """A diffusers ``DiTTransformer2DModel`` config dict -> DiTConfig (same network, freq_shift 1 as diffusers)."""
    in_ch = config.get("in_channels", 4)
    out_ch = config.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"out_channels {out_ch} must be in_channels {in_ch} or twice it (learned sigma)")
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or config.get("norm_elementwise_affine"):
        raise ValueError("only diffusers DiT models with adaLN-Zero and parameter-free norms are supported")
    heads = config.get("num_attention_heads", 16)
    return DiTConfig(
        in_channels=in_ch,
        sample_size=config.get("sample_size", 32),
        patch_size=config.get("patch_size", 2),
        hidden_size=heads * config.get("attention_head_dim", 72),
        depth=config.get("num_layers", 28),
        num_heads=heads,
        num_classes=config.get("num_embeds_ada_norm", 1000),
        class_dropout=True,
        learn_sigma=out_ch == 2 * in_ch,
        freq_shift=1.0,
        norm_eps=config.get("norm_eps", 1e-5),
    )
