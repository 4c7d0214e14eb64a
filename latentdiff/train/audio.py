"""Audio training on the run engine (``train.run``): a text-conditioned U-Net on the latents of mel spectrograms of
the built-in tones (``data/tones.py``), encoded with a 1-channel autoencoder (``latentdiff train-vae --preset tones``).

setup (autoencoder, clips encoded) -> build (U-Net, hashed text encoder) -> loop (loss, step, EMA, log, samples,
checkpoint) -> save a model folder whose index holds the mel front end (``generate`` writes WAV files).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.audio import MelSpec
from latentdiff.components import (
    DenoiserSpec,
    ModelFolder,
    build_denoiser,
    load_autoencoder,
    write_model_folder,
)
from latentdiff.conditioning.text import TextEncoderConfig, build_text_encoder
from latentdiff.config import FINITE, FRACTION, at_least, between, bounds, one_of
from latentdiff.data.tones import ToneLatents
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.losses import make_sigma_sampler
from latentdiff.diffusion.parameterization import ALIASES, PARAMETERIZATIONS
from latentdiff.model_index import MAX_STEPS, ModelIndex
from latentdiff.models.families import find_preset, for_text_data, spatial_factor
from latentdiff.train.common import Trainable, captioned_latents_loss, check_finite_params
from latentdiff.train.denoiser import ema_parts
from latentdiff.train.distributed import Context
from latentdiff.train.run import Run, RunConfig, processes


@dataclass
class AudioTrainConfig(RunConfig):
    """``latentdiff train-audio``: a text-to-audio latent denoiser on the built-in tones (the keys every run shares:
    ``train.run.RunConfig``)."""

    out: str = "runs/audio"  # run folder: checkpoints/, metrics.jsonl, samples/, and the final model/
    autoencoder: str = ""  # a 1-channel autoencoder folder (`latentdiff train-vae --preset tones`: OUT/autoencoder)
    mel: MelSpec = field(default_factory=MelSpec)  # the mel front end (n_mels = the autoencoder's training image_size)
    frames: int = 64  # mel frames per clip (64 frames of 256 samples at 16 kHz: 1.024 s)
    clips: int = 2000  # tone clips rendered and encoded (in memory) before training
    model: str = "shapes-demo"  # U-Net preset (models/unet.py)
    parameterization: str = "flow"  # what the network predicts: "eps", "v", "x0", "edm" or "flow"
    sigma_sampler: str = "logitnormal"  # training noise levels: "lognormal" (EDM), "logitnormal" (SD3, flow)
    sigma_sampler_args: dict = field(default_factory=dict)  # e.g. logitnormal {mean = 0.0, std = 1.0}
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(dim=128, num_layers=0))
    caption_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # clips per step
    lr: float = 2e-3  # peak AdamW learning rate
    warmup_steps: int = 50  # linear warm-up
    ema_decay: float = 0.995  # EMA of weights: the weights saved at the end
    sample_every: int = 500  # steps between sample grids (mel spectrograms; 0 = never)
    save_every: int = 500  # steps between checkpoints
    sample_prompts: tuple[str, ...] = ("a flute note C4 played once", "an organ note G5 played twice",
                                       "a piano note C6 played three times", "a flute note C5 played four times")
    sample_steps: int = 20  # sampler steps for the grids
    sample_guidance: float = 4.0  # CFG scale for the grids

    BOUNDS = bounds({"frames": between(4, 4096), "clips": at_least(1), "caption_dropout": FRACTION,
                     "parameterization": one_of(*PARAMETERIZATIONS, *ALIASES),
                     "sigma_sampler": one_of("discrete", "lognormal", "logitnormal"),
                     "sample_steps": between(1, MAX_STEPS), "sample_guidance": FINITE})


AUDIO_PRESETS: dict[str, dict] = {
    # 64 mel bands x 64 frames (1.024 s at 16 kHz) -> 16x16x4 latents; the demo's U-Net with rectified flow.
    "tones": {},
    # The short CPU recipe: with train-vae's tones-cpu about 10 minutes on one CPU thread (BENCHMARKS.md, "Audio").
    "tones-cpu": {"steps": 200, "clips": 1500, "sample_every": 100, "save_every": 100},
    "tones-test": {"steps": 3, "batch_size": 2, "clips": 4, "frames": 16, "mel": {"n_mels": 16}, "warmup_steps": 1,
                   "log_every": 1, "sample_every": 2, "save_every": 2, "sample_steps": 2, "quiet": True,
                   "model": "shapes-tiny", "text_encoder": {"dim": 32, "num_layers": 0}},
}


def train_audio(cfg: AudioTrainConfig) -> Path | dict:
    """Train a text-to-audio denoiser on tone clips encoded with ``cfg.autoencoder``; write ``cfg.out/model`` and
    return it (with ``cfg.dry_run``: the dry-run report, nothing written)."""
    if not cfg.autoencoder:
        raise ValueError("train-audio needs a 1-channel autoencoder: train one with `latentdiff train-vae --preset "
                         "tones --set out=DIR` and pass --set autoencoder=DIR/autoencoder")
    with processes(cfg) as ctx:
        return _train_audio(cfg, ctx)


def _train_audio(cfg: AudioTrainConfig, ctx: Context) -> Path | dict:
    # Setup: the autoencoder, the network preset fitted to its latents, the clips encoded.
    run = Run(cfg, ctx)
    autoencoder = load_autoencoder(cfg.autoencoder)  # stays on the CPU: it encodes the clips and decodes samples
    family, network_cfg = find_preset(cfg.model)
    check_audio_shapes(autoencoder, cfg.mel, cfg.frames, spatial_factor(family, network_cfg), cfg.autoencoder)
    data = ToneLatents(autoencoder, cfg.clips, cfg.mel, cfg.frames, seed=cfg.seed)
    main, device = ctx.is_main, ctx.device

    # Build: the U-Net and the hashed text encoder, trained together.
    run.seed()
    text_encoder = build_text_encoder(cfg.text_encoder)
    spec = DenoiserSpec(network=family, parameterization=cfg.parameterization, **{family: for_text_data(
        family, network_cfg, autoencoder.latent_channels, text_encoder.dim, data.latents.shape[-1])})
    denoiser = build_denoiser(spec)
    joint = any(True for _ in text_encoder.parameters())  # a hashed encoder has weights to train
    model = Trainable(denoiser.network, text_encoder if joint else None)
    run.build(model, params=[p for p in model.parameters() if p.requires_grad])
    text_encoder.to(device)
    sigma_sampler = make_sigma_sampler(cfg.sigma_sampler, denoiser.parameterization, **cfg.sigma_sampler_args)
    if main and not cfg.quiet:
        print(f"audio {cfg.model} ({cfg.parameterization}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters; {len(data)} clips of {cfg.frames} frames ({cfg.mel.seconds(cfg.frames):.3f} s), latents "
              f"{tuple(data.latents.shape[1:])}", file=sys.stderr)

    loss_for = captioned_latents_loss(cfg, data, denoiser, text_encoder, sigma_sampler, device)  # a step's loss_fn

    # Loop.
    with run.guard():
        for step in run.steps():
            idx, chunks = run.batch(data, step)
            run.advance(step, chunks, loss_for(step, idx), lambda folder, n: sample_mels(folder, cfg, run.sample_path(n)),
                        lambda ema: _folder(ema, autoencoder, text_encoder, denoiser, spec, cfg))
    if cfg.dry_run:
        return run.dry_run_report()

    # Save: the last checkpoint, then the model folder with the EMA weights.
    ema = run.finish()
    folder = run.folder / "model"
    if main:
        audio = _folder(ema, autoencoder, text_encoder, denoiser, spec, cfg)
        check_finite_params(audio.denoiser.network)
        write_model_folder(folder, audio)
        if not cfg.quiet:
            print(f"audio model written to {folder}", file=sys.stderr)
    ctx.barrier()
    return folder


def check_audio_shapes(autoencoder, mel: MelSpec, frames: int, network_factor: int, where: str) -> None:
    """The autoencoder takes 1-channel images, and the mel bands and frames are multiples of what the autoencoder
    and the network downsample by; errors before any work."""
    if autoencoder.config.in_channels != 1:
        raise ValueError(f"{where} takes {autoencoder.config.in_channels}-channel images; mel spectrograms have one "
                         "channel: train one with `latentdiff train-vae --preset tones`")
    multiple = autoencoder.factor * network_factor
    for name, n in (("mel.n_mels", mel.n_mels), ("frames", frames)):
        if n % multiple:
            raise ValueError(f"{name} = {n} must be a multiple of {multiple} (the autoencoder's factor "
                             f"{autoencoder.factor} times the network's {network_factor})")


def _folder(ema: Trainable, autoencoder, text_encoder, denoiser: Denoiser, spec: DenoiserSpec,
            cfg: AudioTrainConfig) -> ModelFolder:
    """The audio model folder of the EMA weights: the index holds the mel front end and the clip length."""
    ema_denoiser, ema_text_encoder = ema_parts(ema, text_encoder, denoiser)
    index = ModelIndex(sample_size=cfg.frames, audio=cfg.mel)
    return ModelFolder(index, autoencoder, ema_denoiser.eval(), spec, ema_text_encoder.eval())


def sample_mels(folder: ModelFolder, cfg: AudioTrainConfig, path: Path) -> None:
    """The sample prompts' mel spectrograms as one row (``path``, a PNG; low frequencies at the bottom)."""
    from latentdiff.images import make_grid, save_png, to_pil
    from latentdiff.pipeline import Pipeline

    pipe = Pipeline(folder.autoencoder, folder.denoiser, folder.text_encoder, folder.index)
    mels = pipe.generate(list(cfg.sample_prompts), steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=0,
                         height=cfg.mel.n_mels, width=cfg.frames, output="pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(to_pil(mels.flip(-2)), ncols=len(cfg.sample_prompts)), path)
