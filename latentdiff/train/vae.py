"""Autoencoder training: setup -> build -> loop (loss, step, EMA, log, samples, checkpoint) -> latent stats -> save."""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from latentdiff.components import save_autoencoder
from latentdiff.config import from_dict, to_dict
from latentdiff.data import make_image_dataset
from latentdiff.data.buckets import batch_indices
from latentdiff.data.pixels import open_pixel_set, same_shape_batches, uses_pixel_set
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
from latentdiff.models.runtime import autocast, channels_last
from latentdiff.models.vq import AutoencoderVQ, QuantizerOutput, build_autoencoder, vq_loss
from latentdiff.train.common import (
    EMA,
    MetricsLog,
    NonFiniteSkipper,
    check_finite_params,
    find_checkpoint,
    interrupt_message,
    load_training_checkpoint,
    lr_at,
    save_training_checkpoint,
)
from latentdiff.train.distributed import (
    DistributedConfig,
    bucket_chunks,
    full_state,
    gathered,
    micro_batches,
    per_sample,
    rank_positions,
    sample_generators,
    setup,
    shard_like,
    teardown,
    wrap,
)
from latentdiff.train.engine import (
    Callback,
    DryRun,
    StopSignal,
    is_out_of_memory,
    preempted_message,
    print_dry_run,
    run_callbacks,
    train_step,
)
from latentdiff.train.posthoc_ema import PowerEMA, save_snapshot


@dataclass
class VAETrainConfig:
    """``latentdiff train-vae``: what to train on, which autoencoder, and how."""

    out: str = "runs/vae"  # run folder: checkpoints/, metrics.jsonl, samples/, and the final autoencoder/
    data: str = "shapes"  # "shapes" (built in) or a folder of images
    num_images: int = 20000  # shapes: training set size
    image_size: int = 64  # training resolution in pixels
    seed: int = 0  # seeds the data order, the weights and the posterior noise
    model: str = "shapes-f4c4"  # autoencoder preset (models/autoencoder.py)
    steps: int = 1500  # optimizer steps
    batch_size: int = 32  # images per step
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear warm-up
    lr_schedule: str = "cosine"  # "constant" or "cosine" (to 10% of lr)
    grad_clip: float = 1.0  # max gradient norm
    ema_decay: float = 0.999  # EMA of weights, the one saved at the end
    kl_weight: float = 1e-6  # weight of the KL term
    recon_loss: str = "l1"  # "l1" or "l2"
    edge_weight: float = 0.0  # weight of the same loss on neighbour-pixel differences (models.autoencoder.edge_loss)
    detail_weight: float = 0.0  # weight of the same loss re-weighted by local contrast (models.autoencoder.detail_loss)
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    stats_images: int = 2048  # images used to compute the latent scale and shift
    preload_gib: float = 2.0  # decode the whole data set into memory (uint8) once if it fits in this
    log_every: int = 25  # steps between metrics lines
    sample_every: int = 500  # steps between reconstruction grids (0 = never)
    save_every: int = 500  # steps between checkpoints
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the run folder's latest checkpoint
    quiet: bool = False  # no progress line
    channels_last: bool = False  # NHWC convolution weights (models/runtime.channels_last); no gain on the 2-core CPU
    grad_accum: int = 1  # micro-batches per step and process: batch_size = processes * grad_accum * micro-batch
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # under torchrun: DDP or FSDP2
    posthoc_sigma_rels: tuple = (0.05, 0.10)  # post-hoc EMA tracks (EDM2 power EMAs), by relative std
    posthoc_every: int = 0  # steps between post-hoc EMA snapshots (0 = no tracks); `latentdiff posthoc-ema`
    tensorboard: bool = True  # also log to run/tensorboard when tensorboard is installed
    dry_run: bool = False  # time dry_run_steps steps, report step time, peak memory and ETA; write nothing
    dry_run_steps: int = 4  # steps the dry run takes (the first is not timed)
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


VAE_PRESETS: dict[str, dict] = {
    "shapes": {},
    # The demo's stage 1: 32x32 images and a narrow autoencoder, about 5 minutes on 2 CPU cores. L2 learns the
    # small objects faster than L1 (object-pixel error 0.23 vs 0.39 after 600 steps; benchmarks/vae_loss.py).
    # The contrast-weighted term (detail_weight) keeps the corners of small squares and triangles; batch 24 pays
    # for the autoencoder's wider first level (held-out round-trip shape 0.73 against 0.58 before both).
    "shapes-demo": {"image_size": 32, "num_images": 4000, "model": "shapes-demo", "steps": 700, "batch_size": 24,
                    "lr": 2e-3, "warmup_steps": 20, "recon_loss": "l2", "detail_weight": 10.0, "grad_clip": 100.0,
                    "sample_every": 300, "save_every": 300},
    "shapes-f8c4": {"model": "shapes-f8c4"},
    "shapes-f4c16": {"model": "shapes-f4c16"},
    "shapes-test": {"num_images": 64, "steps": 3, "batch_size": 4, "warmup_steps": 1, "stats_images": 8,
                    "log_every": 1, "sample_every": 2, "save_every": 2, "quiet": True},
}
# The bundled default model's autoencoder: the demo's, trained 2400 steps (held-out round-trip shape 0.985
# against 0.83 at 700; BENCHMARKS.md, "The shapes geometry").
VAE_PRESETS["shapes-default"] = {**VAE_PRESETS["shapes-demo"], "steps": 2400, "save_every": 600,
                                 "sample_every": 600}


def train_vae(cfg: VAETrainConfig, callbacks: list[Callback] | None = None) -> Path | dict:
    """Train an autoencoder, compute its latent scale/shift, and write ``cfg.out/autoencoder``.

    Under torchrun each process trains on its block of every global batch; rank 0 logs and writes.
    ``callbacks`` run on rank 0 with the EMA autoencoder. With ``cfg.dry_run`` it returns the dry-run
    report instead and writes nothing.
    """
    ctx = setup(cfg.distributed)
    try:
        return _train_vae(cfg, ctx, callbacks or [])
    finally:
        teardown(ctx)


def _train_vae(cfg: VAETrainConfig, ctx, callbacks: list[Callback]) -> Path | dict:
    # Setup.
    if cfg.model not in AUTOENCODER_PRESETS:
        raise ValueError(f"unknown autoencoder preset {cfg.model!r}; known: {', '.join(sorted(AUTOENCODER_PRESETS))}")
    run = Path(cfg.out)
    checkpoint = find_checkpoint(run) if cfg.resume else None
    chunks = micro_batches(rank_positions(cfg.batch_size, ctx), cfg.grad_accum)
    main, writes = ctx.is_main, ctx.is_main and not cfg.dry_run
    if writes:
        run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    device = ctx.device
    pixel_set = uses_pixel_set(cfg.data, cfg.crop, cfg.buckets)  # tar shards, random crops, buckets: data.pixels
    dataset = None if pixel_set else make_image_dataset(cfg.data, cfg.num_images, cfg.image_size, cfg.seed, "train")
    images_u8 = None if pixel_set else preload(dataset, cfg.preload_gib, quiet=cfg.quiet or not main)

    # Build.
    model = build_autoencoder(from_dict(AutoencoderConfig, {**asdict(AUTOENCODER_PRESETS[cfg.model]), **cfg.autoencoder},
                                        "train-vae autoencoder"))
    if cfg.image_size % model.factor:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the autoencoder's factor {model.factor}")
    if pixel_set:
        bucket_step = cfg.bucket_step or 8 * model.factor
        if bucket_step % model.factor:
            raise ValueError(f"bucket_step {bucket_step} must be a multiple of the autoencoder's factor {model.factor}")
        dataset = open_pixel_set(cfg.data, cfg.image_size, crop=cfg.crop, buckets=cfg.buckets,
                                 bucket_area=cfg.bucket_area, bucket_step=bucket_step, bucket_max_aspect=cfg.bucket_max_aspect,
                                 min_size=cfg.min_size, budget_gib=cfg.preload_gib, quiet=cfg.quiet or not main)
    channels_last(model, cfg.channels_last, ctx)
    ema = EMA(model, cfg.ema_decay)
    lpips = perceptual_loss_or_none(cfg.lpips_path, cfg.lpips_vgg_path, cfg.perceptual_weight, cfg.quiet or not main)
    gan = cfg.disc_weight > 0
    if gan:
        disc = PatchDiscriminator(model.config.in_channels, cfg.disc_channels, cfg.disc_layers).to(device)
        min_size = 2 ** (cfg.disc_layers + 2)  # the smallest input that leaves a 2x2 logit map
        if cfg.image_size < min_size:
            raise ValueError(f"image_size {cfg.image_size} is too small for a PatchGAN with {cfg.disc_layers} "
                             f"layers (needs >= {min_size}): lower disc_layers or raise image_size")
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or cfg.lr, betas=(0.5, 0.9))
        d_skipper = NonFiniteSkipper(verbose=main)
    posthoc = [PowerEMA(model, s) for s in cfg.posthoc_sigma_rels] if cfg.posthoc_every else []
    plain = copy.deepcopy(ema.module) if main and ctx.distributed and cfg.distributed.strategy == "fsdp" else None
    wrapped = wrap(model, ctx)  # DDP / FSDP2 under torchrun
    for m in [ema.module, *(p.module for p in posthoc)]:
        shard_like(m.to(device), ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    if ctx.rank:
        torch.manual_seed(cfg.seed + ctx.rank)
    extra = {f"posthoc_{i}": p.module for i, p in enumerate(posthoc)}
    if gan:  # the discriminator and its optimizer live in the checkpoint too (not sharded: rank 0's copy)
        extra.update(discriminator=disc, disc_optimizer=opt_d)
    start = 0
    if checkpoint is not None:
        start = load_training_checkpoint(checkpoint, model, ema, opt, None, ctx=ctx, extra=extra)
        if main:
            print(f"resumed from {checkpoint} at step {start}", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    if main and not cfg.quiet:
        print(f"autoencoder {cfg.model}: {n_params / 1e6:.2f}M parameters, factor {model.factor}, "
              f"{model.latent_channels} latent channels; {len(dataset)} images; {ctx.world} process(es)",
              file=sys.stderr)
    fixed = same_shape_batches([dataset[i]["image"] for i in range(min(8, len(dataset)))], 8)[0]
    log = MetricsLog(run / "metrics.jsonl", cfg.steps, start, quiet=cfg.quiet, batch_size=cfg.batch_size,
                     tensorboard_dir=run / "tensorboard" if cfg.tensorboard else None) if writes else None
    skipper = NonFiniteSkipper(verbose=main)
    dry = DryRun(device) if cfg.dry_run else None
    parts: dict = {}
    pairs: list = []  # (images, detached reconstructions) of this step, for the discriminator

    def gan_and_perceptual_terms(recon, images, step: int, terms: dict):
        """LPIPS and the PatchGAN generator loss (Esser et al. 2021's adaptive weight), added to the loss."""
        extra_loss = recon.new_zeros(())
        nll = reconstruction_loss(recon, images, cfg.recon_loss)  # what the GAN weight is balanced against
        if lpips is not None:
            p_loss = lpips(recon, images).mean()
            extra_loss, nll = extra_loss + cfg.perceptual_weight * p_loss, nll + cfg.perceptual_weight * p_loss
            terms["lpips"] = p_loss.detach()
        if gan and step >= cfg.disc_start:  # generator side: fool the discriminator
            disc.requires_grad_(False)
            g_loss = -disc(recon).mean()
            disc.requires_grad_(True)
            d_weight = cfg.disc_weight * adaptive_gan_weight(nll, g_loss, model.decoder.conv_out.weight)
            extra_loss = extra_loss + d_weight * g_loss
            terms.update(g_loss=g_loss.detach(), d_weight=d_weight)
        return extra_loss

    # Loop.
    step = start
    try:
        with StopSignal() as stop:
            for step in range(start, cfg.steps):
                model.train()
                if dry:
                    dry.start()
                if pixel_set:  # the global batch (from one bucket when bucketed; its last batches may be short)
                    idx = dataset.batch_indices(step, cfg.batch_size, cfg.seed)
                    if dataset.bucketed:
                        chunks = bucket_chunks(len(idx), ctx, cfg.grad_accum)
                else:
                    idx = batch_indices(step, cfg.batch_size, len(dataset), cfg.seed)  # the global batch

                def loss_fn(positions: torch.Tensor, step: int = step, idx: torch.Tensor = idx) -> torch.Tensor:
                    """The micro-batch's mean loss, once per sample (all samples weigh the same)."""
                    sel = idx[positions]
                    gens = sample_generators(cfg.seed, step, positions)
                    if pixel_set:  # random crops come first from each sample's generator, then its posterior noise
                        images = dataset.batch(sel, gens)
                    else:
                        images = from_uint8(images_u8[sel]) if images_u8 is not None else \
                            torch.stack([dataset[i]["image"] for i in sel.tolist()])
                    images = images.to(device)
                    with autocast(cfg.precision, device, training=True):
                        if isinstance(model, AutoencoderVQ):  # the quantizer's straight-through output, no noise
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
                    loss = loss + gan_and_perceptual_terms(recon, images, step, terms)
                    parts.update(terms)
                    if gan and step >= cfg.disc_start:
                        pairs.append((images, recon.detach()))
                    return loss.expand(len(positions))

                for group in opt.param_groups:
                    group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
                pairs.clear()
                loss, grad_norm, stop_now = train_step(ctx, wrapped, model, opt, skipper, chunks, loss_fn,
                                                       cfg.batch_size, step, cfg.grad_clip, stop)
                if grad_norm is not None:
                    ema.update(model)
                    for p in posthoc:
                        p.update(model, step + 1)
                    if pairs:  # discriminator side: hinge loss on real images and (detached) reconstructions
                        real, fake = (torch.cat(t) for t in zip(*pairs))
                        d_loss = hinge_d_loss(disc(real), disc(fake))
                        if d_skipper.step(d_loss, step, opt_d, disc, cfg.grad_clip) is not None:
                            parts["d_loss"] = d_loss.detach()
                if dry:
                    dry.stop()
                    if step + 1 - start >= cfg.dry_run_steps:
                        break
                    continue

                if cfg.posthoc_every and (step + 1) % cfg.posthoc_every == 0:
                    for p in posthoc:
                        state = full_state(p.module)
                        if main:
                            save_snapshot(run, p, step + 1, state)
                if main and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                    log.log(step, loss=loss, **{k: float(v) for k, v in parts.items() if k != "loss"},
                            grad_norm=grad_norm if grad_norm is not None else float("nan"),
                            lr=opt.param_groups[0]["lr"])
                sample_due = cfg.sample_every and (step + 1) % cfg.sample_every == 0
                hook_due = any(cb.every > 0 and (step + 1) % cb.every == 0 for cb in callbacks)
                if sample_due or hook_due:
                    ema_model = gathered(ema.module, plain)  # a collective under FSDP
                    if main and sample_due:
                        save_reconstructions(ema_model, fixed.to(device), run / "samples" / f"recon_{step + 1:07d}.png")
                    if main and hook_due:
                        run_callbacks(callbacks, step + 1, lambda m=ema_model: m)
                if stop_now or ((step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps):
                    if main:
                        check_finite_params(model)
                        if gan:
                            check_finite_params(disc)
                    folder = save_training_checkpoint(run, step + 1, model, ema, opt, None, to_dict(cfg),
                                                      cfg.keep_last, ctx=ctx, extra=extra)
                    if stop_now:
                        if log:
                            log.close()
                        raise SystemExit(preempted_message(folder, step + 1))
    except KeyboardInterrupt:
        if log:
            log.close()
        raise SystemExit(interrupt_message(run, step)) from None
    except (RuntimeError, MemoryError) as e:
        if dry is None or not is_out_of_memory(e):
            raise
        report = dry.report(cfg.steps, cfg.batch_size, ctx.world, out_of_memory=str(e).split("\n")[0])
        print_dry_run(report, ctx)
        return report
    if dry:
        report = dry.report(cfg.steps, cfg.batch_size, ctx.world)
        print_dry_run(report, ctx)
        return report
    if log:
        log.close()

    # The training checkpoint, then latent statistics and the final component (the EMA weights), on rank 0.
    if main:
        check_finite_params(model)
    save_training_checkpoint(run, cfg.steps, model, ema, opt, None, to_dict(cfg), cfg.keep_last, ctx=ctx,
                             extra=extra)
    final = gathered(ema.module, plain)
    if main:
        final = final.cpu()
        check_finite_params(final)
        stats_set = [dataset[i]["image"] for i in range(min(cfg.stats_images, len(dataset)))]
        batches = same_shape_batches(stats_set, 64)
        scale, shift = compute_latent_stats(final, batches, per_channel=cfg.per_channel_stats)
        set_latent_stats(final, scale, shift)
        save_autoencoder(run / "autoencoder", final)
        save_reconstructions(final, fixed, run / "samples" / "recon_final.png")
        if not cfg.quiet:
            print(f"latent scale {scale}, shift {shift}; autoencoder written to {run / 'autoencoder'}",
                  file=sys.stderr)
    ctx.barrier()
    return run / "autoencoder"


def preload(dataset, budget_gib: float, quiet: bool = False) -> torch.Tensor | None:
    """The whole data set as one uint8 tensor (N, 3, H, W) if it fits the budget, else None (read per step)."""
    first = dataset[0]["image"]
    if len(dataset) * first.numel() > budget_gib * 2**30:
        return None
    from tqdm import tqdm

    out = torch.empty((len(dataset), *first.shape), dtype=torch.uint8)
    for i in tqdm(range(len(dataset)), desc="loading images", disable=quiet, file=sys.stderr):
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
