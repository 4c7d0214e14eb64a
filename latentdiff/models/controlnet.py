"""ControlNet for our U-Net, Zhang et al. 2023 ("Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the denoiser's encoder (``unet.UNetEncoder``: embeddings, input convolution, down path and
middle block), a small convolution stack that brings the control image (pixels in [0, 1], at the image size) to
the latent grid and adds it after ``conv_in``, and one zero-initialized 1x1 convolution per skip plus one for the
middle. Its output is the list of residuals the U-Net reads from ``Cond.control`` (diffusers'
``down_block_additional_residuals`` followed by ``mid_block_additional_residual``). Layout and parameter names are
diffusers' ``ControlNetModel`` (``controlnet_cond_embedding.conv_in``, ``controlnet_down_blocks.N``,
``controlnet_mid_block``), so a diffusers state dict loads strictly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from latentdiff.config import at_least, bounds, from_dict
from latentdiff.io import LoadReport, load_component_weights, read_component_config, save_component
from latentdiff.types import Cond

from .unet import UNetConfig, UNetEncoder

CONTROL_KINDS = ("edges", "layout", "depth")  # condition maps latentdiff computes itself (data/control_maps.py)
# The U-Net settings that shape the encoder: a ControlNet must agree with its base model on each of them.
ENCODER_FIELDS = ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_levels",
                  "mid_attention", "context_dim", "vector_dim", "num_classes", "transformer_depth", "norm_groups")


@dataclass
class ControlNetConfig(UNetConfig):
    """A U-Net encoder's config plus the control image's embedding; built with ``for_unet`` from the base's."""

    conditioning_channels: int = 3  # channels of the control image
    conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)  # conv stack widths; 2 ** (len - 1) = the
    # autoencoder's factor (the control image is at pixel size, the residuals at latent size)
    control_kind: str = ""  # the condition map it was trained on ("edges", "layout", "depth"; "" unknown)

    BOUNDS = bounds({"conditioning_channels": at_least(1)})

    def __post_init__(self):
        super().__post_init__()
        self.conditioning_embedding_channels = tuple(self.conditioning_embedding_channels)
        if not self.conditioning_embedding_channels:
            raise ValueError("conditioning_embedding_channels must name at least one width")

    @property
    def factor(self) -> int:
        """Pixels per latent cell the control image is brought down by."""
        return 2 ** (len(self.conditioning_embedding_channels) - 1)


def embedding_channels(factor: int) -> tuple[int, ...]:
    """diffusers' default widths (16, 32, 96, 256) cut to one stride-2 convolution per halving of ``factor``."""
    halvings = int(math.log2(factor))
    if 2 ** halvings != factor:
        raise ValueError(f"the autoencoder's factor {factor} must be a power of two for a ControlNet")
    widths = (16, 32, 96, 256)
    return widths[: halvings + 1] if halvings < len(widths) else widths + (256,) * (halvings + 1 - len(widths))


def for_unet(unet: UNetConfig, factor: int, control_kind: str = "", conditioning_channels: int = 3
             ) -> ControlNetConfig:
    """The ControlNet config of a base U-Net whose autoencoder has ``factor`` pixels per latent cell."""
    base = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}
    base.update(concat_channels=0, gradient_checkpointing=False)
    return ControlNetConfig(**base, conditioning_channels=conditioning_channels,
                            conditioning_embedding_channels=embedding_channels(factor), control_kind=control_kind)


class ConditioningEmbedding(nn.Module):
    """The control image -> the latent grid: conv_in, (conv, stride-2 conv) pairs with SiLU, zero-init conv_out."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for c_in, c_out in itertools.pairwise(widths):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = _zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, image: Tensor) -> Tensor:
        h = F.silu(self.conv_in(image))  # (B, w0, H, W)
        for block in self.blocks:
            h = F.silu(block(h))  # halved by every second block
        return self.conv_out(h)  # (B, c0, H / factor, W / factor)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNet(UNetEncoder):
    """ControlNet, Zhang et al. 2023: ``controlnet(x_in, c_noise, cond, image) -> residuals`` for ``Cond.control``."""

    def __init__(self, config: ControlNetConfig):
        if not isinstance(config, ControlNetConfig):
            raise TypeError(f"ControlNet takes a ControlNetConfig (see controlnet.for_unet), got {type(config).__name__}")
        if config.concat_channels:
            raise ValueError("a ControlNet reads the latent only: concat_channels must be 0")
        super().__init__(config)
        cfg = self.config
        self.controlnet_cond_embedding = ConditioningEmbedding(
            self.chans[0], cfg.conditioning_channels, cfg.conditioning_embedding_channels)
        self.controlnet_down_blocks = nn.ModuleList([_zero(nn.Conv2d(c, c, 1)) for c in self.skip_chans])
        self.controlnet_mid_block = _zero(nn.Conv2d(self.chans[-1], self.chans[-1], 1))

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None, image: Tensor) -> list[Tensor]:
        """x (B, in_channels, H, W) as the U-Net gets it, image (B, C_ctrl, H * factor, W * factor) in [0, 1]
        -> one residual per U-Net skip, then one for its middle block."""
        cfg = self.config
        cond = cond if cond is not None else Cond()
        B, _, H, W = x.shape
        self._check_size(x)
        want = (B, cfg.conditioning_channels, H * cfg.factor, W * cfg.factor)
        if tuple(image.shape) != want:
            raise ValueError(f"the control image has shape {tuple(image.shape)}, this ControlNet needs {want} "
                             f"(the latent {H}x{W} times its factor {cfg.factor})")
        emb = self._embed(c_noise, cond, B)  # (B, temb)
        context, mask = self._check_context(cond, B)
        h = self.conv_in(x) + self.controlnet_cond_embedding(image.to(x.dtype))  # (B, c0, H, W)
        h, skips = self._down(h, emb, context, mask)
        h = self._middle(h, emb, context, mask)  # (B, c_last, H/f, W/f)
        out = [block(s) for block, s in zip(self.controlnet_down_blocks, skips)]
        return out + [self.controlnet_mid_block(h)]


def check_compatible(controlnet: ControlNet, unet_config: UNetConfig, name: str = "the ControlNet") -> None:
    """Refuse a ControlNet built for another base model, naming the settings that differ."""
    if not isinstance(unet_config, UNetConfig):
        raise ValueError(f"{name} needs a U-Net denoiser; this model's is a {type(unet_config).__name__}")  # noqa: TRY004
    cfg = controlnet.config
    diff = [f"{k} {getattr(cfg, k)!r} vs the model's {getattr(unet_config, k)!r}"
            for k in ENCODER_FIELDS if getattr(cfg, k) != getattr(unet_config, k)]
    if diff:
        raise ValueError(f"{name} was built for another base model: {'; '.join(diff)}; train one for this model "
                         "with `latentdiff train-controlnet --model MODEL`")


def save_controlnet(folder: str | Path, controlnet: ControlNet) -> None:
    """Write a ControlNet component: ``config.json`` (type ControlNet) + ``model.safetensors``."""
    save_component(folder, controlnet, {"type": "ControlNet", "config": dataclasses.asdict(controlnet.config)})


def load_controlnet(folder: str | Path) -> tuple[ControlNet, LoadReport]:
    """Strictly load a ControlNet folder written by ``save_controlnet``."""
    cfg = read_component_config(folder, "ControlNet", "a ControlNet")
    controlnet = ControlNet(from_dict(ControlNetConfig, cfg, f"{folder}/config.json"))
    report = load_component_weights(controlnet, folder, "controlnet")
    return controlnet.eval(), report
