"""IP-Adapter training (Ye et al. 2023) for a frozen model on its latent cache, on the run engine (``train.run``):
setup -> build -> loop (loss, step, EMA, log, checkpoint) -> save ``RUN/ip_adapter.safetensors``.

The trained module is the built-in image encoder (``ShapesImageEncoder``) and the adapter (image projection +
``to_k_ip`` / ``to_v_ip`` per cross-attention layer); the U-Net, its text encoder and its autoencoder stay frozen.
As in the paper, the image prompt of a training sample is the sample's own image (here the decoding of its latent),
and the loss is the model's own denoising loss; the image is dropped (a zero embedding, what CFG's unconditional
branch gets) with ``image_dropout``, the caption with ``caption_dropout`` (high by default, so the image alone has
to carry the scene).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff.config import COUNT, FRACTION, above, at_least, between, bounds, one_of
from latentdiff.diffusion.losses import denoising_loss
from latentdiff.interop.ip_adapter import save_ip_adapter
from latentdiff.models.ip_adapter import IPAdapter, ShapesEncoderConfig, ShapesImageEncoder
from latentdiff.models.runtime import autocast
from latentdiff.train.common import refuse_fsdp
from latentdiff.train.denoiser import draw_samples
from latentdiff.train.distributed import Context, per_sample
from latentdiff.train.lora import frozen_base
from latentdiff.train.run import Run, RunConfig, processes


@dataclass
class IPAdapterTrainConfig(RunConfig):
    """``latentdiff train-ip-adapter``: an image encoder + IP-Adapter for a frozen U-Net model, trained on a latent
    cache made with its autoencoder (the keys every run shares: ``train.run.RunConfig``)."""

    out: str = "runs/ip_adapter"  # run folder: checkpoints/, metrics.jsonl, and ip_adapter.safetensors
    model: str = "default"  # the frozen base model: a latentdiff model folder, a diffusers folder, or "default"
    cache: str = "runs/cache"  # latent cache made with the base model's autoencoder (`latentdiff cache`)
    tokens: int = 4  # image tokens the projection makes
    embed_dim: int = 128  # width of the image encoder's embedding
    encoder_channels: tuple[int, ...] = (32, 64, 64)  # the image encoder's stride-2 convolution widths
    image_dropout: float = 0.1  # probability of a zero image embedding (keeps CFG's unconditional branch trained)
    caption_dropout: float = 0.5  # probability of the empty prompt (the image alone must then carry the scene)
    offset_noise: float = 0.0  # offset-noise strength (0 = off)
    sigma_sampler: str = ""  # "discrete", "lognormal", "logitnormal"; "": discrete with a noise schedule, else
    # logitnormal
    sigma_sampler_args: dict = field(default_factory=dict)  # e.g. logitnormal {mean = -0.5, std = 1.0}
    steps: int = 600  # optimizer steps
    batch_size: int = 32  # latents per step
    lr: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = 20  # linear warm-up
    ema_decay: float = 0.0  # EMA of the trained weights (0: the trained ones are saved)
    sample_every: int = 0  # (no sample grids: an image prompt needs reference images; must stay 0)
    save_every: int = 200  # steps between checkpoints

    BOUNDS = bounds({"tokens": between(1, 256), "embed_dim": COUNT, "image_dropout": FRACTION,
                     "caption_dropout": FRACTION, "offset_noise": at_least(0), "lr": above(0), "steps": COUNT,
                     "sigma_sampler": one_of("", "discrete", "lognormal", "logitnormal"), "sample_every": between(0, 0)})


IP_ADAPTER_PRESETS: dict[str, dict] = {
    "shapes-test": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "save_every": 2, "tokens": 2,
                    "embed_dim": 16, "encoder_channels": (8, 8), "quiet": True, "tensorboard": False},
    # The bundled default model (BENCHMARKS.md, "IP-Adapter: an image as the prompt").
    "shapes-default": {"steps": 1000, "batch_size": 32, "lr": 1e-3, "save_every": 250},
}


def train_ip_adapter(cfg: IPAdapterTrainConfig) -> Path | dict:
    """Train an image encoder and IP-Adapter for ``cfg.model``'s U-Net on ``cfg.cache``; write
    ``cfg.out/ip_adapter.safetensors`` (adapter + encoder) and return it (with ``cfg.dry_run``: the dry-run report,
    nothing written). DDP under torchrun; FSDP is refused (the trained modules are small)."""
    refuse_fsdp(cfg, "train-ip-adapter")
    with processes(cfg) as ctx:
        return _train_ip_adapter(cfg, ctx)


def _train_ip_adapter(cfg: IPAdapterTrainConfig, ctx: Context) -> Path | dict:
    # Setup: the frozen base model and the cache its autoencoder made.
    run = Run(cfg, ctx)
    base, cache, sigma_sampler, sampler_name = frozen_base(cfg, ctx)
    denoiser, text_encoder, autoencoder = base.denoiser, base.text_encoder, base.autoencoder
    network = denoiser.network
    if not hasattr(network, "cross_attentions") or not network.cross_attentions():
        raise ValueError(f"{cfg.model}'s denoiser is a {type(network).__name__} without cross-attention: an "
                         "IP-Adapter adds to a U-Net's cross-attention layers")
    autoencoder.requires_grad_(False).eval().to(ctx.device)
    size = base.index.sample_size

    # Build: the image encoder and the adapter are the trained module.
    run.seed()
    prompt = nn.ModuleDict({
        "encoder": ShapesImageEncoder(ShapesEncoderConfig(size, cfg.encoder_channels, cfg.embed_dim)),
        "adapter": IPAdapter.for_unet(network, cfg.embed_dim, cfg.tokens)})
    run.build(prompt)
    if ctx.is_main and not cfg.quiet:
        n = sum(p.numel() for p in prompt.parameters())
        print(f"IP-Adapter ({cfg.tokens} tokens, {len(prompt['adapter'].layers)} cross-attention layers) + image "
              f"encoder for {cfg.model}: {n / 1e6:.3f}M trained parameters, sigma sampler {sampler_name}; "
              f"{len(cache)} cached latents", file=sys.stderr)

    # Loop.
    with run.guard():
        for step in run.steps():
            idx, chunks = run.batch(cache, step)

            def loss_fn(positions: Tensor, step: int = step, idx: Tensor = idx) -> Tensor:
                """Per-sample losses: the sample's own image as its image prompt (dropped to a zero embedding)."""
                gens, x0, captions, _, sigma, noise = draw_samples(cfg, cache, autoencoder, sigma_sampler, step, idx,
                                                                   positions)
                keep = per_sample(gens, lambda g: torch.rand(1, generator=g)) >= cfg.image_dropout
                x0 = x0.to(ctx.device)
                with torch.no_grad():
                    cond = text_encoder(captions).map(lambda t: t.to(ctx.device))
                    pixels = autoencoder.decode(x0).clamp(-1, 1)  # (B, 3, S, S): the reference image
                with autocast(cfg.precision, ctx.device):
                    embeds = prompt["encoder"](pixels) * keep.to(ctx.device, pixels.dtype)[:, None]
                    cond = dataclasses.replace(cond, image_kv=prompt["adapter"](embeds))
                    return denoising_loss(denoiser, x0, sigma, cond, noise=noise.to(ctx.device))

            loss, grad_norm = run.step(step, chunks, loss_fn)
            run.log(step, loss, grad_norm)
            run.save(step)
    if cfg.dry_run:
        return run.dry_run_report()

    # Save: the last training checkpoint, then the adapter and its encoder (the EMA's, when there is one).
    ema = run.finish()
    path = run.folder / "ip_adapter.safetensors"
    if ctx.is_main:
        save_ip_adapter(ema["adapter"], path, {"base_model": cfg.model, "steps": cfg.steps, "cache": str(cfg.cache)},
                        encoder=ema["encoder"])
        if not cfg.quiet:
            print(f"IP-Adapter written to {path}", file=sys.stderr)
    ctx.barrier()
    return path
