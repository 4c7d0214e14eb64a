"""Video training on the run engine (``train.run``): an image model inflated to video (a U-Net:
``models/video_unet.py``; a DiT: ``models/video_dit.py``), its temporal layers (or everything) trained on
moving-shapes clips encoded frame by frame with its autoencoder.

setup (image model, clips encoded) -> build (inflate, freeze) -> loop (loss, step, EMA, log, samples, checkpoint)
-> save a model folder whose denoiser is a ``video_unet`` or ``video_dit`` and whose index says its clip length.

The temporal keys: ``max_frames``, ``temporal_attention``, ``temporal_head_dim`` and ``temporal_cross_attention``
apply to both families; ``temporal_conv`` (a convolution over frames of the U-Net's feature maps) to a U-Net only:
unset, it is on for a U-Net, and a DiT refuses it set to true (its temporal blocks are attention only).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.components import DenoiserSpec, ModelFolder, read_model_folder, write_model_folder
from latentdiff.config import FINITE, FRACTION, at_least, between, bounds, one_of
from latentdiff.data.moving_shapes import ClipLatents
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.losses import make_sigma_sampler
from latentdiff.model_index import MAX_STEPS
from latentdiff.models.families import INFLATABLE, VIDEO_FAMILIES, family_of
from latentdiff.train.common import Trainable, captioned_latents_loss, check_finite_params
from latentdiff.train.denoiser import ema_parts
from latentdiff.train.distributed import Context
from latentdiff.train.run import Run, RunConfig, processes


@dataclass
class VideoTrainConfig(RunConfig):
    """``latentdiff train-video``: an image U-Net or DiT inflated to video, trained on moving-shapes clips (the keys
    every run shares: ``train.run.RunConfig``)."""

    out: str = "runs/video"  # run folder: checkpoints/, metrics.jsonl, samples/, and the final model/
    model: str = "default"  # the image model folder to inflate ("default": the bundled one); its U-Net or DiT, autoencoder
    frames: int = 8  # frames per clip
    clips: int = 1024  # moving-shapes clips rendered and encoded (in memory) before training
    split: str = "train"  # clips drawn from: "train" (no held-out (colour, shape, motion) triple), "all" (any)
    train: str = "temporal"  # "temporal": only the new temporal layers (image weights frozen); "all": everything
    max_frames: int = 16  # most frames the video model will accept
    temporal_conv: bool | None = None  # U-Net only: temporal convolutions in its temporal blocks (unset: on)
    temporal_attention: bool = True  # temporal self-attention in the temporal blocks
    temporal_head_dim: int = 0  # channels per temporal attention head (0: 24 for a U-Net, a DiT's own head width)
    temporal_cross_attention: bool = False  # temporal blocks also cross-attend to the prompt (per frame position)
    sigma_sampler: str = "logitnormal"  # training noise levels: "lognormal" (EDM), "logitnormal" (SD3, flow)
    sigma_sampler_args: dict = field(default_factory=dict)  # e.g. logitnormal {mean = 0.0, std = 1.0}
    caption_dropout: float = 0.1  # probability of training on the empty prompt (for CFG)
    steps: int = 2000  # optimizer steps
    batch_size: int = 8  # clips per step
    lr: float = 1e-3  # peak AdamW learning rate
    spatial_lr: float = 0.0  # train = "all": the image model's own weights' peak learning rate (0: lr)
    init: str = ""  # a train-video model folder whose weights start this run (the same temporal layers: a fine-tune)
    warmup_steps: int = 50  # linear warm-up
    ema_decay: float = 0.995  # EMA of weights: the weights saved at the end
    sample_every: int = 500  # steps between sample grids (0 = never)
    save_every: int = 500  # steps between checkpoints
    sample_prompts: tuple[str, ...] = ("a small red circle moving to the right on a black background",
                                       "a large blue square moving up on a gray background",
                                       "a yellow triangle growing on a white background",
                                       "a small green circle turning purple on a black background")
    sample_steps: int = 20  # sampler steps for the grids
    sample_guidance: float = 4.0  # CFG scale for the grids
    guidance: float = 0.0  # the model folder's recommended CFG scale (its index's generation.guidance; 0: the image's)

    BOUNDS = bounds({"frames": between(2, 64), "clips": at_least(1), "train": one_of("temporal", "all"),
                     "split": one_of("train", "all"), "spatial_lr": at_least(0),
                     "max_frames": between(2, 64), "temporal_head_dim": at_least(0),
                     "sigma_sampler": one_of("lognormal", "logitnormal"), "caption_dropout": FRACTION,
                     "sample_steps": between(1, MAX_STEPS), "sample_guidance": FINITE, "guidance": at_least(0)})


_FINE_TUNE = {"temporal_cross_attention": True, "clips": 2048, "train": "all", "spatial_lr": 1e-4, "steps": 2400,
              "save_every": 600, "keep_last": 10, "guidance": 1.5}  # moving-shapes-ft (below)

VIDEO_PRESETS: dict[str, dict] = {
    # The bundled default model's U-Net inflated; its temporal layers (with cross-attention to the prompt) trained on
    # 8-frame clips of 32 pixels: the run of BENCHMARKS.md "Video" (55 min on one thread of machine A under load).
    "moving-shapes": {"temporal_cross_attention": True, "clips": 2048, "steps": 2800, "save_every": 400,
                      "keep_last": 10},
    # Its fine-tune (give --set init=RUN/model): everything trained, the image weights at a tenth of the temporal
    # layers' lr, sampled at CFG 1.5 (BENCHMARKS.md "Video": twice from the run above, 1200 then 2400 steps).
    "moving-shapes-ft": _FINE_TUNE,
    # Its polish, once the -ft runs stop gaining (give --set init=... and a new seed: new clips each run): twice the
    # clips, a third of the learning rates, a longer EMA (BENCHMARKS.md "Fresh clips at a lower learning rate").
    "moving-shapes-polish": {**_FINE_TUNE, "clips": 4096, "lr": 3e-4, "spatial_lr": 3e-5, "ema_decay": 0.999},
    "moving-shapes-test": {"steps": 3, "batch_size": 2, "clips": 4, "frames": 4, "warmup_steps": 1, "log_every": 1,
                           "sample_every": 2, "save_every": 2, "sample_steps": 2, "quiet": True},
}


def train_video(cfg: VideoTrainConfig) -> Path | dict:
    """Inflate ``cfg.model``'s U-Net or DiT and train it on moving-shapes clips; write ``cfg.out/model`` and return it
    (with ``cfg.dry_run``: the dry-run report, nothing written)."""
    if cfg.frames > cfg.max_frames:
        raise ValueError(f"frames ({cfg.frames}) must be at most max_frames ({cfg.max_frames})")
    if cfg.spatial_lr and cfg.train != "all":
        raise ValueError("spatial_lr is the image weights' learning rate, which only train = 'all' trains: set "
                         "train=all, or leave spatial_lr at 0")
    with processes(cfg) as ctx:
        return _train_video(cfg, ctx)


def _train_video(cfg: VideoTrainConfig, ctx: Context) -> Path | dict:
    # Setup: the image model, and the clips encoded with its autoencoder.
    run = Run(cfg, ctx)
    image = read_model_folder(image_model_path(cfg.model))
    family = family_of(image.denoiser.network)
    if family not in INFLATABLE:
        raise ValueError(f"{cfg.model} has a {family} denoiser: train-video inflates U-Net and DiT models "
                         "(latentdiff train with a U-Net or DiT preset makes one)")
    keys = temporal_keys(cfg, family)
    INFLATABLE[family][1](image.denoiser.network.config, **keys)  # the video config checks them before any work
    start = init_model(cfg, image) if cfg.init else None  # checked before the clips are encoded
    size = image.index.sample_size
    data = ClipLatents(image.autoencoder, cfg.clips, cfg.frames, size, seed=cfg.seed,
                      split=None if cfg.split == "all" else cfg.split)
    main, device = ctx.is_main, ctx.device

    # Build: the inflated network (spatial weights the image model's), frozen except its temporal layers.
    run.seed()
    network = INFLATABLE[family][2](image.denoiser.network, **keys)
    text_encoder = image.text_encoder
    if start is not None:  # the fine-tuned model's weights, its text encoder's too (train = "all" trains it)
        network.load_state_dict(start.denoiser.network.state_dict())
        text_encoder = start.text_encoder
    denoiser = Denoiser(network, image.denoiser.parameterization)
    everything = cfg.train == "all"
    joint = everything and any(True for _ in text_encoder.parameters())  # a hashed encoder has weights to train
    model = Trainable(network, text_encoder if joint else None)
    temporal = network.temporal_parameters()
    temporal_ids = {id(p) for p in temporal}
    spatial = [p for p in model.parameters() if id(p) not in temporal_ids] if everything else []
    trained = temporal + spatial
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    groups = [{"params": temporal}] + ([{"params": spatial, "lr_scale": (cfg.spatial_lr or cfg.lr) / cfg.lr}]
                                       if spatial else [])
    run.build(model, params=groups)
    text_encoder.to(device)
    sigma_sampler = make_sigma_sampler(cfg.sigma_sampler, denoiser.parameterization, **cfg.sigma_sampler_args)
    if main and not cfg.quiet:
        print(f"{INFLATABLE[family][0]} from {cfg.model}: {sum(p.numel() for p in trained) / 1e6:.2f}M trained parameters "
              f"({cfg.train}); {len(data)} clips of {cfg.frames} frames at {size} px", file=sys.stderr)

    loss_for = captioned_latents_loss(cfg, data, denoiser, text_encoder, sigma_sampler, device)  # a step's loss_fn

    # Loop.
    with run.guard():
        for step in run.steps():
            idx, chunks = run.batch(data, step)
            run.advance(step, chunks, loss_for(step, idx), lambda folder, n: sample_clips(folder, cfg, run.sample_path(n, "")),
                        lambda ema: _folder(ema, image, text_encoder, denoiser, cfg))
    if cfg.dry_run:
        return run.dry_run_report()

    # Save: the last checkpoint, then the model folder with the EMA weights.
    ema = run.finish()
    folder = run.folder / "model"
    if main:
        video = _folder(ema, image, text_encoder, denoiser, cfg)
        check_finite_params(video.denoiser.network)
        write_model_folder(folder, video)
        if not cfg.quiet:
            print(f"video model written to {folder}", file=sys.stderr)
    ctx.barrier()
    return folder


def temporal_keys(cfg: VideoTrainConfig, family: str = "unet") -> dict:
    """The run's temporal fields for an image network of ``family`` (what ``inflate`` adds: ``VideoUNetConfig``'s,
    ``VideoDiTConfig``'s); a key of the other family set is refused."""
    shared = {"max_frames": cfg.max_frames, "temporal_attention": cfg.temporal_attention,
              "temporal_cross_attention": cfg.temporal_cross_attention}
    if family == "dit":
        if cfg.temporal_conv:
            raise ValueError("temporal_conv is a U-Net key (a convolution over frames of its feature maps); a DiT's "
                             "temporal blocks are attention over frames: leave temporal_conv unset")
        return {**shared, "temporal_head_dim": cfg.temporal_head_dim}
    return {**shared, "temporal_conv": cfg.temporal_conv is not False, "temporal_head_dim": cfg.temporal_head_dim or 24}


def init_model(cfg: VideoTrainConfig, image: ModelFolder) -> ModelFolder:
    """The video model folder ``cfg.init`` that starts a fine-tune, checked against the run's own inflation of
    ``image``: the same network and temporal layers, the same latent size."""
    folder = read_model_folder(Path(cfg.init))
    network = folder.denoiser.network
    family = family_of(image.denoiser.network)
    video_family, inflated_config, _ = INFLATABLE[family]
    if family_of(network) != video_family:
        if family_of(network) in VIDEO_FAMILIES:
            raise ValueError(f"init {cfg.init} is a {family_of(network)} model, but {cfg.model} inflates to a "
                             f"{video_family}: give a train-video model of the same image model")
        raise ValueError(f"init {cfg.init} is a {family_of(network)} model, not a train-video one: give the model "
                         "folder a train-video run wrote (RUN/model), or leave init empty to inflate cfg.model")
    plain = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))  # tuples and lists alike
    wanted = plain(network.config)
    ours = plain(inflated_config(image.denoiser.network.config, **temporal_keys(cfg, family)))
    differ = sorted(k for k in wanted if wanted[k] != ours.get(k))
    if differ or folder.index.sample_size != image.index.sample_size:
        raise ValueError(f"init {cfg.init} does not match this run's {video_family} (differing: "
                         f"{', '.join(differ) or 'sample_size'}): set the same model and temporal keys as its run "
                         f"({', '.join(f'{k}={wanted[k]!r}' for k in differ)})")
    return folder


def image_model_path(model: str) -> Path:
    """The image model folder to inflate: a path, or "default" for the bundled model (checked first)."""
    if model == "default":
        from latentdiff.default import verify

        return Path(verify())
    return Path(model)


def _folder(ema: Trainable, image: ModelFolder, text_encoder, denoiser: Denoiser, cfg: VideoTrainConfig
            ) -> ModelFolder:
    """The video model folder of the EMA weights: the image model's autoencoder, a ``video_unet`` or ``video_dit``
    denoiser, the run's text encoder (the image model's or the init's; the EMA's when trained)."""
    ema_denoiser, text_encoder = ema_parts(ema, text_encoder, denoiser)
    family = family_of(ema_denoiser.network)
    spec = DenoiserSpec(network=family, parameterization=image.spec.parameterization,
                        schedule=image.spec.schedule, **{family: ema_denoiser.network.config})
    index = dataclasses.replace(image.index, frames=cfg.frames)
    if cfg.guidance:
        index = dataclasses.replace(index, generation=dataclasses.replace(index.generation, guidance=cfg.guidance))
    return ModelFolder(index, image.autoencoder, ema_denoiser.eval(), spec, text_encoder.eval())


def sample_clips(folder: ModelFolder, cfg: VideoTrainConfig, path: Path) -> None:
    """The sample prompts as clips: one row of frames per prompt (``path``.png)."""
    from latentdiff.images import make_grid, save_png
    from latentdiff.pipeline import Pipeline

    pipe = Pipeline(folder.autoencoder, folder.denoiser, folder.text_encoder, folder.index)
    clips = pipe.generate(list(cfg.sample_prompts), frames=cfg.frames, steps=cfg.sample_steps,
                          guidance=cfg.sample_guidance, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid([f for clip in clips for f in clip], ncols=cfg.frames), path.with_suffix(".png"))
