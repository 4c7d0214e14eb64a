"""LoRA fine-tuning of a frozen model's denoiser on a latent cache, on the run engine (``train.run``): setup ->
build -> loop (loss, step, EMA, log, samples, checkpoint) -> save ``RUN/lora.safetensors``.

Only the adapters train (``models/lora.py``); the network, its text encoder and its autoencoder stay frozen. The
loss is the model's own denoising loss (its parameterization, the same per-sample random streams as ``train``),
so a LoRA teaches the model new captions (a new colour word) the way its training taught it the old ones.

With ``decoder_rank`` a second LoRA, on the autoencoder's decoder, trains alongside (same steps, same batch): each
item's scene (a shapes cache keeps them) is rendered, encoded by the frozen encoder (a posterior sample), decoded
by the adapted decoder, and its L1 / L2 error joins the loss. It teaches the decoder to draw what the frozen
decoder cannot (a colour outside its palette) while the other colours, in the same images, keep their pixels;
both LoRAs go into one file (``denoiser.`` and ``autoencoder.`` keys), which ``generate --lora`` loads whole.
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff.components import ModelFolder, read_model_folder
from latentdiff.config import COUNT, FINITE, FRACTION, above, at_least, between, bounds, one_of
from latentdiff.data.cache import LatentCache
from latentdiff.data.shapes import render, scene_from_dict, to_tensor
from latentdiff.diffusion.losses import denoising_loss, make_sigma_sampler
from latentdiff.io import file_digest
from latentdiff.model_index import MAX_STEPS
from latentdiff.models.autoencoder import pixel_errors
from latentdiff.models.families import family_of
from latentdiff.models.lora import LoRA, save_lora
from latentdiff.models.runtime import autocast
from latentdiff.train.common import refuse_fsdp
from latentdiff.train.denoiser import draw_samples, sample_grid
from latentdiff.train.distributed import Context, per_sample
from latentdiff.train.run import Run, RunConfig, processes


@dataclass
class LoRATrainConfig(RunConfig):
    """``latentdiff train-lora``: LoRA adapters for a frozen model's denoiser, trained on a latent cache (the keys
    every run shares: ``train.run.RunConfig``)."""

    out: str = "runs/lora"  # run folder: checkpoints/, metrics.jsonl, samples/, and lora.safetensors
    model: str = "default"  # the frozen base model: a latentdiff model folder, a diffusers folder, or "default"
    cache: str = "runs/cache"  # latent cache made with the base model's autoencoder (`latentdiff cache`)
    rank: int = 8  # LoRA rank
    alpha: float = 0.0  # LoRA alpha (scale = alpha / rank); 0: alpha = rank, a scale of 1
    targets: tuple[str, ...] = ("attention",)  # layer patterns or groups (attention, conv, ff), e.g. ["attention", "conv"]
    sigma_sampler: str = ""  # training noise levels: "discrete", "lognormal", "logitnormal"; "": discrete for models
    # with a discrete noise schedule, else logitnormal
    sigma_sampler_args: dict = field(default_factory=dict)  # e.g. logitnormal {mean = -0.5, std = 1.0}
    caption_dropout: float = 0.1  # probability of training on the empty prompt (keeps CFG working)
    offset_noise: float = 0.0  # offset-noise strength (0 = off)
    steps: int = 500  # optimizer steps
    batch_size: int = 32  # latents per step
    lr: float = 1e-3  # peak AdamW learning rate (LoRAs take larger rates than full training)
    warmup_steps: int = 20  # linear warm-up
    ema_decay: float = 0.0  # EMA of the adapters (0: the trained adapters themselves are saved)
    sample_every: int = 0  # steps between sample grids (0 = never)
    sample_prompts: tuple[str, ...] = ("a large red circle on the left", "a small blue square at the top")
    sample_steps: int = 20  # sampler steps for the grids
    sample_guidance: float = 4.0  # CFG scale for the grids
    sample_schedule: str | None = None  # sigma grid for the sample grids; None: the model's own
    save_every: int = 250  # steps between checkpoints
    decoder_rank: int = 0  # rank of a LoRA on the autoencoder's decoder, trained on the cache's rendered scenes (0: none)
    decoder_alpha: float = 0.0  # its alpha; 0: alpha = decoder_rank
    decoder_targets: tuple[str, ...] = ("decoder",)  # its layers: patterns from the autoencoder (group "decoder": the
    # decoder's convolutions)
    decoder_loss: str = "l1"  # its pixel loss: "l1" or "l2"
    decoder_weight: float = 1.0  # weight of the pixel loss in the sum with the denoising loss
    preserve: float = 0.0  # self-distillation toward the frozen base: items whose caption has none of preserve_words
    # are pulled toward (1 - preserve) * their data + preserve * the base model's own D(x) (0: off; 1: the base's
    # output only, so prompts without the new words keep the base model's behaviour)
    preserve_words: tuple[str, ...] = ()  # the new concept's words, e.g. ["orange"]: captions holding one teach it

    BOUNDS = bounds({"rank": between(1, 4096), "decoder_rank": between(0, 4096), "decoder_alpha": at_least(0),
                     "decoder_loss": one_of("l1", "l2"), "decoder_weight": above(0), "alpha": at_least(0), "preserve": FRACTION, "caption_dropout": FRACTION,
                     "sigma_sampler": one_of("", "discrete", "lognormal", "logitnormal"), "offset_noise": at_least(0),
                     "sample_steps": between(1, MAX_STEPS), "sample_guidance": FINITE, "lr": above(0),
                     "steps": COUNT})


LORA_PRESETS: dict[str, dict] = {
    "shapes-test": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "save_every": 2, "rank": 2,
                    "quiet": True, "tensorboard": False},
    # The bundled default model taught a colour it never saw ("orange"; BENCHMARKS.md, "LoRA: a new colour word").
    # Rank 16 on attention, convolutions and feed-forwards; the decoder's LoRA on its last up block and conv_out only
    # (on every decoder layer it costs held-out prompts a point); the captions without "orange" pulled half way to
    # the base model's own prediction (held-out prompts within 2 points; orange 0.94 on the cache preset's share 0.4).
    "shapes-orange": {"steps": 600, "batch_size": 32, "lr": 2e-3, "rank": 16, "targets": ("attention", "conv", "ff"),
                      "save_every": 200, "decoder_rank": 8,
                      "decoder_targets": ("decoder.up_blocks.2.*", "decoder.conv_out"),
                      "preserve": 0.5, "preserve_words": ("orange",)},
}


def train_lora(cfg: LoRATrainConfig) -> Path | dict:
    """Train a LoRA for ``cfg.model``'s denoiser on ``cfg.cache``; write ``cfg.out/lora.safetensors`` and return it
    (with ``cfg.dry_run``: the dry-run report, nothing written). DDP under torchrun; FSDP is refused (adapters are
    small, and their layers run inside the frozen network's)."""
    refuse_fsdp(cfg, "train-lora")
    with processes(cfg) as ctx:
        return _train_lora(cfg, ctx)


def _train_lora(cfg: LoRATrainConfig, ctx: Context) -> Path | dict:
    # Setup: the frozen base model and the cache its autoencoder made.
    check_preserve(cfg)
    run = Run(cfg, ctx)
    base, cache, sigma_sampler, sampler_name = frozen_base(cfg, ctx)
    denoiser, text_encoder, autoencoder = base.denoiser, base.text_encoder, base.autoencoder
    network = denoiser.network
    if cfg.decoder_rank:
        check_scenes(cache, cfg)
        autoencoder.requires_grad_(False).eval().to(ctx.device)

    # Build: the adapters are the trained module (the denoiser's LoRA, or it and the decoder's in a ModuleDict);
    # the EMA copy rides along, switched off but for the samples.
    run.seed()
    lora = LoRA.create(network, cfg.rank, cfg.alpha or None, cfg.targets, family=family_of(network),
                       name=Path(cfg.out).name)
    decoder = LoRA.create(autoencoder, cfg.decoder_rank, cfg.decoder_alpha or None, cfg.decoder_targets,
                          name=Path(cfg.out).name + ":autoencoder") if cfg.decoder_rank else None
    trained = lora if decoder is None else nn.ModuleDict({"denoiser": lora, "autoencoder": decoder})
    run.build(trained)
    pairs = [(lora, run.ema.module if decoder is None else run.ema.module["denoiser"], network)]
    if decoder is not None:
        pairs.append((decoder, run.ema.module["autoencoder"], autoencoder))
    for live, ema, root in pairs:
        live.attach(root)
        ema.enabled = False
        ema.attach(root)
    if ctx.is_main and not cfg.quiet:
        n = sum(p.numel() for p in trained.parameters())
        extra = f" and rank {cfg.decoder_rank} on {len(decoder.names)} decoder layers" if decoder is not None else ""
        print(f"LoRA rank {cfg.rank} on {len(lora.names)} layers of {cfg.model}'s {family_of(network)}{extra} "
              f"({n / 1e6:.3f}M trained parameters, sigma sampler {sampler_name}); {len(cache)} cached latents",
              file=sys.stderr)

    def pipeline(_ema):
        from latentdiff.pipeline import Pipeline

        return Pipeline(autoencoder, denoiser, text_encoder, base.index)

    # Loop.
    terms: dict[str, Tensor] = {}  # the decoder's pixel loss (of the last micro-batch), logged beside the loss
    with run.guard():
        for step in run.steps():
            idx, chunks = run.batch(cache, step)

            def loss_fn(positions: Tensor, step: int = step, idx: Tensor = idx) -> Tensor:
                """Per-sample losses of these global-batch positions (the frozen text encoder runs without grad),
                plus the decoder's pixel loss when it trains."""
                gens, x0, captions, _, sigma, noise = draw_samples(cfg, cache, autoencoder, sigma_sampler, step, idx,
                                                                   positions)
                with torch.no_grad():
                    cond = text_encoder(captions).map(lambda t: t.to(ctx.device))
                x0 = x0.to(ctx.device)
                target = preservation_target(denoiser, lora, cond, x0, captions, cfg) if cfg.preserve else None
                with autocast(cfg.precision, ctx.device):
                    loss = denoising_loss(denoiser, x0, sigma, cond, noise=noise.to(ctx.device), target=target)
                if decoder is not None:
                    pixels = decoder_loss(autoencoder, cache, idx[positions], gens, cfg.decoder_loss, ctx.device)
                    terms["decoder_loss"] = pixels.detach().mean()
                    loss = loss + cfg.decoder_weight * pixels
                return loss

            loss, grad_norm = run.step(step, chunks, loss_fn)
            run.log(step, loss, grad_norm, **terms)
            with swapped([live for live, _, _ in pairs], [ema for _, ema, _ in pairs]):  # the samples show the
                # adapters that will be saved
                run.samples(step, lambda pipe, n: sample_grid(pipe, cfg, run.sample_path(n)), target=pipeline)
            run.save(step)
    if cfg.dry_run:
        return run.dry_run_report()

    # Save: the last training checkpoint, then the adapters (the EMA's, when there is one) as a LoRA file.
    ema = run.finish()
    path = run.folder / "lora.safetensors"
    if ctx.is_main:
        save_lora(path, ema if decoder is None else ema["denoiser"],
                  {"base_model": cfg.model, "steps": cfg.steps, "cache": str(cfg.cache)},
                  autoencoder=None if decoder is None else ema["autoencoder"])
        if not cfg.quiet:
            print(f"LoRA written to {path}", file=sys.stderr)
    ctx.barrier()
    return path


def check_preserve(cfg: LoRATrainConfig) -> None:
    """``preserve`` needs the words that mark the new concept's captions (else every item would be preserved and
    nothing learnt)."""
    if cfg.preserve and not [w for w in cfg.preserve_words if w.strip()]:
        raise ValueError(f"preserve = {cfg.preserve} keeps the base model's output for captions without the new "
                         "concept's words, and preserve_words is empty: name them (--set 'preserve_words=[\"orange\"]'),"
                         " or set preserve = 0")


def preserved(captions: list[str], words: tuple[str, ...]) -> Tensor:
    """(B,) bool: the captions holding none of ``words`` (whole words, any case)."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(w.strip()) for w in words if w.strip()) + r")\b", re.IGNORECASE)
    return torch.tensor([pattern.search(c) is None for c in captions])


def preservation_target(denoiser, lora: LoRA, cond, x0: Tensor, captions: list[str], cfg: LoRATrainConfig):
    """``denoising_loss``'s target for ``cfg.preserve``: for the captions without ``cfg.preserve_words``, the mix
    (1 - preserve) x0 + preserve D_base(x) with the adapters switched off (no gradient); the others keep x0. The loss
    is quadratic, so one target mixed is the two losses mixed (up to a constant)."""
    keep = preserved(captions, cfg.preserve_words).to(x0.device).view(-1, *(1,) * (x0.ndim - 1))

    def target(x: Tensor, sigma: Tensor) -> Tensor:
        lora.enabled = False
        try:
            with torch.no_grad():
                base = denoiser(x, sigma, cond).to(x0.dtype)
        finally:
            lora.enabled = True
        return torch.where(keep, (1 - cfg.preserve) * x0 + cfg.preserve * base, x0)

    return target


def check_scenes(cache: LatentCache, cfg: LoRATrainConfig) -> None:
    """A decoder LoRA trains on the cache's scenes, rendered: every item needs one (a shapes cache)."""
    missing = sum(1 for m in cache.meta if not m.get("scene"))
    if missing:
        raise ValueError(f"decoder_rank = {cfg.decoder_rank} trains the decoder on the images of the cache's scenes, "
                         f"and {missing} of the {len(cache)} items of {cfg.cache} have none: use a cache of shapes "
                         "data (`latentdiff cache --preset shapes-orange`), or decoder_rank = 0")


def decoder_loss(autoencoder, cache: LatentCache, indices: Tensor, gens: list[torch.Generator], kind: str,
                 device: torch.device) -> Tensor:
    """Per-sample pixel loss of the adapted decoder: each item's scene rendered at the cache's image size (jitter
    seeded by the item's index), encoded by the frozen encoder (a posterior sample from the item's generator) and
    decoded."""
    size = cache.bucket_shapes[cache.bucket_of(indices)][1] * autoencoder.factor  # shapes scenes are square
    images = torch.stack([to_tensor(render(scene_from_dict(cache.meta[i]["scene"]), size, seed=i))
                          for i in indices.tolist()]).to(device)
    with torch.no_grad():
        posterior = autoencoder.encode_posterior(images)
    eps = per_sample(gens, lambda g: torch.randn(1, *posterior.mean.shape[1:], generator=g)).to(device)
    recon = autoencoder.decode_raw(posterior.mean + posterior.std * eps)
    return pixel_errors(recon.float(), images, kind).flatten(1).mean(1)


@contextmanager
def swapped(active: list[LoRA], other: list[LoRA]):
    """Within the block the ``other`` LoRAs are on and the ``active`` ones off; after it, the other way round."""
    for a, o in zip(active, other):
        a.enabled, o.enabled = False, True
    try:
        yield
    finally:
        for a, o in zip(active, other):
            a.enabled, o.enabled = True, False


def frozen_base(cfg: RunConfig, ctx: Context) -> tuple[ModelFolder, LatentCache, object, str]:
    """What an adapter's training loop starts from (``cfg.model``, ``cfg.cache``, ``cfg.sigma_sampler`` and its
    args): the frozen base model (its denoiser network and text encoder on the device, without gradients), the
    latent cache its autoencoder made (checked), and the sigma sampler with its name (by default discrete for a
    model with a noise schedule, else logit-normal)."""
    model_path = model_folder(cfg.model)
    base = open_base(model_path)
    cache = LatentCache(cfg.cache)
    check_cache(cache, base, model_path, cfg)
    base.denoiser.network.requires_grad_(False).eval().to(ctx.device)
    base.text_encoder.requires_grad_(False).eval().to(ctx.device)
    param = base.denoiser.parameterization
    name = cfg.sigma_sampler or ("discrete" if getattr(param, "alphas_cumprod", None) is not None else "logitnormal")
    return base, cache, make_sigma_sampler(name, param, **cfg.sigma_sampler_args), name


def model_folder(path: str) -> Path:
    """``path``, or the bundled default model's folder (checked against its manifest) for "default"."""
    if path == "default":
        from latentdiff.default import verify

        return verify()
    return Path(path)


def open_base(folder: Path) -> ModelFolder:
    """The frozen base model: a latentdiff model folder, or a diffusers folder / single file (through ``interop``)."""
    if (folder / "model_index.json").is_file() and not (folder / "unet").is_dir() \
            and not (folder / "transformer").is_dir():
        return read_model_folder(folder)
    from latentdiff.interop import open_model

    return open_model(folder)


def check_cache(cache: LatentCache, base: ModelFolder, folder: Path, cfg: LoRATrainConfig) -> None:
    """The cache's latents must be the base model's: same channels, and (when the cache names its autoencoder and
    the model is one of our folders) the same autoencoder weights."""
    channels = cache.info["latent_shape"][0]
    want = base.autoencoder.config.latent_channels
    if channels != want:
        raise ValueError(f"the cache {cfg.cache} holds {channels}-channel latents; {cfg.model}'s autoencoder makes "
                         f"{want}: cache the data with the model's autoencoder")
    made_by, model_ae = cache.autoencoder_path, folder / "autoencoder" / "model.safetensors"
    if made_by and (Path(made_by) / "model.safetensors").is_file() and model_ae.is_file() and \
            file_digest(Path(made_by) / "model.safetensors") != file_digest(model_ae):
        raise ValueError(f"the cache {cfg.cache} was made by the autoencoder {made_by}, not {cfg.model}'s: cache the "
                         f"data with --autoencoder {model_ae.parent}")
