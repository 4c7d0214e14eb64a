"""The video U-Net: our image U-Net with temporal layers between its blocks (Blattmann et al. 2023, "Align your
Latents"; Guo et al. 2023, AnimateDiff).

Latents are ``(B, C, F, h, w)`` outside; the spatial layers see ``(B*F, C, h, w)`` (every frame an image, with its
clip's conditioning), and after each resnet (and its attention) a ``TemporalBlock`` mixes the frames at every
position: a temporal convolution (kernel 3 over frames) and temporal self-attention (with sinusoidal frame
positions and, when the U-Net has a pooled vector, that vector added to the queries, so motion words reach the
temporal layers). Both end in zero-initialized projections, so an image model inflated to video
(``inflate``) starts as the image model frame by frame. The spatial parameters keep the image U-Net's names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import Cond
from .layers import Attention, group_norm, timestep_embedding, zero_module
from .unet import UNet, UNetConfig
from .video_common import fold_clip, inflate_network, inflated_fields, unfold_clip


@dataclass
class VideoUNetConfig(UNetConfig):
    """A ``UNetConfig`` plus the temporal layers."""

    max_frames: int = 16  # most frames per clip the model accepts
    temporal_conv: bool = True  # temporal convolution (kernel 3 over frames) in every temporal block
    temporal_attention: bool = True  # temporal self-attention in every temporal block
    temporal_head_dim: int = 24  # channels per temporal attention head
    temporal_cross_attention: bool = False  # each frame's tokens (with their frame position) also read the prompt

    def __post_init__(self):
        super().__post_init__()
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")
        if not (self.temporal_conv or self.temporal_attention or self.temporal_cross_attention):
            raise ValueError("a video U-Net needs temporal_conv, temporal_attention or temporal_cross_attention")


class TemporalBlock(nn.Module):
    """Temporal convolution then temporal self-attention, each residual with a zero-initialized output."""

    def __init__(self, channels: int, cfg: VideoUNetConfig):
        super().__init__()
        if cfg.temporal_conv:
            self.conv_norm = group_norm(channels, cfg.norm_groups, cfg.norm_eps)
            self.conv = zero_module(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))
        if cfg.temporal_attention:
            if channels % cfg.temporal_head_dim:
                raise ValueError(f"hidden size {channels} must be divisible by temporal_head_dim "
                                 f"{cfg.temporal_head_dim}")
            self.norm = nn.LayerNorm(channels, eps=cfg.norm_eps)
            self.attn = Attention(channels, None, channels // cfg.temporal_head_dim, cfg.temporal_head_dim)
            zero_module(self.attn.to_out[0])
            if cfg.vector_dim is not None:
                self.vector_proj = nn.Linear(cfg.vector_dim, channels)
        if cfg.temporal_cross_attention:
            if cfg.context_dim is None:
                raise ValueError("temporal_cross_attention needs a U-Net with cross-attention (context_dim)")
            if channels % cfg.temporal_head_dim:
                raise ValueError(f"hidden size {channels} must be divisible by temporal_head_dim "
                                 f"{cfg.temporal_head_dim}")
            self.cross_norm = nn.LayerNorm(channels, eps=cfg.norm_eps)
            self.cross = Attention(channels, cfg.context_dim, channels // cfg.temporal_head_dim, cfg.temporal_head_dim)
            zero_module(self.cross.to_out[0])

    def forward(self, h: Tensor, frames: int, vector: Tensor | None, context: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        """h (B*F, C, H, W) with frames F, vector (B, D) or None, context (B, S, Dc) and its mask (B, S) (read by
        the temporal cross-attention only) -> (B*F, C, H, W)."""
        BF, C, H, W = h.shape
        B = BF // frames
        x = h.reshape(B, frames, C, H, W).transpose(1, 2)  # (B, C, F, H, W)
        if hasattr(self, "conv"):
            x = x + self.conv(F.silu(self.conv_norm(x)))  # (B, C, F, H, W)
        if hasattr(self, "attn") or hasattr(self, "cross"):
            tokens = x.permute(0, 3, 4, 2, 1).reshape(B * H * W, frames, C)  # (BHW, F, C)
            pos = timestep_embedding(torch.arange(frames, device=h.device, dtype=torch.float32), C).to(tokens.dtype)
            if hasattr(self, "attn"):
                q = self.norm(tokens) + pos  # (BHW, F, C)
                if hasattr(self, "vector_proj") and vector is not None:
                    q = q + self.vector_proj(vector.to(q.dtype)).repeat_interleave(H * W, dim=0)[:, None]
                tokens = tokens + self.attn(q)  # (BHW, F, C)
            if hasattr(self, "cross"):
                if context is None:
                    raise ValueError("this video U-Net's temporal cross-attention needs cond.context (a prompt)")
                ctx = context.to(tokens.dtype).repeat_interleave(H * W, dim=0)  # (BHW, S, Dc)
                m = None if mask is None else mask.repeat_interleave(H * W, dim=0)  # (BHW, S)
                tokens = tokens + self.cross(self.cross_norm(tokens) + pos, ctx, m)  # (BHW, F, C)
            x = tokens.reshape(B, H, W, frames, C).permute(0, 4, 3, 1, 2)  # (B, C, F, H, W)
        return x.transpose(1, 2).reshape(BF, C, H, W)


class VideoUNet(UNet):
    """The latent U-Net with temporal layers: x (B, C, F, h, w), c_noise (B,) -> (B, C_out, F, h, w)."""

    def __init__(self, config: VideoUNetConfig):
        if not isinstance(config, VideoUNetConfig):
            raise TypeError(f"VideoUNet needs a VideoUNetConfig, got {type(config).__name__}")
        super().__init__(config)
        self.temporal = nn.ModuleList([TemporalBlock(c, config) for c in self.mixing_sites()])

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        cfg = self.config
        frames_first, c_frames, cond_frames, cond = fold_clip(x, c_noise, cond, cfg.max_frames, "video U-Net")
        frames = x.shape[2]
        vector = cond.vector if cfg.vector_dim is not None else None
        context, mask = (cond.context, cond.context_mask) if cfg.temporal_cross_attention else (None, None)

        def between(h: Tensor, site: int) -> Tensor:
            return self._run(self.temporal[site], h, frames, vector, context, mask)

        return unfold_clip(self._forward(frames_first, c_frames, cond_frames, between), frames)  # (B, C_out, F, h, w)

    def temporal_parameters(self) -> list[nn.Parameter]:
        """The parameters of the temporal layers (what ``train-video`` trains by default)."""
        return list(self.temporal.parameters())


def inflated_config(config: UNetConfig, **temporal) -> VideoUNetConfig:
    """The config ``inflate`` gives a U-Net of this config: its fields plus the temporal ones."""
    return inflated_fields(VideoUNetConfig, UNetConfig, config, temporal)


def inflate(unet: UNet, **temporal) -> VideoUNet:
    """An image U-Net as a video U-Net with fresh temporal layers (``VideoUNetConfig`` fields in ``temporal``);
    the spatial weights are the image model's, so at init the video model is the image model frame by frame."""
    if isinstance(unet, VideoUNet):
        raise TypeError("this U-Net already has temporal layers")
    return inflate_network(unet, VideoUNet, inflated_config(unet.config, **temporal))


PRESETS: dict[str, VideoUNetConfig] = {}  # video models are inflated from image models (``inflate``)
