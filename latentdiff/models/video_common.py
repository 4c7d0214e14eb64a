"""What the video networks (``video_unet.py``, ``video_dit.py``) share: a clip's input checks and folding into
frames, and the inflation of an image network into its video class (fresh temporal layers, the image weights)."""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from ..types import Cond


def fold_clip(x: Tensor, c_noise: Tensor, cond: Cond | None, max_frames: int, what: str
              ) -> tuple[Tensor, Tensor, Cond, Cond]:
    """A clip's inputs checked and folded frames-first: x (B, C, F, h, w) -> (x (B*F, C, h, w), c_noise (B*F,),
    the cond repeated per frame, the clip's own cond). ``what`` names the network in errors ("video U-Net")."""
    if x.ndim != 5:
        raise ValueError(f"a {what} takes latents (B, C, F, h, w), got shape {tuple(x.shape)}")
    B, C, frames, H, W = x.shape
    if not 1 <= frames <= max_frames:
        raise ValueError(f"{frames} frames asked, but this model takes 1 to {max_frames} frames per clip")
    cond = cond if cond is not None else Cond()
    if cond.concat is not None or cond.control is not None:
        raise ValueError(f"a {what} takes no cond.concat or cond.control (no video inpainting or ControlNet yet)")
    c_noise = c_noise.expand(B) if c_noise.ndim == 0 else c_noise
    if c_noise.shape != (B,):
        raise ValueError(f"c_noise must have shape (B,) = ({B},), got {tuple(c_noise.shape)}")
    frames_first = x.transpose(1, 2).reshape(B * frames, C, H, W)  # (B*F, C, h, w): every frame an image
    return frames_first, c_noise.repeat_interleave(frames), cond.repeat(frames), cond


def unfold_clip(out: Tensor, frames: int) -> Tensor:
    """``fold_clip``'s inverse for the output: (B*F, C_out, h, w) -> (B, C_out, F, h, w)."""
    BF, C, H, W = out.shape
    return out.reshape(BF // frames, frames, C, H, W).transpose(1, 2)


def inflated_fields(video_config: type, image_config: type, config, temporal: dict):
    """``config`` (an ``image_config``) as a ``video_config``: its fields plus the temporal ones."""
    if not isinstance(config, image_config):
        raise TypeError(f"a {video_config.__name__} inflates a {image_config.__name__}, got {type(config).__name__}")
    return video_config(**{f.name: getattr(config, f.name) for f in dataclasses.fields(image_config)}, **temporal)


def inflate_network(network: nn.Module, video_class: type, config) -> nn.Module:
    """An image network as ``video_class(config)`` (``config`` from ``inflated_fields``): the image weights strictly
    (every spatial tensor), the temporal layers (``video.temporal``) as initialized, the image network's dtype."""
    if isinstance(network, video_class):
        raise TypeError("this network already has temporal layers")
    video = video_class(config)
    temporal_state = {f"temporal.{k}": v for k, v in video.temporal.state_dict().items()}
    video.load_state_dict({**network.state_dict(), **temporal_state})
    return video.to(next(network.parameters()).dtype)
