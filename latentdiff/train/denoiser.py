"""Denoiser training on cached latents, on the run engine (``train.run``): setup -> build -> loop (loss, step, EMA,
log, samples, checkpoint) -> save.

The result is a complete model folder (autoencoder, denoiser, text encoder) that
``latentdiff.load`` opens.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff.components import (
    DenoiserSpec,
    ModelFolder,
    NoiseSchedule,
    build_denoiser,
    load_autoencoder,
    load_denoiser,
    load_text_encoder,
    write_model_folder,
)
from latentdiff.conditioning.concat import (
    downsample,
    inpaint_concat,
    low_res_channels,
    low_res_concat,
    low_res_factor,
)
from latentdiff.conditioning.labels import class_names_of, drop_labels, with_labels
from latentdiff.conditioning.sizes import for_size_conditioning, with_sizes
from latentdiff.conditioning.text import TextEncoderConfig, build_text_encoder
from latentdiff.config import COUNT, FINITE, FRACTION, at_least, between, bounds, from_dict, one_of
from latentdiff.data.cache import LatentCache
from latentdiff.data.masks import random_mask
from latentdiff.data.shapes import ShapesDataset, object_boxes
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.losses import denoising_loss, edm_weight, make_sigma_sampler, min_snr_weight
from latentdiff.diffusion.parameterization import ALIASES, PARAMETERIZATIONS
from latentdiff.images import make_grid, save_png
from latentdiff.io import load_state_strict, read_json
from latentdiff.model_index import INPAINT, LOW_RES, MAX_STEPS, ModelIndex, SizeConditioning
from latentdiff.models.families import find_preset, for_class_data, for_text_data, spatial_factor
from latentdiff.models.runtime import autocast
from latentdiff.train.common import Trainable, check_finite_params
from latentdiff.train.distributed import Context, per_sample, sample_generators
from latentdiff.train.engine import Callback
from latentdiff.train.run import Run, RunConfig, processes


@dataclass
class TrainConfig(RunConfig):
    """``latentdiff train``: a text-conditioned latent denoiser on a latent cache (the keys every run shares, and
    their defaults: ``train.run.RunConfig``)."""

    out: str = "runs/model"  # run folder: checkpoints/, metrics.jsonl, samples/, and the final model/
    cache: str = "runs/cache"  # latent cache folder (from `latentdiff cache`)
    autoencoder: str | None = None  # autoencoder folder; default: the one the cache was built with
    model: str = "shapes-tiny"  # network preset: U-Net (models/unet.py), DiT (models/dit.py) or MMDiT (models/mmdit.py)
    parameterization: str = "eps"  # what the network predicts: "eps", "v", "x0", "edm" or "flow"
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)  # discrete noise schedule (eps, v, x0)
    sigma_sampler: str = "discrete"  # training noise levels: "discrete", "lognormal" (EDM), "logitnormal" (SD3)
    sigma_sampler_args: dict = field(default_factory=dict)  # e.g. logitnormal {mean = -0.5, std = 1.0}; lognormal {p_mean, p_std}
    min_snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5
    edm_weighting: float = 0.0  # > 0: EDM's weighting lambda(sigma) with this sigma_data (e.g. 0.5), any parameterization
    offset_noise: float = 0.0  # offset-noise strength (0 = off)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # prompt encoder
    caption_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)
    steps: int = 4000  # optimizer steps
    batch_size: int = 64  # latents per step
    lr: float = 5e-4  # peak AdamW learning rate
    warmup_steps: int = 200  # linear warm-up
    sample_every: int = 1000  # steps between sample grids (0 = never)
    sample_prompts: tuple[str, ...] = ("a large red circle on the left", "a small blue square at the top",
                             "a large green triangle on the right", "a small yellow circle at the bottom")
    sample_steps: int = 20  # sampler steps for the grids
    sample_guidance: float = 4.0  # CFG scale for the grids
    save_every: int = 1000  # steps between checkpoints
    cached_text: bool = True  # read a frozen text encoder's embeddings from the cache when it holds them
    gradient_checkpointing: bool = False  # recompute U-Net block activations in backward (less memory, ~30% slower)
    eval_every: int = 0  # steps between evaluations (FID/KID/judge, latentdiff.eval) logged to eval.jsonl; 0 = never
    eval_samples: int = 64  # images generated per evaluation
    eval_features: str = ""  # shapes feature-network file (`latentdiff train-features`); "" = its default place
    judge_every: int = 0  # steps between judge suites (held-out, paraphrased, two-object prompts) in judge.jsonl
    judge_prompts: int = 64  # prompts per judge suite
    sample_schedule: str | None = None  # sigma grid for the sample grids; None: the model's own (flow for flow models)
    class_labels: bool = True  # a cache with class labels (class folders, tar .cls) trains a class-conditional net
    label_dropout: float = 0.1  # probability of the null class instead of the label (for CFG over classes)
    size_conditioning: bool = False  # SDXL micro-conditioning: original size, crop, target size join the pooled vector
    size_embed_dim: int = 64  # sinusoidal features per size id (SDXL: 256)
    inpaint: bool = False  # an inpainting model: the U-Net also sees a random mask + the masked image's latents
    inpaint_full: float = 0.25  # inpaint: share of samples fully masked (text-to-image)
    inpaint_objects: float = 0.5  # inpaint: of the others, share masked on one object's box (shapes scenes)
    init: str | None = None  # a model folder whose denoiser (and hashed text encoder) weights start this run
    upscale: int = 0  # > 0: a super-resolution model, this many times larger than its low-res input (conditioning/concat.py)

    BOUNDS = bounds({"parameterization": one_of(*PARAMETERIZATIONS, *ALIASES), "min_snr_gamma": at_least(0),
                     "sigma_sampler": one_of("discrete", "lognormal", "logitnormal"),
                     "edm_weighting": at_least(0), "offset_noise": at_least(0), "caption_dropout": FRACTION,
                     "sample_steps": between(1, MAX_STEPS), "sample_guidance": FINITE, "eval_every": at_least(0),
                     "eval_samples": COUNT, "judge_every": at_least(0), "judge_prompts": COUNT, "label_dropout": FRACTION,
                     "size_embed_dim": between(2, 4096), "inpaint_full": FRACTION, "inpaint_objects": FRACTION,
                     "upscale": at_least(0)})


# Rectified flow with logit-normal timesteps (as SD3), sampled on the flow grid: on the demo's latents it
# draws the asked colour far more often than eps prediction in the same steps (held-out 0.86 vs 0.48,
# BENCHMARKS.md, "The demo's denoiser: rectified flow"); the DiT and MMDiT presets below use it too.
_FLOW = {"parameterization": "flow", "sigma_sampler": "logitnormal", "sample_schedule": "flow"}
_DEMO = {"model": "shapes-demo", "steps": 500, "batch_size": 128, "lr": 2e-3, "warmup_steps": 50, "ema_decay": 0.995,
         "sample_every": 250, "save_every": 250, "text_encoder": {"dim": 128, "num_layers": 1}, **_FLOW}
# The bundled model's text encoder: no transformer layer, phrase pooling (ARCHITECTURE.md, "What a hashed word sees").
_PHRASES = {"dim": 128, "num_layers": 0, "phrase_pool": True}
_MINILM = {"text_encoder": {"kind": "pretrained", "path": "minilm", "max_length": 32}}

TRAIN_PRESETS: dict[str, dict] = {
    "shapes": {},
    "shapes-minilm": _MINILM,
    # The demo's stage 3: 8x8x8 latents of 32x32 images, 1000 steps (about 6 minutes on 2 cores of machine B), with
    # the bundled model's text encoder (no layer, phrase pooling): held-out shape 0.84 at step 1000 where the
    # one-layer encoder read 0.45 at its 500 (BENCHMARKS.md, "The demo").
    "shapes-demo": {**_DEMO, "steps": 1000, "text_encoder": _PHRASES},
    "shapes-demo-minilm": {**_DEMO, "text_encoder": _MINILM["text_encoder"]},
    "shapes-test": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "sample_every": 2,
                    "save_every": 2, "sample_steps": 2, "precision": "fp32", "quiet": True,
                    "text_encoder": {"dim": 32, "num_layers": 1}},
}


# The other network families on the same data (models/families.py), also with rectified flow: in the U-Net's
# CPU time the DiT learns position and count with eps too, colour better with flow (BENCHMARKS.md, "Backbones:
# why the DiT did not learn, and the fix").
_MMDIT = {"model": "mmdit-shapes", **_FLOW}
TRAIN_PRESETS["shapes-dit-test"] = {**TRAIN_PRESETS["shapes-test"], "model": "dit-tiny"}
TRAIN_PRESETS["shapes-mmdit-test"] = {**TRAIN_PRESETS["shapes-test"], **_MMDIT, "model": "mmdit-tiny"}
TRAIN_PRESETS["shapes-demo-dit"] = {**_DEMO, "model": "dit-shapes"}
# The bundled default model (latentdiff/default/README.md): the demo's recipe, 4000 steps on a larger
# cache, with the judge suites logged every 500 steps (judge.jsonl: the curve against CPU time) and every
# checkpoint kept (the shipped weights are picked on that curve: latentdiff/default/README.md). Its text encoder
# has no transformer layer: each word's feature is its own, whatever its neighbours, which carries "triangle" over
# to colours it was never seen with (held-out 0.91 against 0.81 at step 2000 with one layer), and phrase pooling
# tells each word what else its object's phrase says, which puts each colour on its own object in two-object
# prompts (0.89 against 0.09 at step 2000 without it; BENCHMARKS.md).
TRAIN_PRESETS["shapes-default"] = {**_DEMO, "steps": 4000, "warmup_steps": 200, "ema_decay": 0.999,
                                   "text_encoder": _PHRASES,
                                   "save_every": 500, "keep_last": 20, "sample_every": 1000, "judge_every": 500,
                                   "judge_prompts": 64}
TRAIN_PRESETS["shapes-demo-mmdit"] = {**_DEMO, **_MMDIT}
# An inpainting model (ARCHITECTURE.md, "Inpainting and concat models"): the demo's recipe, the U-Net also given a
# random mask and the masked image's latents (a quarter of the samples fully masked: text-to-image too); with the
# bundled model's text encoder, so that `--set init=latentdiff/default/model` starts from it.
TRAIN_PRESETS["shapes-inpaint"] = {**_DEMO, "inpaint": True, "text_encoder": _PHRASES}
TRAIN_PRESETS["shapes-inpaint-test"] = {**TRAIN_PRESETS["shapes-test"], "inpaint": True}
# Super-resolution (ARCHITECTURE.md, "Inpainting and concat models"): 16 -> 32 pixels with the demo's recipe; the
# 16-pixel image folded into 12 channels at the 8x8 latent's size.
TRAIN_PRESETS["shapes-sr"] = {**_DEMO, "upscale": 2, "sample_guidance": 1.0, "text_encoder": _PHRASES}
TRAIN_PRESETS["shapes-sr-test"] = {**TRAIN_PRESETS["shapes-test"], "upscale": 2}


def train_denoiser(cfg: TrainConfig, callbacks: list[Callback] | None = None) -> Path | dict:
    """Train a denoiser on a latent cache; write ``cfg.out/model`` (a model folder) and return it.

    Under torchrun each process trains on its block of every global batch (see ``train.distributed``);
    rank 0 logs, samples and writes. ``callbacks`` run on rank 0 with a Pipeline of the EMA weights.
    With ``cfg.dry_run`` it returns the dry-run report instead and writes nothing.
    """
    with processes(cfg) as ctx:
        return _train_denoiser(cfg, ctx, [*(callbacks or []), *eval_callbacks(cfg)])


def loss_weighting(cfg: TrainConfig, parameterization):
    """lambda(sigma) on the x0 loss from the config, or None: the raw-output MSE of the parameterization."""
    if cfg.min_snr_gamma > 0 and cfg.edm_weighting > 0:
        raise ValueError("min_snr_gamma and edm_weighting are two loss weightings: set one of them")
    if cfg.min_snr_gamma > 0:
        return lambda s: min_snr_weight(s, cfg.min_snr_gamma, parameterization)
    if cfg.edm_weighting > 0:
        return lambda s: edm_weight(s, cfg.edm_weighting)
    return None


def eval_callbacks(cfg: TrainConfig) -> list[Callback]:
    """The evaluation hook of ``cfg.eval_every`` (none when 0): fixed prompts, seeds and reference set."""
    if cfg.dry_run:
        return []
    callbacks = []
    if cfg.eval_every > 0:
        from latentdiff.eval.run import make_eval_hook

        hook = make_eval_hook(cfg.eval_every, cfg.eval_samples, log_path=Path(cfg.out) / "eval.jsonl",
                              feature_path=cfg.eval_features)
        callbacks.append(Callback(cfg.eval_every, hook))
    if cfg.judge_every > 0:
        from latentdiff.eval.judging import make_judge_hook

        callbacks.append(Callback(cfg.judge_every, make_judge_hook(
            cfg.judge_every, cfg.judge_prompts, Path(cfg.out) / "judge.jsonl", steps=cfg.sample_steps,
            guidance=cfg.sample_guidance, schedule=cfg.sample_schedule)))
    return callbacks


def _train_denoiser(cfg: TrainConfig, ctx: Context, callbacks: list[Callback]) -> Path | dict:
    # Setup.
    family, network_cfg = find_preset(cfg.model)
    run = Run(cfg, ctx, callbacks)  # the checkpoint to resume from, this rank's share of every batch
    cache = LatentCache(cfg.cache)
    ae_path = cfg.autoencoder or cache.autoencoder_path
    if ae_path is None:
        raise ValueError("the cache does not say which autoencoder made it: pass --set autoencoder=DIR")
    autoencoder = load_autoencoder(ae_path)  # stays on the CPU: it only normalizes latents and decodes samples
    image_size = cache.info["latent_shape"][1] * autoencoder.factor
    size_dim = cfg.size_embed_dim if cfg.size_conditioning else 0  # recorded in the model folder
    main, device = ctx.is_main, ctx.device

    # Build.
    run.seed()  # the same initial weights on every rank
    text_encoder = build_text_encoder(cfg.text_encoder)
    joint = cfg.text_encoder.kind == "hashed"  # trained with the network (a pretrained encoder stays frozen)
    labels = cache.labels if cfg.class_labels else None  # (N,) with class folders / .cls members
    class_names = None if labels is None else class_names_of(labels, cache.class_names)
    spec = denoiser_spec(cfg, family, network_cfg, cache, text_encoder.dim, class_names, autoencoder.factor)
    network_cfg = getattr(spec, family)
    denoiser = build_denoiser(dataclasses.replace(  # checkpointing is how it trains, not part of the saved spec
        spec, **{family: dataclasses.replace(network_cfg, gradient_checkpointing=cfg.gradient_checkpointing)}))
    cache.check_divisible(spatial_factor(family, network_cfg))  # every bucket's latents fit the network
    cached_text = cfg.cached_text and cache.uses_text(cfg.text_encoder)  # no text encoder in the loop
    if cfg.init:
        init_from_model(denoiser.network, text_encoder if joint else None, cfg.init, cfg.parameterization)
    model = Trainable(denoiser.network, text_encoder if joint else None)
    run.build(model, params=[p for p in model.parameters() if p.requires_grad])
    text_encoder.to(device)
    sigma_sampler = make_sigma_sampler(cfg.sigma_sampler, denoiser.parameterization, **cfg.sigma_sampler_args)
    weighting = loss_weighting(cfg, denoiser.parameterization)
    coder = copy.deepcopy(autoencoder).to(device) if device.type != "cpu" and (cfg.inpaint or cfg.upscale) \
        else autoencoder  # decodes x0 for the concat inputs
    if main and not cfg.quiet:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"denoiser {cfg.model} ({cfg.parameterization}), text encoder {cfg.text_encoder.kind}"
              f"{f', {len(class_names)} classes' if class_names else ''}: "
              f"{n_params / 1e6:.2f}M trained parameters; {len(cache)} cached latents; {ctx.world} process(es)",
              file=sys.stderr)

    def pipeline(ema: Trainable):
        """A Pipeline of the EMA weights, what the sample grids and the callbacks get."""
        return _pipeline(*ema_parts(ema, text_encoder, denoiser), autoencoder, image_size, class_names, size_dim,
                         concat_index(cfg))

    # Loop.
    with run.guard():
        for step in run.steps():
            idx, chunks = run.batch(cache, step)  # the global batch (from one bucket), this rank's share of it

            def loss_fn(positions: Tensor, step: int = step, idx: Tensor = idx) -> Tensor:
                """Per-sample losses of these global-batch positions, each drawn from its own generator."""
                gens, x0, captions, drop, sigma, noise = draw_samples(cfg, cache, autoencoder, sigma_sampler, step,
                                                                      idx, positions)
                x0 = x0.to(device)
                concat = inpaint_inputs(coder, x0, gens, idx[positions], cache, cfg) if cfg.inpaint else \
                    low_res_inputs(coder, x0, cfg.upscale) if cfg.upscale else None
                with autocast(cfg.precision, device):
                    cond = cache.text_cond(idx[positions], drop).map(lambda t: t.to(device)) if cached_text \
                        else text_encoder(captions)
                    if class_names is not None:  # drawn last: the text-only runs' streams stay as they were
                        drop_y = per_sample(gens, lambda g: torch.rand(1, generator=g)) < cfg.label_dropout
                        y = drop_labels(labels[idx[positions]], drop_y, len(class_names))
                        cond = with_labels(cond, y.to(device))
                    if cfg.size_conditioning:
                        cond = with_sizes(cond, cache.size_ids[idx[positions]], cfg.size_embed_dim)
                    cond = dataclasses.replace(cond, concat=concat) if concat is not None else cond
                    return denoising_loss(denoiser, x0, sigma, cond, weighting=weighting, noise=noise.to(device))

            run.advance(step, chunks, loss_fn, lambda pipe, n: sample_grid(pipe, cfg, run.sample_path(n)), pipeline)
    if cfg.dry_run:
        return run.dry_run_report()

    # Save: the last training checkpoint, then the model folder with the EMA weights.
    ema = run.finish()
    folder = run.folder / "model"
    if main:
        ema_denoiser, ema_text_encoder = ema_parts(ema, text_encoder, denoiser)
        check_finite_params(ema_denoiser.network)
        save_model_folder(folder, ema_denoiser, ema_text_encoder, spec, autoencoder, image_size,
                          class_names=class_names, size_embed_dim=size_dim, concat=concat_index(cfg))
        if not cfg.quiet:
            print(f"model written to {folder}", file=sys.stderr)
    ctx.barrier()
    return folder


def draw_samples(cfg: RunConfig, cache: LatentCache, autoencoder, sigma_sampler, step: int, idx: Tensor,
                 positions: Tensor) -> tuple[list[torch.Generator], Tensor, list[str], Tensor, Tensor, Tensor]:
    """What a denoising loss needs for these global-batch positions, each drawn from its own generator in this
    order: the posterior sample (normalized latents x0), caption dropout, sigma, noise (plus ``offset_noise``).
    Returns (the generators, x0, captions ("" where dropped), the dropout flags, sigma, noise); the loops draw
    their further per-sample numbers (labels) from the same generators afterwards."""
    gens = sample_generators(cfg.seed, step, positions)
    drawn = [cache.sample(idx[p:p + 1], g) for p, g in zip(positions.tolist(), gens)]
    x0 = autoencoder.normalize(torch.cat([raw for raw, _ in drawn]))
    drop = per_sample(gens, lambda g: torch.rand(1, generator=g)) < cfg.caption_dropout
    captions = ["" if d else c[0] for (_, c), d in zip(drawn, drop.tolist())]
    sigma = per_sample(gens, lambda g: sigma_sampler(1, generator=g))
    noise = per_sample(gens, lambda g: torch.randn(1, *x0.shape[1:], generator=g))
    if cfg.offset_noise:
        off = per_sample(gens, lambda g: torch.randn(1, x0.shape[1], generator=g))
        noise = noise + cfg.offset_noise * off[:, :, None, None]
    return gens, x0, captions, drop, sigma, noise


def denoiser_spec(cfg: TrainConfig, family: str, network_cfg, cache: LatentCache, text_dim: int,
                  class_names: list[str] | None, factor: int) -> DenoiserSpec:
    """The network preset fitted to the data: the cache's latent channels and size, the text encoder's width,
    the classes of a class-conditional cache, size conditioning; with the parameterization and schedule."""
    network_cfg = for_text_data(family, network_cfg, cache.info["latent_shape"][0], text_dim,
                                cache.info["latent_shape"][1])
    if class_names is not None:  # labels in cond.vector, label len(class_names) = null class
        if cfg.eval_every > 0:
            raise ValueError("eval_every scores shapes prompts, which a class-conditional model cannot take: set "
                             "eval_every = 0 and evaluate with `latentdiff eval --reference CLASS_FOLDERS`")
        network_cfg = for_class_data(family, network_cfg, len(class_names))
    if cfg.size_conditioning:
        check_size_conditioning(cache, class_names)
        network_cfg = for_size_conditioning(network_cfg, cfg.size_embed_dim)
    concat = concat_channels(cfg, family, cache.info["latent_shape"][0], factor)
    if concat:
        network_cfg = dataclasses.replace(network_cfg, concat_channels=concat)
    return DenoiserSpec(network=family, parameterization=cfg.parameterization, schedule=cfg.schedule,
                        **{family: network_cfg})


@torch.no_grad()
def init_from_model(network: nn.Module, text_encoder: nn.Module | None, folder: str, parameterization: str) -> None:
    """Start from a model folder's denoiser (and, for a jointly trained one, its text encoder): every tensor must
    match by name and shape, except the U-Net's input convolution, whose extra (concat) input channels start at
    zero, so the model starts as the one it came from (SD inpainting's start from SD, Rombach et al. 2022)."""
    source, spec = load_denoiser(Path(folder) / "denoiser")
    if ALIASES.get(parameterization, parameterization) != ALIASES.get(spec.parameterization, spec.parameterization):
        raise ValueError(f"init={folder} is a {spec.parameterization} model; this run trains {parameterization}: "
                         f"set parameterization = {spec.parameterization!r}")
    state = source.network.state_dict()
    own, old = network.state_dict().get("conv_in.weight"), state.get("conv_in.weight")
    if own is not None and old is not None and own.shape[1] > old.shape[1] and own.shape[0] == old.shape[0]:
        state["conv_in.weight"] = torch.cat([old, old.new_zeros(old.shape[0], own.shape[1] - old.shape[1],
                                                                *old.shape[2:])], dim=1)
    load_state_strict(network, state, f"{folder}/denoiser (init)")
    if text_encoder is not None:
        load_state_strict(text_encoder, load_text_encoder(Path(folder) / "text_encoder").state_dict(),
                          f"{folder}/text_encoder (init)")


@torch.no_grad()
def inpaint_inputs(coder, x0: Tensor, gens: list[torch.Generator], indices: Tensor, cache: LatentCache,
                   cfg: TrainConfig) -> Tensor:
    """The concat channels of inpainting training, in the layout ``Pipeline`` gives an inpainting model: per sample
    a random mask (``data.masks.random_mask``; the shapes scenes' object boxes where the cache has them), the mask
    at latent size (nearest), and the latents of the image with the masked pixels zeroed. The cache holds latents,
    not images, so the image is ``coder``'s (the run's autoencoder's) decoding of x0 (ARCHITECTURE.md, "Inpainting
    and concat models")."""
    pixels = coder.decode(x0).clamp(-1, 1)  # (B, 3, H, W)
    height, width = pixels.shape[-2:]
    boxes = [object_boxes(cache.meta[i].get("scene")) for i in indices.tolist()]
    mask = torch.cat([random_mask(g, height, width, b, full=cfg.inpaint_full, objects=cfg.inpaint_objects)
                      for g, b in zip(gens, boxes)]).to(pixels.device)
    return inpaint_concat(mask, coder.encode(pixels * (mask < 0.5)))


@torch.no_grad()
def low_res_inputs(coder, x0: Tensor, upscale: int) -> Tensor:
    """The concat channels of super-resolution training: the image (``coder``'s decoding of x0, as for
    inpainting) downsampled by ``upscale`` and folded to the latent's size (``conditioning/concat.py``)."""
    pixels = coder.decode(x0).clamp(-1, 1)
    return low_res_concat(downsample(pixels, upscale), low_res_factor(coder.factor, upscale))


def model_from_checkpoint(folder: Path) -> ModelFolder:
    """The model folder a denoiser checkpoint's EMA weights make, rebuilt from the run config it holds (its cache
    and autoencoder must still be where the run found them): what ``export-checkpoint`` writes."""
    from safetensors.torch import load_file

    cfg = from_dict(TrainConfig, read_json(folder / "state.json", f"{folder} is not a checkpoint")["config"],
                    f"{folder}/state.json")
    family, network_cfg = find_preset(cfg.model)
    cache = LatentCache(cfg.cache)
    autoencoder = load_autoencoder(cfg.autoencoder or cache.autoencoder_path)
    text_encoder = build_text_encoder(cfg.text_encoder)
    labels = cache.labels if cfg.class_labels else None
    class_names = None if labels is None else class_names_of(labels, cache.class_names)
    spec = denoiser_spec(cfg, family, network_cfg, cache, text_encoder.dim, class_names, autoencoder.factor)
    denoiser = build_denoiser(spec)
    joint = cfg.text_encoder.kind == "hashed"
    load_state_strict(Trainable(denoiser.network, text_encoder if joint else None),
                      load_file(folder / "ema.safetensors"), f"{folder.name} EMA")
    image_size = cache.info["latent_shape"][1] * autoencoder.factor
    size_dim = cfg.size_embed_dim if cfg.size_conditioning else 0
    return ModelFolder(_index(image_size, class_names, size_dim, **concat_index(cfg)), autoencoder, denoiser.eval(), spec,
                       text_encoder.eval())


def _pipeline(denoiser: Denoiser, text_encoder: nn.Module, autoencoder, image_size: int,
              class_names: list[str] | None = None, size_embed_dim: int = 0, concat: dict | None = None):
    from latentdiff.pipeline import Pipeline

    return Pipeline(autoencoder, denoiser, text_encoder, _index(image_size, class_names, size_embed_dim,
                                                                **(concat or {})))


def _index(image_size: int, class_names: list[str] | None, size_embed_dim: int, **concat) -> ModelIndex:
    return ModelIndex(sample_size=image_size, class_names=class_names,
                      size_conditioning=SizeConditioning(size_embed_dim), **concat)


def concat_channels(cfg: TrainConfig, family: str, latent_channels: int, factor: int) -> int:
    """The denoiser's concat channels: an inpainting model's mask + masked latents (1 + C), a super-resolution
    model's folded low-res image (3 r^2, ``conditioning/concat.py``), else 0; errors before any work."""
    if not (cfg.inpaint or cfg.upscale):
        return 0
    if family != "unet":
        raise ValueError(f"{'inpaint' if cfg.inpaint else 'upscale'} needs a U-Net (its input takes concat "
                         f"channels); {cfg.model} is a {family}: pick a U-Net preset such as shapes-demo")
    if cfg.inpaint and cfg.upscale:
        raise ValueError("inpaint and upscale train two different models: set one of them")
    if cfg.upscale and (cfg.judge_every or cfg.eval_every):
        raise ValueError("judge_every / eval_every score text-to-image, which a super-resolution model does not do: "
                         "set them to 0 and measure it with benchmarks/sr_compare.py")
    return latent_channels + 1 if cfg.inpaint else low_res_channels(factor, cfg.upscale)


def concat_index(cfg: TrainConfig) -> dict:
    """What the model index says of the denoiser's concat channels."""
    if cfg.upscale:
        return {"concat": LOW_RES, "upscale": cfg.upscale}
    return {"concat": INPAINT} if cfg.inpaint else {}


def check_size_conditioning(cache: LatentCache, class_names: list[str] | None) -> None:
    """Size conditioning needs the cache's size ids, and the pooled vector that class labels would take."""
    if class_names is not None:
        raise ValueError("size_conditioning joins the pooled text vector, which class labels replace: set "
                         "class_labels = false or size_conditioning = false")
    if cache.size_ids is None:
        raise ValueError(f"the latent cache {cache.folder} holds no original sizes and crops (built from the "
                         "shapes set, or by an older latentdiff): re-cache a folder or tar shards, or set "
                         "size_conditioning = false")


def ema_parts(ema: Trainable, text_encoder: nn.Module, denoiser: Denoiser) -> tuple[Denoiser, nn.Module]:
    """The denoiser and text encoder with the EMA weights, on the CPU (copies when training runs on a GPU)."""
    if next(ema.parameters()).device.type != "cpu":
        ema, text_encoder = copy.deepcopy(ema).cpu(), copy.deepcopy(text_encoder).cpu()
    te = ema.text_encoder if ema.text_encoder is not None else text_encoder
    return Denoiser(ema.network, denoiser.parameterization), te


def save_model_folder(folder: Path, denoiser: Denoiser, text_encoder: nn.Module, spec: DenoiserSpec,
                      autoencoder, cache_image_size: int, class_names: list[str] | None = None,
                      size_embed_dim: int = 0, concat: dict | None = None) -> Path:
    """Write a complete model folder atomically: autoencoder, denoiser, text encoder, model_index.json
    (``concat``: ``concat_index``'s words for a concat-conditioned denoiser)."""
    index = _index(cache_image_size, class_names, size_embed_dim, **(concat or {}))
    return write_model_folder(folder, ModelFolder(index, autoencoder, denoiser, spec, text_encoder))


def sample_grid(pipe, cfg: TrainConfig, path: Path) -> None:
    """Generate the fixed sample prompts (a class-conditional model: its first 8 classes) as one row."""
    prompts, labels = list(cfg.sample_prompts), None
    if pipe.class_names:
        labels = list(range(min(8, len(pipe.class_names))))
        prompts = [""] * len(labels)
    if pipe.concat_inputs == LOW_RES:  # a super-resolution model: held-out scenes, downsampled, upscaled
        data = ShapesDataset(len(prompts), size=pipe.default_size, seed=0, split="heldout")
        images = [pipe.generate(data[i]["caption"], low_res=downsample(data[i]["image"][None], cfg.upscale),
                                steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=0,
                                schedule=cfg.sample_schedule)[0] for i in range(len(prompts))]
    else:
        images = pipe.generate(prompts, steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=0,
                               schedule=cfg.sample_schedule, label=labels, **pipe.blank_canvas())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(images, ncols=len(images)), path)
