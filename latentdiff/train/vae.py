"""Autoencoder training on the run engine (``train.run``): setup -> build -> loop (loss, step, EMA, log, samples,
checkpoint) -> latent stats -> save."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from latentdiff.components import save_autoencoder
from latentdiff.config import COUNT, IMAGE_SIDE, above, at_least, bounds, from_dict, one_of
from latentdiff.data import make_image_dataset
from latentdiff.data.buckets import batch_indices
from latentdiff.data.pixels import PixelSet, open_pixel_set, same_shape_batches, uses_pixel_set
from latentdiff.images import make_grid, save_png, to_pil
from latentdiff.models.autoencoder import PRESETS as AUTOENCODER_PRESETS
from latentdiff.models.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    compute_latent_stats,
    detail_loss,
    edge_loss,
    reconstruction_loss,
    set_latent_stats,
    vae_loss,
)
from latentdiff.models.perceptual import (
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
    perceptual_loss_or_none,
)
from latentdiff.models.runtime import autocast
from latentdiff.models.vq import AutoencoderVQ, QuantizerOutput, build_autoencoder, vq_loss
from latentdiff.train.common import NonFiniteSkipper, check_finite_params
from latentdiff.train.distributed import Context, per_sample, sample_generators
from latentdiff.train.engine import Callback
from latentdiff.train.run import Run, RunConfig, processes


@dataclass
class VAETrainConfig(RunConfig):
    """``latentdiff train-vae``: what to train on, which autoencoder, and how (the keys every run shares, and their
    defaults: ``train.run.RunConfig``)."""

    out: str = "runs/vae"  # run folder: checkpoints/, metrics.jsonl, samples/, and the final autoencoder/
    data: str = "shapes"  # "shapes" (built in) or a folder of images
    num_images: int = 20000  # shapes: training set size
    image_size: int = 64  # training resolution in pixels
    model: str = "shapes-f4c4"  # autoencoder preset (models/autoencoder.py)
    kl_weight: float = 1e-6  # weight of the KL term
    recon_loss: str = "l1"  # "l1" or "l2"
    edge_weight: float = 0.0  # weight of the same loss on neighbour-pixel differences (models.autoencoder.edge_loss)
    detail_weight: float = 0.0  # weight of the same loss re-weighted by local contrast (models.autoencoder.detail_loss)
    stats_images: int = 2048  # images used to compute the latent scale and shift
    preload_gib: float = 2.0  # decode the whole data set into memory (uint8) once if it fits in this
    per_channel_stats: bool = False  # store one latent scale/shift per channel instead of two scalars
    autoencoder: dict = field(default_factory=dict)  # overrides of the preset's fields, e.g. regularizer = "vq"
    perceptual_weight: float = 1.0  # LPIPS term weight; only used when lpips_path is set
    lpips_path: str = ""  # LPIPS weights (whole state, or LPIPS's vgg.pth); "": no perceptual term (said at start)
    lpips_vgg_path: str = ""  # torchvision VGG16 weights, when lpips_path holds only LPIPS's linear layers
    disc_weight: float = 0.0  # PatchGAN loss weight, times Esser et al.'s adaptive weight (LDM: 0.5); 0 = no GAN
    disc_start: int = 0  # step at which the discriminator and the GAN loss switch on (LDM: 50001)
    disc_lr: float = 0.0  # discriminator AdamW learning rate (0: same as lr)
    disc_layers: int = 3  # PatchGAN depth
    disc_channels: int = 64  # PatchGAN width
    crop: str = "center"  # folders / tar shards: "center" (cover + centre crop) or "random" (short side, random square)
    buckets: bool = False  # folders / tar shards: aspect-ratio buckets (each image at its nearest aspect ratio)
    bucket_area: int = 0  # pixels per bucket (H * W); 0 = image_size ** 2
    bucket_step: int = 0  # bucket sides are multiples of this; 0 = the autoencoder's factor x 8
    bucket_max_aspect: float = 4.0  # the widest (and tallest) bucket's aspect ratio
    min_size: int = 8  # tar shards, random crops, buckets: images with a shorter side are skipped (and named)

    BOUNDS = bounds({"num_images": COUNT, "image_size": IMAGE_SIDE, "kl_weight": at_least(0), "recon_loss": one_of("l1", "l2"),
                     "edge_weight": at_least(0), "detail_weight": at_least(0), "stats_images": COUNT,
                     "preload_gib": above(0), "perceptual_weight": at_least(0), "disc_weight": at_least(0),
                     "disc_start": at_least(0), "disc_lr": at_least(0), "disc_layers": COUNT, "disc_channels": COUNT,
                     "crop": one_of("center", "random"), "bucket_area": at_least(0), "bucket_step": at_least(0),
                     "bucket_max_aspect": at_least(1), "min_size": COUNT})


VAE_PRESETS: dict[str, dict] = {
    "shapes": {},
    # The demo's stage 1: 32x32 images and a narrow autoencoder, a few minutes on 2 CPU cores. L2 learns the
    # small objects faster than L1 (object-pixel error 0.23 vs 0.39 after 600 steps; benchmarks/vae_loss.py).
    # The contrast-weighted term (detail_weight) keeps the corners of small squares and triangles; batch 24 pays
    # for the autoencoder's wider first level. 1200 steps: held-out round-trip shape 0.965 (0.83 at 700 steps;
    # BENCHMARKS.md, "The demo and the default model").
    "shapes-demo": {"image_size": 32, "num_images": 4000, "model": "shapes-demo", "steps": 1200, "batch_size": 24,
                    "lr": 2e-3, "warmup_steps": 20, "recon_loss": "l2", "detail_weight": 10.0, "grad_clip": 100.0,
                    "sample_every": 300, "save_every": 300},
    "shapes-f8c4": {"model": "shapes-f8c4"},
    "shapes-f4c16": {"model": "shapes-f4c16"},
    "shapes-test": {"num_images": 64, "steps": 3, "batch_size": 4, "warmup_steps": 1, "stats_images": 8,
                    "log_every": 1, "sample_every": 2, "save_every": 2, "quiet": True},
}
# Mel spectrograms of the built-in tones (data/tones.py): 64 mel bands x 64 frames (1.024 s at 16 kHz), one channel.
VAE_PRESETS["tones"] = {"data": "tones", "image_size": 64, "num_images": 2000, "model": "tones-f4c4", "steps": 250,
                        "batch_size": 16, "lr": 2e-3, "warmup_steps": 20, "recon_loss": "l2", "stats_images": 512,
                        "sample_every": 125, "save_every": 125}
# The short CPU recipe: half the steps (with train-audio's tones-cpu, about 10 minutes in all; BENCHMARKS.md, "Audio").
VAE_PRESETS["tones-cpu"] = {**VAE_PRESETS["tones"], "steps": 125, "sample_every": 125, "save_every": 125}
VAE_PRESETS["tones-test"] = {**VAE_PRESETS["shapes-test"], "data": "tones", "image_size": 16, "model": "tones-f4c4"}
# The bundled default model's autoencoder: the demo's, trained 2400 steps (held-out round-trip shape 0.985
# against 0.83 at 700; BENCHMARKS.md, "The demo and the default model").
VAE_PRESETS["shapes-default"] = {**VAE_PRESETS["shapes-demo"], "steps": 2400, "save_every": 600,
                                 "sample_every": 600}


def train_vae(cfg: VAETrainConfig, callbacks: list[Callback] | None = None) -> Path | dict:
    """Train an autoencoder, compute its latent scale/shift, and write ``cfg.out/autoencoder``.

    Under torchrun each process trains on its block of every global batch; rank 0 logs and writes.
    ``callbacks`` run on rank 0 with the EMA autoencoder. With ``cfg.dry_run`` it returns the dry-run
    report instead and writes nothing.
    """
    with processes(cfg) as ctx:
        return _train_vae(cfg, ctx, callbacks or [])


def _train_vae(cfg: VAETrainConfig, ctx: Context, callbacks: list[Callback]) -> Path | dict:
    # Setup.
    if cfg.model not in AUTOENCODER_PRESETS:
        raise ValueError(f"unknown autoencoder preset {cfg.model!r}; known: {', '.join(sorted(AUTOENCODER_PRESETS))}")
    run = Run(cfg, ctx, callbacks)  # the checkpoint to resume from, this rank's share of every batch
    main, device, quiet = ctx.is_main, ctx.device, cfg.quiet or not ctx.is_main
    pixel_set = uses_pixel_set(cfg.data, cfg.crop, cfg.buckets)  # tar shards, random crops, buckets: data.pixels
    data = None if pixel_set else InMemory(make_image_dataset(cfg.data, cfg.num_images, cfg.image_size, cfg.seed,
                                                              "train"), cfg.preload_gib, quiet)

    # Build.
    run.seed()  # the same initial weights on every rank
    model = build_autoencoder(from_dict(AutoencoderConfig, {**asdict(AUTOENCODER_PRESETS[cfg.model]), **cfg.autoencoder},
                                        "train-vae autoencoder"))
    if cfg.image_size % model.factor:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the autoencoder's factor {model.factor}")
    if pixel_set:
        data = open_pixels(cfg, model.factor, quiet)
    adversary = Adversary(cfg, model, device, main)  # LPIPS and the PatchGAN, each when configured
    run.build(model, extra=adversary.checkpointed())
    if not quiet:
        print(f"autoencoder {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, factor "
              f"{model.factor}, {model.latent_channels} latent channels; {len(data)} images; {ctx.world} process(es)",
              file=sys.stderr)
    fixed = same_shape_batches([data[i]["image"] for i in range(min(8, len(data)))], 8)[0]  # the grid's originals
    parts: dict = {}  # this step's loss terms, for the log

    # Loop.
    with run.guard():
        for step in run.steps():
            idx, chunks = run.batch(data, step)  # the global batch (bucketed: from one bucket), this rank's share

            def loss_fn(positions: Tensor, step: int = step, idx: Tensor = idx) -> Tensor:
                """The micro-batch's mean loss, once per sample (all samples weigh the same)."""
                gens = sample_generators(cfg.seed, step, positions)  # random crops first, then the posterior noise
                images = data.batch(idx[positions], gens).to(device)
                recon, loss, terms = autoencoder_loss(model, images, gens, cfg, device)
                loss = loss + adversary.generator_loss(recon, images, step, terms)
                parts.update(terms)
                return loss.expand(len(positions))

            loss, grad_norm = run.step(step, chunks, loss_fn)
            adversary.discriminator_step(step, parts, generator_stepped=grad_norm is not None)
            run.log(step, loss, grad_norm, **{k: v for k, v in parts.items() if k != "loss"})
            run.samples(step, lambda ema, n: save_reconstructions(ema, fixed.to(device),
                                                                  run.folder / "samples" / f"recon_{n:07d}.png"))
            run.save(step)
    if cfg.dry_run:
        return run.dry_run_report()

    # Save: the last training checkpoint, then latent statistics and the final autoencoder (the EMA weights).
    final = run.finish()
    if main:
        final = final.cpu()
        check_finite_params(final)
        batches = same_shape_batches([data[i]["image"] for i in range(min(cfg.stats_images, len(data)))], 64)
        scale, shift = compute_latent_stats(final, batches, per_channel=cfg.per_channel_stats)
        set_latent_stats(final, scale, shift)
        save_autoencoder(run.folder / "autoencoder", final)
        save_reconstructions(final, fixed, run.folder / "samples" / "recon_final.png")
        if not cfg.quiet:
            print(f"latent scale {scale}, shift {shift}; autoencoder written to {run.folder / 'autoencoder'}",
                  file=sys.stderr)
    ctx.barrier()
    return run.folder / "autoencoder"


def autoencoder_loss(model: AutoencoderKL | AutoencoderVQ, images: Tensor, gens: list[torch.Generator],
                     cfg: VAETrainConfig, device: torch.device) -> tuple[Tensor, Tensor, dict]:
    """The reconstruction of ``images`` through a posterior sample (each sample's noise from its own generator;
    a VQ autoencoder: its straight-through codes, no noise) and its loss: pixels + KL or codebook, edge, detail.
    Returns (reconstruction in float32, loss, the loss's terms)."""
    with autocast(cfg.precision, device):
        if isinstance(model, AutoencoderVQ):
            recon, posterior = model(images)
        else:
            posterior = model.encode_posterior(images)
            eps = per_sample(gens, lambda g: torch.randn(1, *posterior.mean.shape[1:], generator=g))
            recon = model.decode_raw(posterior.mean + posterior.std * eps.to(device, posterior.mean.dtype))
    recon = recon.float()
    if isinstance(posterior, QuantizerOutput):
        loss, terms = vq_loss(recon, images, posterior, recon=cfg.recon_loss)
    else:
        loss, terms = vae_loss(recon, images, posterior, kl_weight=cfg.kl_weight, recon=cfg.recon_loss)
    if cfg.edge_weight:
        terms["edge"] = edge_loss(recon, images, cfg.recon_loss)
        loss = loss + cfg.edge_weight * terms["edge"]
    if cfg.detail_weight:
        terms["detail"] = detail_loss(recon, images, cfg.recon_loss)
        loss = loss + cfg.detail_weight * terms["detail"]
    return recon, loss, terms


class Adversary:
    """The perceptual (LPIPS) and adversarial (PatchGAN, Esser et al. 2021) terms of the autoencoder's loss, and the
    discriminator's own step; each only when configured (``lpips_path``, ``disc_weight``)."""

    def __init__(self, cfg: VAETrainConfig, model: AutoencoderKL, device: torch.device, main: bool):
        self.cfg, self.model = cfg, model
        self.lpips = perceptual_loss_or_none(cfg.lpips_path, cfg.lpips_vgg_path, cfg.perceptual_weight,
                                             cfg.quiet or not main)
        self.disc: PatchDiscriminator | None = None
        self.pairs: list[tuple[Tensor, Tensor]] = []  # (images, detached reconstructions) of this step
        if cfg.disc_weight > 0:
            self.disc = PatchDiscriminator(model.config.in_channels, cfg.disc_channels, cfg.disc_layers).to(device)
            min_size = 2 ** (cfg.disc_layers + 2)  # the smallest input that leaves a 2x2 logit map
            if cfg.image_size < min_size:
                raise ValueError(f"image_size {cfg.image_size} is too small for a PatchGAN with {cfg.disc_layers} "
                                 f"layers (needs >= {min_size}): lower disc_layers or raise image_size")
            self.opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.5, 0.9))
            self.skipper = NonFiniteSkipper(verbose=main)

    def checkpointed(self) -> dict:
        """The discriminator and its optimizer, kept in the training checkpoints (not sharded: rank 0's copy)."""
        return {} if self.disc is None else {"discriminator": self.disc, "disc_optimizer": self.opt}

    def generator_loss(self, recon: Tensor, images: Tensor, step: int, terms: dict) -> Tensor:
        """LPIPS and the generator's GAN loss (Esser et al.'s adaptive weight), to add to the autoencoder's loss."""
        cfg, extra_loss = self.cfg, recon.new_zeros(())
        nll = reconstruction_loss(recon, images, cfg.recon_loss)  # what the GAN weight is balanced against
        if self.lpips is not None:
            p_loss = self.lpips(recon, images).mean()
            extra_loss, nll = extra_loss + cfg.perceptual_weight * p_loss, nll + cfg.perceptual_weight * p_loss
            terms["lpips"] = p_loss.detach()
        if self.disc is not None and step >= cfg.disc_start:  # generator side: fool the discriminator
            self.disc.requires_grad_(False)
            g_loss = -self.disc(recon).mean()
            self.disc.requires_grad_(True)
            d_weight = cfg.disc_weight * adaptive_gan_weight(nll, g_loss, self.model.decoder.conv_out.weight)
            extra_loss = extra_loss + d_weight * g_loss
            terms.update(g_loss=g_loss.detach(), d_weight=d_weight)
            self.pairs.append((images, recon.detach()))
        return extra_loss

    def discriminator_step(self, step: int, terms: dict, generator_stepped: bool) -> None:
        """The hinge loss on this step's real images and (detached) reconstructions, and its optimizer step."""
        pairs, self.pairs = self.pairs, []
        if not (pairs and generator_stepped):
            return
        real, fake = (torch.cat(t) for t in zip(*pairs))
        d_loss = hinge_d_loss(self.disc(real), self.disc(fake))
        if self.skipper.step(d_loss, step, self.opt, self.disc, self.cfg.grad_clip) is not None:
            terms["d_loss"] = d_loss.detach()


class InMemory:
    """A plain image data set (the shapes set, a folder at one size) read as a ``PixelSet`` is (``batch_indices``,
    ``batch``): from one uint8 copy in memory when it fits ``budget_gib``, else image by image."""

    bucketed = False

    def __init__(self, dataset, budget_gib: float, quiet: bool):
        self.dataset = dataset
        self.images_u8 = preload(dataset, budget_gib, quiet=quiet)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]

    def batch_indices(self, step: int, batch_size: int, seed: int) -> Tensor:
        return batch_indices(step, batch_size, len(self.dataset), seed)

    def batch(self, indices: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """Images of ``indices`` as float (B, 3, H, W) in [-1, 1] (no random draws: ``generators`` are unused)."""
        if self.images_u8 is not None:
            return from_uint8(self.images_u8[indices])
        return torch.stack([self.dataset[i]["image"] for i in indices.tolist()])


def open_pixels(cfg: VAETrainConfig, factor: int, quiet: bool) -> PixelSet:
    """Tar shards, random crops or buckets (``data.pixels``), bucket sides multiples of the autoencoder's factor."""
    bucket_step = cfg.bucket_step or 8 * factor
    if bucket_step % factor:
        raise ValueError(f"bucket_step {bucket_step} must be a multiple of the autoencoder's factor {factor}")
    return open_pixel_set(cfg.data, cfg.image_size, crop=cfg.crop, buckets=cfg.buckets, bucket_area=cfg.bucket_area,
                          bucket_step=bucket_step, bucket_max_aspect=cfg.bucket_max_aspect, min_size=cfg.min_size,
                          budget_gib=cfg.preload_gib, quiet=quiet)


def preload(dataset, budget_gib: float, quiet: bool = False) -> torch.Tensor | None:
    """The whole data set as one uint8 tensor (N, 3, H, W) if it fits the budget, else None (read per step)."""
    first = dataset[0]["image"]
    if len(dataset) * first.numel() > budget_gib * 2**30:
        return None
    from tqdm import tqdm

    out = torch.empty((len(dataset), *first.shape), dtype=torch.uint8)
    bar = not quiet and sys.stderr.isatty()  # a bar on a terminal; nothing in a log file
    for i in tqdm(range(len(dataset)), desc="loading images", disable=not bar, file=sys.stderr):
        out[i] = dataset[i]["image"].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return out


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


@torch.no_grad()
def save_reconstructions(model: AutoencoderKL, images: torch.Tensor, path: Path) -> None:
    """A grid: the originals in the top row, their reconstructions below."""
    model.eval()
    recon = model.decode_raw(model.encode_posterior(images).mode())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(to_pil(torch.cat([images, recon])), ncols=len(images)), path)
