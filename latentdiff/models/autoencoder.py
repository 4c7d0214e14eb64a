"""KL-regularized convolutional autoencoder (the Stable Diffusion VAE), Rombach et al. 2022.

Layout and parameter names follow diffusers' ``AutoencoderKL`` one to one (``encoder.down_blocks.0.resnets.0.conv1``,
``encoder.mid_block.attentions.0.to_q``, ``quant_conv``, ``decoder.up_blocks.0.upsamplers.0.conv``, ...), so a
diffusers state dict loads with ``load_state_dict(strict=True)``.

The autoencoder owns its latent normalization: ``encode`` returns ``(z - shift_factor) * scale_factor`` and
``decode`` undoes it. Nothing outside this file knows the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentdiff.config import COUNT, FINITE, FRACTION, above, at_least, bounds, one_of

from .layers import (
    Downsample2D,
    NormFn,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    apply_norm,
    group_norm,
)

# A stand-in for ``Encoder.down`` / ``Decoder.up`` (the full-resolution, convolution-only parts), such as the same
# part run tile by tile (``vae_inference``); passed to ``encode_posterior`` / ``decode`` for one call.
Part = Callable[[Tensor], Tensor]


@dataclass
class AutoencoderConfig:
    in_channels: int = 3  # image channels (also the decoder's output channels)
    base_channels: int = 128  # channels at full resolution
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # per level; downsampling factor = 2 ** (levels - 1)
    num_res_blocks: int = 2  # resnet blocks per encoder level (the decoder uses one more)
    latent_channels: int = 4  # channels of the latent z
    mid_attention: bool = True  # self-attention block in the middle of encoder and decoder
    norm_groups: int = 32  # GroupNorm groups; must divide every channel count
    use_quant_conv: bool = True  # 1x1 convs around the latent (SD 1/2/XL: yes; SD3, Flux: no)
    scale_factor: float = (
        1.0  # latents = (z - shift_factor) * scale_factor; computed from data after training
    )
    shift_factor: float = 0.0  # see scale_factor
    # Per-channel latent statistics (empty: use the scalars above). When set, latent channel c is normalized
    # as (z_c - channel_shift[c]) * channel_scale[c] and the scalars are ignored.
    channel_scale: tuple[float, ...] = ()
    channel_shift: tuple[float, ...] = ()
    regularizer: str = "kl"  # "kl" (diagonal Gaussian posterior) or "vq" (codebook; models/vq.py)
    codebook_size: int = 1024  # vq: number of codes
    codebook_ema: bool = True  # vq: codebook as an EMA of encoder outputs (else learned by gradient)
    codebook_decay: float = 0.99  # vq: EMA decay of the codebook
    commitment_weight: float = 0.25  # vq: beta of the commitment loss ||h - sg(e)||^2

    # A scale of 0, inf or NaN (latent statistics of a broken run) would decode every latent to garbage.
    BOUNDS = bounds({"in_channels": COUNT, "base_channels": COUNT, "channel_mult": COUNT, "num_res_blocks": at_least(0),
                     "latent_channels": COUNT, "norm_groups": COUNT, "scale_factor": above(0), "shift_factor": FINITE,
                     "channel_scale": above(0), "channel_shift": FINITE, "regularizer": one_of("kl", "vq"),
                     "codebook_size": COUNT, "codebook_decay": FRACTION, "commitment_weight": at_least(0)})

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.channel_scale = tuple(float(v) for v in self.channel_scale)
        self.channel_shift = tuple(float(v) for v in self.channel_shift)
        for name in ("channel_scale", "channel_shift"):
            n = len(getattr(self, name))
            if n not in (0, self.latent_channels):
                raise ValueError(f"{name} has {n} values but the autoencoder has {self.latent_channels} latent "
                                 "channels: give one value per channel, or none")
        if self.regularizer not in ("kl", "vq"):
            raise ValueError(f"regularizer must be 'kl' or 'vq', got {self.regularizer!r}")
        if bool(self.channel_scale) != bool(self.channel_shift):
            raise ValueError("channel_scale and channel_shift go together: set both or neither")
        if not self.channel_mult:
            raise ValueError("channel_mult needs at least one level")

    @property
    def factor(self) -> int:
        """Spatial downsampling factor from image to latent."""
        return 2 ** (len(self.channel_mult) - 1)


PRESETS: dict[str, AutoencoderConfig] = {
    # Small autoencoders for the built-in 64x64 shapes data; minutes on a 2-core CPU.
    "shapes-f4c4": AutoencoderConfig(
        base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=16
    ),
    # The demo's: narrow, for 32x32 shapes images, so it trains in minutes on 2 CPU cores. Eight latent
    # channels cost nothing in training time and keep more of the small shapes' corners than four
    # (judge's shape accuracy on round trips 0.685 vs 0.58); 32 channels at full resolution draw the large
    # squares and triangles that 16 round off (held-out large-object shape 0.97 vs 0.75). BENCHMARKS.md, "demo".
    "shapes-demo": AutoencoderConfig(
        base_channels=16, channel_mult=(2, 2, 2), num_res_blocks=1, latent_channels=8, norm_groups=8
    ),
    # For 1-channel mel spectrograms (the built-in tones, data/tones.py): the demo's narrow autoencoder, 4 latent
    # channels (64 mel bands x 64 frames -> 16x16x4).
    "tones-f4c4": AutoencoderConfig(
        in_channels=1, base_channels=16, channel_mult=(2, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=8
    ),
    "shapes-f8c4": AutoencoderConfig(
        base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, latent_channels=4, norm_groups=16
    ),
    "shapes-f4c16": AutoencoderConfig(
        base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=16, norm_groups=16
    ),
    # Small autoencoders for natural images (downsampling factor f, latent channels c): 32 base channels, one
    # resnet per level, so a few hundred steps on 32px crops fit in minutes on one CPU core; ``small-fXcY``.
    **{
        f"small-f{f}c{c}": AutoencoderConfig(
            base_channels=32,
            channel_mult=(1, 1, 2, 2, 4)[: {4: 3, 8: 4, 16: 5}[f]],
            num_res_blocks=1,
            latent_channels=c,
            norm_groups=16,
        )
        for f in (4, 8, 16)
        for c in (4, 8, 16)
    },
    # VQ-regularized counterparts (LDM's vq-f4 / vq-f8 shape at small width).
    "small-vq-f4": AutoencoderConfig(base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, latent_channels=3,
                                     norm_groups=16, regularizer="vq", codebook_size=1024),
    "small-vq-f8": AutoencoderConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1,
                                     latent_channels=4, norm_groups=16, regularizer="vq", codebook_size=1024),
    # Stable Diffusion 1.x / 2.x VAE (kl-f8).
    "sd": AutoencoderConfig(
        base_channels=128,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        latent_channels=4,
        scale_factor=0.18215,
    ),
    # SDXL VAE: same network as "sd", retrained, its own scale.
    "sdxl": AutoencoderConfig(
        base_channels=128,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        latent_channels=4,
        scale_factor=0.13025,
    ),
    # SD3 and Flux VAEs: 16 latent channels, no quant convs, scale and shift.
    "sd3": AutoencoderConfig(
        base_channels=128,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        latent_channels=16,
        use_quant_conv=False,
        scale_factor=1.5305,
        shift_factor=0.0609,
    ),
    "flux": AutoencoderConfig(
        base_channels=128,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        latent_channels=16,
        use_quant_conv=False,
        scale_factor=0.3611,
        shift_factor=0.1159,
    ),
}


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) from stacked (mean, logvar) channels, Kingma & Welling 2014."""

    def __init__(self, moments: Tensor):
        if moments.shape[1] % 2:
            raise ValueError(f"moments need an even channel count (mean and logvar), got {moments.shape[1]}")
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A draw z = mean + std * eps; the noise is drawn on the generator's device, then moved."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dims: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class _Block(nn.Module):
    """A resolution level: ``resnets`` then an optional ``downsamplers`` / ``upsamplers`` list of one."""

    def __init__(self, resnets: list[nn.Module], down: nn.Module | None = None, up: nn.Module | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if down is not None:
            self.downsamplers = nn.ModuleList([down])
        if up is not None:
            self.upsamplers = nn.ModuleList([up])

    def forward(self, x: Tensor, norm: NormFn | None = None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, norm=norm)
        for sampler in getattr(self, "downsamplers", ()):
            x = sampler(x)
        for sampler in getattr(self, "upsamplers", ()):
            x = sampler(x)
        return x


class MidBlock(nn.Module):
    """resnet -> self-attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, norm_groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, norm_groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, norm_groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> posterior moments (B, 2 * latent_channels, H / f, W / f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        blocks, c_in = [], chans[0]
        for i, c in enumerate(chans):
            resnets = [ResnetBlock2D(c_in if j == 0 else c, c, None, g) for j in range(cfg.num_res_blocks)]
            last = i == len(chans) - 1
            blocks.append(_Block(resnets, down=None if last else Downsample2D(c, asymmetric_pad=True)))
            c_in = c
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(chans[-1], g, cfg.mid_attention)
        self.conv_norm_out = group_norm(chans[-1], g)
        moments = 2 if cfg.regularizer == "kl" else 1  # mean and log-variance, or the VQ latent alone
        self.conv_out = nn.Conv2d(chans[-1], moments * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor, down: Part | None = None) -> Tensor:
        """``down``: run in place of ``self.down`` (e.g. tile by tile)."""
        return self.head(self.down(x) if down is None else down(x))  # (B, 2C, h, w)

    def down(self, x: Tensor, norm: NormFn | None = None) -> Tensor:
        """The full-resolution part, convolutions only (what tiles can run): image -> features at 1 / f.
        ``norm``: how its GroupNorm layers normalize (None: as they are; tiles pass whole-image statistics)."""
        h = self.conv_in(x)  # (B, c0, H, W)
        for block in self.down_blocks:
            h = block(h, norm)  # (B, ci, H / 2^i, W / 2^i)
        return h  # (B, c_last, h, w)

    def head(self, h: Tensor) -> Tensor:
        """The latent-resolution part (with the self-attention over all positions): features -> moments."""
        h = self.mid_block(h)  # (B, c_last, h, w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2C, h, w)


class Decoder(nn.Module):
    """Latent z (B, latent_channels, h, w) -> image (B, 3, h * f, w * f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in reversed(cfg.channel_mult)]  # lowest resolution first
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], g, cfg.mid_attention)
        blocks, c_in = [], chans[0]
        for i, c in enumerate(chans):
            resnets = [
                ResnetBlock2D(c_in if j == 0 else c, c, None, g) for j in range(cfg.num_res_blocks + 1)
            ]
            last = i == len(chans) - 1
            blocks.append(_Block(resnets, up=None if last else Upsample2D(c)))
            c_in = c
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = group_norm(chans[-1], g)
        self.conv_out = nn.Conv2d(chans[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor, up: Part | None = None) -> Tensor:
        """``up``: run in place of ``self.up`` (e.g. tile by tile)."""
        h = self.stem(z)
        return self.up(h) if up is None else up(h)  # (B, 3, H, W)

    def stem(self, z: Tensor) -> Tensor:
        """The latent-resolution part (with the self-attention over all positions): latents -> features."""
        return self.mid_block(self.conv_in(z))  # (B, c_last, h, w)

    def up(self, h: Tensor, norm: NormFn | None = None) -> Tensor:
        """The part that grows to full resolution, convolutions only (what tiles can run): features -> image.
        ``norm``: how its GroupNorm layers normalize (None: as they are; tiles pass whole-image statistics)."""
        for block in self.up_blocks:
            h = block(h, norm)  # resolution doubles after every block but the last
        return self.conv_out(F.silu(apply_norm(self.conv_norm_out, h, norm)))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """KL autoencoder with latent scale/shift, Rombach et al. 2022 (Esser et al. 2021 without the GAN here)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config = replace(config)  # own copy: storing scale/shift must not touch a preset
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_quant_conv else None

    @property
    def factor(self) -> int:
        """Spatial downsampling factor from image to latent."""
        return self.config.factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        H, W = images.shape[-2:]
        f = self.factor
        if H % f or W % f:
            raise ValueError(
                f"image size {H}x{W} is not divisible by the autoencoder's factor {f}: "
                f"pad or crop to a multiple of {f} (e.g. {math.ceil(H / f) * f}x{math.ceil(W / f) * f})"
            )

    def encode_posterior(self, images: Tensor, down: Part | None = None) -> DiagonalGaussian:
        """Images in [-1, 1] (B, 3, H, W) -> q(z|x) in the raw (unnormalized) latent space; ``down`` runs in place
        of ``encoder.down`` (e.g. tile by tile)."""
        self._check_images(images)
        moments = self.encoder(images, down)  # (B, 2C, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def _scale_shift(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """The latent scale and shift: per-channel (1, C, 1, 1) tensors if configured, else the scalars."""
        cfg = self.config
        if not cfg.channel_scale:
            return cfg.scale_factor, cfg.shift_factor
        scale = torch.tensor(cfg.channel_scale, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        shift = torch.tensor(cfg.channel_shift, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return scale, shift

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents -> the roughly unit-variance latents a denoiser sees."""
        scale, shift = self._scale_shift(z)
        return (z - shift) * scale

    def denormalize(self, latents: Tensor) -> Tensor:
        """Inverse of ``normalize``."""
        scale, shift = self._scale_shift(latents)
        return latents / scale + shift

    def encode(
        self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images in [-1, 1] -> normalized latents (posterior mode, or a sample if ``sample``)."""
        posterior = self.encode_posterior(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.normalize(z)

    def raw_latents(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images -> un-normalized latents (a posterior sample or its mode): what the statistics are taken of."""
        posterior = self.encode_posterior(images)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode_raw(self, z: Tensor, up: Part | None = None) -> Tensor:
        """Raw latents (B, C, h, w) -> images (B, 3, h * f, w * f), roughly in [-1, 1]; ``up`` runs in place of
        ``decoder.up`` (e.g. tile by tile)."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"expected latents of shape (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}"
            )
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, up)

    def decode(self, latents: Tensor, up: Part | None = None) -> Tensor:
        """Normalized latents -> images, roughly in [-1, 1] (``up``: see ``decode_raw``)."""
        return self.decode_raw(self.denormalize(latents), up)

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Training pass: images -> (reconstruction from a posterior sample, posterior)."""
        posterior = self.encode_posterior(images)
        return self.decode_raw(posterior.sample(generator)), posterior


def pixel_errors(reconstruction: Tensor, images: Tensor, kind: str = "l1") -> Tensor:
    """Per-value absolute ("l1") or squared ("l2") error, the shape of the images."""
    if kind == "l1":
        return (reconstruction - images).abs()
    if kind == "l2":
        return (reconstruction - images).pow(2)
    raise ValueError(f"recon must be 'l1' or 'l2', got {kind!r}")


def reconstruction_loss(reconstruction: Tensor, images: Tensor, kind: str = "l1") -> Tensor:
    """Per-pixel mean absolute ("l1") or squared ("l2") error."""
    return pixel_errors(reconstruction, images, kind).mean()


def edge_loss(reconstruction: Tensor, images: Tensor, kind: str = "l1") -> Tensor:
    """The reconstruction loss on horizontal and vertical neighbour differences: edges and corners.

    A per-pixel loss barely notices a small object's rounded corners (a few pixels of a 32x32 image); on the
    differences, a blurred edge costs along its whole length (the gradient-difference loss of Mathieu et al. 2016).
    """
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]
    return (reconstruction_loss(dx(reconstruction), dx(images), kind)
            + reconstruction_loss(dy(reconstruction), dy(images), kind)) / 2


def detail_loss(reconstruction: Tensor, images: Tensor, kind: str = "l1") -> Tensor:
    """The reconstruction loss weighted per pixel by the target's local contrast: edges and small objects.

    The weight is the mean absolute difference between a pixel and its 3x3 neighbourhood mean (0 on flat areas,
    about 0.5-1 on an edge in [-1, 1] images), so a small object, all edge, counts as much as its outline
    deserves rather than its share of the pixels; the optimum (a perfect reconstruction) does not move.
    """
    local_mean = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    weight = (images - local_mean).abs().mean(dim=1, keepdim=True)  # (B, 1, H, W), no gradient needed
    return (weight * pixel_errors(reconstruction, images, kind)).mean()


def vae_loss(
    reconstruction: Tensor,
    images: Tensor,
    posterior: DiagonalGaussian,
    kl_weight: float = 1e-6,
    recon: str = "l1",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reconstruction + kl_weight * KL, with LDM's weighting (Rombach et al. 2022, kl-f* configs).

    The reconstruction term is a per-pixel mean; the KL is summed over latent dims and divided by the
    number of image values per sample, so ``kl_weight`` means what it means in the LDM configs (1e-6).
    """
    rec = reconstruction_loss(reconstruction, images, recon)
    kl = posterior.kl().mean()  # nats per sample
    loss = rec + kl_weight * kl / images[0].numel()
    return loss, {"loss": loss.detach(), "recon": rec.detach(), "kl": kl.detach()}


@torch.no_grad()
def compute_latent_stats(
    autoencoder: AutoencoderKL,
    batches: Iterable[Tensor],
    sample: bool = True,
    center: bool = True,
    generator: torch.Generator | None = None,
    per_channel: bool = False,
) -> tuple[float, float] | tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, shift) that bring raw latents to zero mean, unit variance, as Rombach et al. 2022 (Sec. 3.1, G).

    ``batches`` yields images in [-1, 1]. Latents are posterior samples (``sample=True``, what the LDM paper
    measured) or modes. ``center=False`` keeps shift = 0 (the SD 1.x convention). ``per_channel`` gives one
    scale and shift per latent channel (tuples) instead of two scalars. Store the result with
    :func:`set_latent_stats`.
    """
    was_training = autoencoder.training
    autoencoder.eval()
    dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
    n, total, total_sq = 0, 0.0, 0.0
    for images in batches:
        z = autoencoder.raw_latents(images, sample=sample, generator=generator).double()
        n += z.numel() // (z.shape[1] if per_channel else 1)
        total = total + z.sum(dims)
        total_sq = total_sq + z.pow(2).sum(dims)
    autoencoder.train(was_training)
    if n == 0:
        raise ValueError("compute_latent_stats got no batches")
    mean = total / n
    shift = mean if center else torch.zeros_like(mean)
    second_moment = total_sq / n - 2 * shift * mean + shift * shift  # E[(z - shift)^2]
    if (second_moment <= 0).any():
        raise ValueError("latents have zero variance: is the autoencoder trained?")
    scale = second_moment.rsqrt()
    if per_channel:
        return tuple(scale.tolist()), tuple(shift.tolist())
    return float(scale), float(shift)


def set_latent_stats(autoencoder: AutoencoderKL, scale, shift) -> None:
    """Store what :func:`compute_latent_stats` returned in the autoencoder's config (scalars or per channel)."""
    if isinstance(scale, tuple):
        autoencoder.config = replace(autoencoder.config, scale_factor=1.0, shift_factor=0.0,
                                     channel_scale=scale, channel_shift=shift)
    else:
        autoencoder.config = replace(autoencoder.config, scale_factor=float(scale), shift_factor=float(shift),
                                     channel_scale=(), channel_shift=())
