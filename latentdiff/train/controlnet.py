"""ControlNet training on a latent cache that stores condition maps (``cache --set control=edges``), on the run
engine (``train.run``): the base model's denoiser and text encoder frozen, the ControlNet (a copy of the denoiser's
encoder, zero-initialized outputs; Zhang et al. 2023) trained with the base model's own denoising loss through
``diffusion.control.ControlledDenoiser``. Writes ``OUT/controlnet/`` (config.json + model.safetensors), which
``Pipeline.add_controlnet`` and ``latentdiff generate --controlnet`` load.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from latentdiff.components import read_model_folder
from latentdiff.config import FRACTION, at_least, bounds, from_dict, one_of
from latentdiff.data.cache import LatentCache
from latentdiff.data.control_maps import CONTROL_KINDS
from latentdiff.data.shapes import parse_caption, scene_from_dict, unplaced_caption
from latentdiff.diffusion.control import Control, ControlledDenoiser
from latentdiff.diffusion.losses import denoising_loss, make_sigma_sampler
from latentdiff.io import atomic_folder, load_state_strict, read_json
from latentdiff.models.controlnet import ControlNet, for_unet, load_controlnet, save_controlnet
from latentdiff.models.runtime import autocast
from latentdiff.models.unet import UNet
from latentdiff.train.common import check_finite_params
from latentdiff.train.denoiser import draw_samples
from latentdiff.train.distributed import Context, per_sample
from latentdiff.train.run import Run, RunConfig, processes

# The training noise levels the base model's parameterization calls for, unless sigma_sampler names one.
DEFAULT_SIGMA_SAMPLERS = {"flow": "logitnormal", "edm": "lognormal"}  # others (eps, v, x0): "discrete"


@dataclass
class ControlNetTrainConfig(RunConfig):
    """``latentdiff train-controlnet``: a ControlNet for a model folder, on a latent cache with condition maps."""

    out: str = "runs/controlnet"  # run folder: checkpoints/, metrics.jsonl, and the final controlnet/
    model: str = "default"  # the base model folder (its denoiser must be a U-Net); "default": the bundled model
    cache: str = "runs/cache"  # latent cache of the base model's autoencoder, built with `cache --set control=KIND`
    control: str = ""  # the condition map to train on; "" = the one the cache stores (else it must match)
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # latents per step
    lr: float = 3e-4  # peak AdamW learning rate
    warmup_steps: int = 50  # linear warm-up
    ema_decay: float = 0.995  # EMA of the ControlNet's weights: what is saved
    sample_every: int = 0  # no sample grids (measure with benchmarks/controlnet_follow.py)
    save_every: int = 500  # steps between checkpoints
    caption_dropout: float = 0.15  # share of samples on the empty prompt: the map alone must carry the layout
    unplaced: float = 0.5  # share of the other shapes captions that name only colours and shapes (and the
    # background, if the caption did), in the map's label order: the map alone must then set size and place
    unshaped: float = 0.0  # share of those unplaced captions that name colours only ("a cyan object"): the map alone
    # must then carry each object's shape too, so the net learns to push shape against the base model's prior
    init: str = ""  # a ControlNet folder to start from (fine-tune one; "" = copy the denoiser's encoder)
    sigma_sampler: str = ""  # training noise levels; "" = the parameterization's usual one (flow: logitnormal)
    offset_noise: float = 0.0  # offset-noise strength (0 = off), as in `train`
    copy_encoder: bool = True  # start the ControlNet from the denoiser's encoder weights (as the paper does)

    BOUNDS = bounds({"control": one_of("", *CONTROL_KINDS), "caption_dropout": FRACTION, "unplaced": FRACTION,
                     "unshaped": FRACTION,
                     "sigma_sampler": one_of("", "discrete", "lognormal", "logitnormal"), "offset_noise": at_least(0)})


CONTROLNET_PRESETS: dict[str, dict] = {
    # The measured layout ControlNet of the bundled model (BENCHMARKS.md, "ControlNet on the bundled model"): about
    # 50 minutes on one thread; the map sets size and place, and shape on 0.98 of training pairs.
    "shapes": {"steps": 5000, "unplaced": 0.6},
    "shapes-test": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "save_every": 2,
                    "quiet": True},
}


def train_controlnet(cfg: ControlNetTrainConfig) -> Path | dict:
    """Train a ControlNet for ``cfg.model`` on ``cfg.cache``; write ``cfg.out/controlnet`` and return it."""
    with processes(cfg) as ctx:
        return _train_controlnet(cfg, ctx)


def _check_inputs(cfg: ControlNetTrainConfig, model, cache: LatentCache) -> str:
    """Everything that can be refused before training: sample grids, the base network, the cache's maps."""
    if cfg.sample_every:
        raise ValueError("train-controlnet draws no sample grids: set sample_every = 0 and measure the result with "
                         "benchmarks/controlnet_follow.py")
    if not isinstance(model.denoiser.network, UNet):
        kind = type(model.denoiser.network).__name__
        raise ValueError(f"{cfg.model}: a ControlNet copies a U-Net's encoder; this model's denoiser is a {kind}")  # noqa: TRY004
    if cache.control is None:
        raise ValueError(f"the latent cache {cache.folder} stores no condition maps: build one with `latentdiff "
                         "cache --set control=edges` (or layout, depth)")
    kind = cfg.control or cache.control_kind
    if kind != cache.control_kind:
        raise ValueError(f"control = {cfg.control!r}, but the cache stores {cache.control_kind!r} maps: build a "
                         f"cache with `--set control={cfg.control}`, or leave control unset")
    unet, shape = model.denoiser.network.config, cache.info["latent_shape"]
    factor = model.autoencoder.factor
    if shape[0] != unet.in_channels or tuple(cache.control.shape[-2:]) != (shape[1] * factor, shape[2] * factor):
        raise ValueError(f"the cache's latents {tuple(shape)} and maps {tuple(cache.control.shape[1:])} are not "
                         f"this model's ({unet.in_channels} latent channels, autoencoder factor {factor}): cache with "
                         "the model's own autoencoder (`cache --set autoencoder=MODEL/autoencoder`)")
    return kind


def unplaced_captions(captions: list[str], scenes: list[dict | None], flags: list[bool],
                      unshaped: list[bool] | None = None) -> tuple[list[str], bool]:
    """The captions with each flagged one of a shapes scene (not dropped to "") replaced by its colours and shapes
    only (``data.shapes.unplaced_caption``, the background kept if the caption names it), or its colours only where
    ``unshaped`` says so; and whether any was."""
    out = list(captions)
    unshaped = unshaped or [False] * len(captions)
    for k, (text, scene, flag, bare) in enumerate(zip(captions, scenes, flags, unshaped)):
        if flag and text and scene is not None:
            parsed = parse_caption(text)
            out[k] = unplaced_caption(scene_from_dict(scene), background=parsed is not None and
                                      parsed.background is not None, shapes=not bare)
    return out, out != list(captions)


def start_from(folder: str, built: ControlNet) -> ControlNet:
    """The ControlNet at ``folder`` (``init``), refused unless it is built as ``built`` (this model, this map)."""
    loaded, _ = load_controlnet(folder)
    if loaded.config != built.config:
        diff = [f"{f.name} {getattr(loaded.config, f.name)!r} vs {getattr(built.config, f.name)!r}"
                for f in dataclasses.fields(built.config) if getattr(loaded.config, f.name) != getattr(built.config,
                                                                                                         f.name)]
        raise ValueError(f"init {folder} is a ControlNet for another model or map ({'; '.join(diff)}): start from "
                         "one trained for this model with this cache's maps, or leave init unset")
    return loaded


def _train_controlnet(cfg: ControlNetTrainConfig, ctx: Context) -> Path | dict:
    # Setup: the frozen base model, the cache with its maps.
    run = Run(cfg, ctx)
    model = read_model_folder(cfg.model)
    cache = LatentCache(cfg.cache)
    kind = _check_inputs(cfg, model, cache)
    device = ctx.device
    denoiser, text_encoder, autoencoder = model.denoiser, model.text_encoder, model.autoencoder
    for module in (denoiser, text_encoder):
        module.requires_grad_(False).eval().to(device)
    cached_text = getattr(text_encoder, "config", None) is not None and cache.uses_text(text_encoder.config)

    # Build: a copy of the denoiser's encoder, its outputs zero-initialized.
    run.seed()
    controlnet = ControlNet(for_unet(denoiser.network.config, autoencoder.factor, kind))
    if cfg.init:  # fine-tune a ControlNet of this model and map kind
        controlnet.load_state_dict(start_from(cfg.init, controlnet).state_dict())
    elif cfg.copy_encoder:
        own = controlnet.state_dict()
        copied = {k: v for k, v in denoiser.network.state_dict().items() if k in own}
        controlnet.load_state_dict({**own, **copied})
    controlnet.train()
    run.build(controlnet)
    param = denoiser.parameterization
    sampler_name = cfg.sigma_sampler or DEFAULT_SIGMA_SAMPLERS.get(param.name, "discrete")
    sigma_sampler = make_sigma_sampler(sampler_name, param)
    if ctx.is_main and not cfg.quiet:
        n = sum(p.numel() for p in controlnet.parameters())
        print(f"controlnet ({kind}) for {cfg.model}: {n / 1e6:.2f}M trained parameters; {len(cache)} cached latents "
              f"with {kind} maps; sigmas {sampler_name}", file=sys.stderr)

    # Loop.
    with run.guard():
        for step in run.steps():
            idx, chunks = run.batch(cache, step)

            def loss_fn(positions: Tensor, step: int = step, idx: Tensor = idx) -> Tensor:
                """Per-sample losses of these global-batch positions, each drawn from its own generator."""
                gens, x0, captions, drop, sigma, noise = draw_samples(cfg, cache, autoencoder, sigma_sampler, step,
                                                                      idx, positions)
                x0, items = x0.to(device), idx[positions]
                image = cache.control[items].to(device, torch.float32) / 255  # (B, 3, H, W) in [0, 1]
                unplace = per_sample(gens, lambda g: torch.rand(1, generator=g)) < cfg.unplaced
                bare = (per_sample(gens, lambda g: torch.rand(1, generator=g)) < cfg.unshaped).tolist() \
                    if cfg.unshaped else None  # drawn only when asked: runs without it keep their stream
                captions, changed = unplaced_captions(captions, [cache.meta[i]["scene"] for i in items.tolist()],
                                                      unplace.tolist(), bare)
                with torch.no_grad():
                    cond = cache.text_cond(items, drop).map(lambda t: t.to(device)) if cached_text and not changed \
                        else text_encoder(captions)
                with autocast(cfg.precision, device):
                    controlled = ControlledDenoiser(denoiser, [Control(controlnet, image)])
                    return denoising_loss(controlled, x0, sigma, cond, noise=noise.to(device))

            run.advance(step, chunks, loss_fn)
    if cfg.dry_run:
        return run.dry_run_report()

    # Save: the last checkpoint, then the EMA ControlNet as a component folder.
    ema = run.finish()
    folder = run.folder / "controlnet"
    if ctx.is_main:
        ema = ema.cpu().eval()
        check_finite_params(ema)
        with atomic_folder(folder) as tmp:
            save_controlnet(tmp, ema)
        if not cfg.quiet:
            print(f"controlnet written to {folder}", file=sys.stderr)
    ctx.barrier()
    return folder


def export_controlnet_checkpoint(checkpoint: Path, ema_state: dict[str, Tensor], out: str | Path) -> Path:
    """A train-controlnet checkpoint's EMA weights as a ControlNet folder (``latentdiff export-checkpoint``), built
    from the run config it holds (its base model and cache must still be in place); works while the run trains."""
    cfg = from_dict(ControlNetTrainConfig, read_json(checkpoint / "state.json", f"{checkpoint} is not a checkpoint")
                    ["config"], f"{checkpoint}/state.json")
    model = read_model_folder(cfg.model)
    kind = cfg.control or read_json(Path(cfg.cache) / "cache.json", "the run's cache is gone").get("control") or ""
    controlnet = ControlNet(for_unet(model.denoiser.network.config, model.autoencoder.factor, kind))
    load_state_strict(controlnet, ema_state, f"{checkpoint.name} EMA")
    with atomic_folder(out) as tmp:
        save_controlnet(tmp, controlnet.eval())
    return Path(out)
