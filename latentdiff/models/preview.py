"""A tiny preview decoder distilled from an autoencoder's full decoder (in the spirit of TAESD, Bohan 2023).

For live previews during sampling and fast drafts: plain 3x3 convs with ReLU, residual blocks of three convs,
nearest-neighbour upsampling, no normalization and no attention, and (unlike TAESD, which stays 64 wide) a width
that halves as the resolution doubles, so the full-resolution layers are cheap; it costs tens of times fewer
FLOPs than a full decoder (``flops`` measures both). It takes the *normalized* latents the sampler works with and
returns images in [-1, 1]. It is trained to imitate the full decoder (``distill_preview``): the teacher's
outputs on a data set's latents are computed once, then the student fits them with an L1 loss.
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
from latentdiff.io import end_progress, load_component_weights, progress_line, read_config, save_component


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


@torch.no_grad()
def teacher_pairs(autoencoder, batches) -> tuple[Tensor, Tensor]:
    """(normalized latents, full-decoder images) for every image in ``batches``: the distillation targets."""
    autoencoder.eval()
    latents, targets = [], []
    for images in batches:
        z = autoencoder.encode(images)
        latents.append(z)
        targets.append(autoencoder.decode(z).clamp(-1, 1))
    return torch.cat(latents), torch.cat(targets)


def distill_preview(autoencoder, batches, steps: int = 500, batch_size: int = 16, lr: float = 2e-3,
                    config: PreviewConfig | None = None, seed: int = 0, quiet: bool = True) -> PreviewDecoder:
    """Train a ``PreviewDecoder`` to reproduce ``autoencoder``'s decoder on the latents of ``batches``."""
    config = config or PreviewConfig(latent_channels=autoencoder.latent_channels, factor=autoencoder.factor)
    if (config.latent_channels, config.factor) != (autoencoder.latent_channels, autoencoder.factor):
        raise ValueError(f"preview config ({config.latent_channels} channels, factor {config.factor}) does not fit "
                         f"the autoencoder ({autoencoder.latent_channels} channels, factor {autoencoder.factor})")
    latents, targets = teacher_pairs(autoencoder, batches)
    torch.manual_seed(seed)
    student = PreviewDecoder(config)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # callers may hold no_grad (e.g. inside an evaluation)
        _fit(student, opt, latents, targets, steps, batch_size, lr, g, quiet)
    return student.eval()


def _fit(student: PreviewDecoder, opt, latents: Tensor, targets: Tensor, steps: int, batch_size: int, lr: float,
         g: torch.Generator, quiet: bool) -> None:
    """The distillation loop: L1 between the student's images and the teacher's, cosine learning rate."""
    for step in range(steps):
        idx = torch.randint(len(latents), (min(batch_size, len(latents)),), generator=g)
        lr_now = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr_now
        loss = (student(latents[idx]) - targets[idx]).abs().mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"preview distillation: non-finite loss at step {step + 1}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not quiet and (step + 1) % 50 == 0:
            progress_line(f"preview step {step + 1}/{steps}  L1 {loss.item():.4f}")
    if not quiet:
        end_progress()


def save_preview_decoder(folder: str | Path, decoder: PreviewDecoder) -> None:
    save_component(folder, decoder, {"type": "PreviewDecoder", "config": dataclasses.asdict(decoder.config)})


def load_preview_decoder(folder: str | Path) -> PreviewDecoder:
    cfg = read_config(folder)
    if cfg.get("type") != "PreviewDecoder":
        raise ValueError(f"{folder} holds a {cfg.get('type')!r}, not a preview decoder")
    model = PreviewDecoder(from_dict(PreviewConfig, cfg["config"], f"{folder}/config.json"))
    load_component_weights(model, folder, "preview_decoder")
    return model.eval()


@dataclass
class PreviewTrainConfig:
    """``latentdiff distill-preview``: distill a preview decoder from a trained autoencoder."""

    autoencoder: str = "runs/vae/autoencoder"  # the teacher
    out: str = "runs/vae/preview"  # folder to write the preview decoder to
    data: str = "shapes"  # "shapes", "skimage" or a folder of images
    num_images: int = 1024  # images whose latents and teacher outputs are distilled on
    image_size: int = 64  # pixels
    steps: int = 500  # optimizer steps
    batch_size: int = 16  # latents per step
    lr: float = 2e-3  # peak AdamW learning rate (cosine to 0)
    channels: int = 64  # preview decoder width at the latent resolution (halved per upsampling)
    blocks: int = 1  # residual blocks per level
    seed: int = 0  # data and initialization seed


def distill_preview_command(cfg: PreviewTrainConfig) -> Path:
    """Load the teacher, distill, write ``cfg.out``; return it."""
    from latentdiff.components import load_autoencoder
    from latentdiff.data import make_image_dataset
    from latentdiff.train.latent_stats import image_batches

    ae = load_autoencoder(cfg.autoencoder)
    if cfg.image_size % ae.factor:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the autoencoder's factor {ae.factor}")
    dataset = make_image_dataset(cfg.data, cfg.num_images, cfg.image_size, cfg.seed)
    config = PreviewConfig(ae.latent_channels, ae.factor, cfg.channels, blocks=cfg.blocks,
                           out_channels=ae.config.in_channels)
    student = distill_preview(ae, image_batches(dataset, cfg.num_images, 32), cfg.steps, cfg.batch_size, cfg.lr,
                              config, cfg.seed, quiet=False)
    save_preview_decoder(cfg.out, student)
    return Path(cfg.out)


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
