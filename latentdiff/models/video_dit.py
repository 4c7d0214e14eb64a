"""The video DiT: our DiT with a temporal transformer block after each of its blocks (factorized space-time
attention, Ma et al. 2024, "Latte", its variant 1: spatial and temporal blocks interleaved).

Latents are ``(B, C, F, h, w)`` outside; the DiT's own embedder, blocks and final layer see ``(B*F, C, h, w)``
(every frame an image, with its clip's conditioning and noise level), and after spatial block i (``DiT._forward``'s
``between``) temporal block i lets the tokens of each patch position attend over the F frames: parameter-free
LayerNorm modulated by adaLN from the block's conditioning vector c (timestep + pooled text or class: so the
prompt's gist, motion words included, steers the temporal layers), plus a sinusoidal frame-position embedding,
then self-attention over frames, added through an adaLN gate. The modulation's linear layer is zero-initialized
(adaLN-Zero, as DiT's own blocks), so the gate starts at 0 and an image DiT inflated to video (``inflate``) is
the image DiT frame by frame. With ``temporal_cross_attention`` each frame's tokens (with their frame position)
also read the prompt's tokens, ungated, its output layer zero-initialized (as DiT's cross-attention).
The spatial parameters keep the image DiT's names; the temporal ones are ``temporal.N.*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..types import Cond
from .dit import DiT, DiTConfig
from .layers import AdaNorm, Attention, modulate, timestep_embedding
from .video_common import fold_clip, inflate_network, inflated_fields, unfold_clip


@dataclass
class VideoDiTConfig(DiTConfig):
    """A ``DiTConfig`` plus the temporal blocks."""

    max_frames: int = 16  # most frames per clip the model accepts
    temporal_attention: bool = True  # self-attention over frames in every temporal block
    temporal_head_dim: int = 0  # channels per temporal attention head (0: the DiT's own, hidden_size // num_heads)
    temporal_cross_attention: bool = False  # each frame's tokens (with their frame position) also read the prompt

    def __post_init__(self):
        super().__post_init__()
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")
        if not (self.temporal_attention or self.temporal_cross_attention):
            raise ValueError("a video DiT needs temporal_attention or temporal_cross_attention")
        if self.temporal_cross_attention and self.context_dim is None:
            raise ValueError("temporal_cross_attention needs a DiT with cross-attention (context_dim)")
        if self.temporal_head_dim == 0:
            self.temporal_head_dim = self.hidden_size // self.num_heads
        if self.temporal_head_dim < 1 or self.hidden_size % self.temporal_head_dim:
            raise ValueError(f"hidden size {self.hidden_size} must be divisible by temporal_head_dim "
                             f"{self.temporal_head_dim} (0: the DiT's own head width, "
                             f"{self.hidden_size // self.num_heads})")


class TemporalDiTBlock(nn.Module):
    """adaLN-Zero self-attention over the frames at each token position, then optional cross-attention."""

    def __init__(self, cfg: VideoDiTConfig):
        super().__init__()
        d, head_dim = cfg.hidden_size, cfg.temporal_head_dim
        if cfg.temporal_attention:
            self.norm1 = AdaNorm(d, d, chunks=3)  # shift, scale, gate
            self.attn = Attention(d, None, d // head_dim, head_dim, bias=True)
        if cfg.temporal_cross_attention:
            self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
            self.cross = Attention(d, cfg.context_dim, d // head_dim, head_dim, bias=True)

    def reset_parameters(self) -> None:
        """DiT's initialization: Xavier linears; the adaLN linear and the cross-attention's output zero (identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        zero = ([self.norm1.linear] if hasattr(self, "attn") else []) + \
               ([self.cross.to_out[0]] if hasattr(self, "cross") else [])
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor, c: Tensor, frames: int, context: Tensor | None, mask: Tensor | None) -> Tensor:
        """tokens (B*F, N, D) frames-first, c (B*F, D), context (B*F, L, Dc) and its mask (B*F, L) (read by the
        cross-attention only) -> (B*F, N, D)."""
        BF, N, D = tokens.shape
        B = BF // frames
        pos = timestep_embedding(torch.arange(frames, device=tokens.device, dtype=torch.float32), D)  # (F, D)
        pos = pos.to(tokens.dtype).repeat(B, 1)[:, None]  # (B*F, 1, D): row b*F + f has frame f's position
        if hasattr(self, "attn"):
            shift, scale, gate = self.norm1.params(c)  # (B*F, D) each
            q = modulate(self.norm1.norm(tokens), shift, scale) + pos  # (B*F, N, D)
            q = q.reshape(B, frames, N, D).transpose(1, 2).reshape(B * N, frames, D)  # (B*N, F, D)
            mixed = self.attn(q).reshape(B, N, frames, D).transpose(1, 2).reshape(BF, N, D)
            tokens = tokens + gate[:, None] * mixed
        if hasattr(self, "cross"):  # attention is per query: the frames-first layout reads the same
            tokens = tokens + self.cross(self.norm2(tokens) + pos, context, mask)
        return tokens


class VideoDiT(DiT):
    """The DiT with temporal blocks: x (B, C, F, h, w), c_noise (B,) -> (B, C_out, F, h, w)."""

    def __init__(self, config: VideoDiTConfig):
        if not isinstance(config, VideoDiTConfig):
            raise TypeError(f"VideoDiT needs a VideoDiTConfig, got {type(config).__name__}")
        super().__init__(config)
        self.temporal = nn.ModuleList([TemporalDiTBlock(self.config) for _ in range(self.config.depth)])
        for block in self.temporal:
            block.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for block in getattr(self, "temporal", []):  # DiT.__init__ calls this before the temporal blocks exist
            block.reset_parameters()

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        cfg = self.config
        frames_first, c_frames, cond_frames, _ = fold_clip(x, c_noise, cond, cfg.max_frames, "video DiT")
        frames = x.shape[2]
        cross = cfg.temporal_cross_attention
        context, mask = (cond_frames.context, cond_frames.context_mask) if cross else (None, None)

        def between(tokens: Tensor, c: Tensor, i: int) -> Tensor:
            return self._run(self.temporal[i], tokens, c, frames, context, mask)

        return unfold_clip(self._forward(frames_first, c_frames, cond_frames, between), frames)  # (B, C_out, F, h, w)

    def temporal_parameters(self) -> list[nn.Parameter]:
        """The parameters of the temporal blocks (what ``train-video`` trains by default)."""
        return list(self.temporal.parameters())


def inflated_config(config: DiTConfig, **temporal) -> VideoDiTConfig:
    """The config ``inflate`` gives a DiT of this config: its fields plus the temporal ones."""
    return inflated_fields(VideoDiTConfig, DiTConfig, config, temporal)


def inflate(dit: DiT, **temporal) -> VideoDiT:
    """An image DiT as a video DiT with fresh temporal blocks (``VideoDiTConfig`` fields in ``temporal``); the
    spatial weights are the image model's, so at init the video model is the image model frame by frame."""
    if isinstance(dit, VideoDiT):
        raise TypeError("this DiT already has temporal layers")
    return inflate_network(dit, VideoDiT, inflated_config(dit.config, **temporal))


PRESETS: dict[str, VideoDiTConfig] = {}  # video models are inflated from image models (``inflate``)
