"""A tiny preview decoder distilled from an autoencoder's full decoder (in the spirit of TAESD, Bohan 2023).

For live previews during sampling and fast drafts: plain 3x3 convs with ReLU, residual blocks of three convs,
nearest-neighbour upsampling, no normalization and no attention, and (unlike TAESD, which stays 64 wide) a width
that halves as the resolution doubles, so the full-resolution layers are cheap; it costs tens of times fewer
FLOPs than a full decoder (``flops`` measures both). It takes the *normalized* latents the sampler works with and
returns images in [-1, 1]. It is trained to imitate the full decoder by ``train/preview.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentdiff.config import from_dict
from latentdiff.io import load_component_weights, read_component_config, save_component


@dataclass
class PreviewConfig:
    latent_channels: int = 4  # channels of the latents it decodes
    factor: int = 8  # upsampling factor (the autoencoder's): a power of two
    channels: int = 64  # width at the latent resolution; halved at every upsampling
    min_channels: int = 16  # the width never drops below this
    blocks: int = 1  # residual blocks per resolution level
    out_channels: int = 3  # image channels

    def __post_init__(self):
        if self.factor < 1 or self.factor & (self.factor - 1):
            raise ValueError(f"factor must be a power of two, got {self.factor}")


class _Block(nn.Module):
    """x + conv(relu(conv(relu(conv(x))))), then ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv(x))


class PreviewDecoder(nn.Module):
    """Normalized latents (B, C, h, w) -> images (B, 3, h * f, w * f) in [-1, 1]."""

    def __init__(self, config: PreviewConfig):
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [nn.Conv2d(config.latent_channels, c, 3, padding=1), nn.ReLU()]
        for _ in range(int(math.log2(config.factor))):
            c_next = max(config.min_channels, c // 2)  # halve the width as the resolution doubles
            layers += [_Block(c) for _ in range(config.blocks)]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c_next, 3, padding=1, bias=False)]
            c = c_next
        layers += [_Block(c), nn.Conv2d(c, config.out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: Tensor) -> Tensor:
        return torch.tanh(self.layers(latents))


def flops(module, *inputs) -> int:
    """Floating-point operations of one forward pass (torch's FLOP counter: convs, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs)
    return counter.get_total_flops()


def save_preview_decoder(folder: str | Path, decoder: PreviewDecoder) -> None:
    save_component(folder, decoder, {"type": "PreviewDecoder", "config": dataclasses.asdict(decoder.config)})


def load_preview_decoder(folder: str | Path) -> PreviewDecoder:
    cfg = read_component_config(folder, "PreviewDecoder", "a preview decoder")
    model = PreviewDecoder(from_dict(PreviewConfig, cfg, f"{folder}/config.json"))
    load_component_weights(model, folder, "preview_decoder")
    return model.eval()


def preview_callback(decoder: PreviewDecoder, on_preview, every: int = 1, callback=None):
    """A sampler callback: every ``every`` steps (0, every, 2 * every, ...) it decodes the sampler's current
    estimate of the clean latents with the preview decoder and calls ``on_preview(step, image)``, the image a
    PIL image (a grid for a batch); it also passes every report on to ``callback``."""
    from latentdiff.images import make_grid, to_pil

    if every < 1:
        raise ValueError(f"preview_every must be at least 1, got {every}")

    def report(info: dict) -> None:
        if callback is not None:
            callback(info)
        if info["i"] % every == 0:
            with torch.no_grad():
                images = to_pil(decoder(info["denoised"].float()))
            on_preview(info["i"], images[0] if len(images) == 1 else make_grid(images))

    return report
