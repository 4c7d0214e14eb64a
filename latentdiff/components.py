"""Save and load the components of a model folder, each ``config.json`` + ``model.safetensors``.

A latentdiff model folder::

    model_index.json     ModelIndex (model_index.py): sample size, labels, size conditioning, sampler hints
    autoencoder/         AutoencoderKL config (including its latent scale and shift) and weights
    denoiser/            network config, parameterization and noise schedule, and (EMA) weights
    text_encoder/        text encoder config, and weights when it was trained with the model

``read_model_folder`` / ``write_model_folder`` are the one reader and writer of a whole folder.
Loading is strict: every tensor must match; the load report says what matched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from latentdiff.conditioning.text import TextEncoderConfig, build_text_encoder
from latentdiff.config import above, at_least, bounds, from_dict, one_of
from latentdiff.diffusion import schedules
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import Consistency, make_parameterization, takes_alphas_cumprod
from latentdiff.io import (
    LoadReport,
    atomic_folder,
    load_component_weights,
    read_component_config,
    read_config,
    save_component,
)
from latentdiff.model_index import ModelIndex
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.dit import DiTConfig
from latentdiff.models.families import FAMILIES
from latentdiff.models.mmdit import MMDiTConfig
from latentdiff.models.unet import UNetConfig
from latentdiff.models.video_dit import VideoDiTConfig
from latentdiff.models.video_unet import VideoUNetConfig
from latentdiff.models.vq import build_autoencoder


@dataclass
class NoiseSchedule:
    """The discrete noise schedule a (VP, 1000-step) denoiser was trained with."""

    betas: str = "scaled_linear"  # "linear", "scaled_linear" (SD), "cosine" or "upscaler" (SD's x4 upscaler)
    num_timesteps: int = 1000  # discrete training timesteps
    zero_terminal_snr: bool = False  # rescale so the last step is pure noise (Lin et al. 2023)

    BOUNDS = bounds({"betas": one_of(*schedules.BETA_SCHEDULES), "num_timesteps": at_least(2)})

    def alphas_cumprod(self) -> torch.Tensor:
        if self.betas not in schedules.BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {self.betas!r}; choose one of {sorted(schedules.BETA_SCHEDULES)}")
        ac = schedules.alphas_cumprod(schedules.BETA_SCHEDULES[self.betas](self.num_timesteps))
        return schedules.rescale_zero_terminal_snr(ac) if self.zero_terminal_snr else ac


@dataclass
class ConsistencyScalings:
    """A consistency-distilled student's boundary scalings (``parameterization.Consistency``; LCM's values)."""

    sigma_data: float = 0.5  # sigma_data of c_skip / c_out
    timestep_scaling: float = 10.0  # the base's timestep is multiplied by this in c_skip / c_out

    BOUNDS = bounds({"sigma_data": above(0), "timestep_scaling": above(0)})


@dataclass
class DenoiserSpec:
    """Everything needed to rebuild a Denoiser apart from its weights."""

    network: str = "unet"  # network family: "unet", "dit", "mmdit", "video_unet" or "video_dit" (models/families.py)
    parameterization: str = "eps"  # "eps", "v", "x0", "edm" or "flow"
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)  # used by eps, v and x0
    unet: UNetConfig = field(default_factory=UNetConfig)  # the network's config (network = "unet")
    dit: DiTConfig = field(default_factory=DiTConfig)  # the network's config (network = "dit")
    mmdit: MMDiTConfig = field(default_factory=MMDiTConfig)  # the network's config (network = "mmdit")
    consistency: ConsistencyScalings | None = None  # a consistency model (`latentdiff distill`): its scalings
    video_unet: VideoUNetConfig = field(default_factory=VideoUNetConfig)  # the network's config (network = "video_unet")
    video_dit: VideoDiTConfig = field(default_factory=VideoDiTConfig)  # the network's config (network = "video_dit")


def build_parameterization(spec: DenoiserSpec):
    """The spec's parameterization, with its noise schedule where it is a discrete one."""
    discrete = takes_alphas_cumprod(spec.parameterization)
    ac = spec.schedule.alphas_cumprod() if discrete else None
    base = make_parameterization(spec.parameterization, alphas_cumprod=ac)
    if spec.consistency is None:
        return base
    return Consistency(base, spec.consistency.sigma_data, spec.consistency.timestep_scaling)


def build_denoiser(spec: DenoiserSpec) -> Denoiser:
    """Network + parameterization -> Denoiser."""
    if spec.network not in FAMILIES:
        raise ValueError(f"unknown network family {spec.network!r}; known: {', '.join(FAMILIES)}")
    network_class, _ = FAMILIES[spec.network]
    return Denoiser(network_class(getattr(spec, spec.network)), build_parameterization(spec))


def save_autoencoder(folder: str | Path, autoencoder: AutoencoderKL) -> None:
    save_component(folder, autoencoder, {"type": "AutoencoderKL", "config": dataclasses.asdict(autoencoder.config)})


def load_autoencoder(folder: str | Path, verbose: bool = False) -> AutoencoderKL:
    cfg = read_component_config(folder, "AutoencoderKL", "an autoencoder")
    model = build_autoencoder(from_dict(AutoencoderConfig, cfg, f"{folder}/config.json"))
    _report(load_component_weights(model, folder, "autoencoder"), verbose)
    return model.eval()


def save_denoiser(folder: str | Path, denoiser: Denoiser, spec: DenoiserSpec) -> None:
    config = {k: v for k, v in dataclasses.asdict(spec).items() if (k not in FAMILIES or k == spec.network)
              and not (k == "consistency" and v is None)}  # an ordinary denoiser's config as before
    save_component(folder, denoiser.network, {"type": "Denoiser", "config": config})  # only the used family's


def load_denoiser(folder: str | Path, verbose: bool = False) -> tuple[Denoiser, DenoiserSpec]:
    spec = from_dict(DenoiserSpec, read_component_config(folder, "Denoiser", "a denoiser"), f"{folder}/config.json")
    denoiser = build_denoiser(spec)
    _report(load_component_weights(denoiser.network, folder, "denoiser"), verbose)
    return denoiser.eval(), spec


def save_text_encoder(folder: str | Path, text_encoder: nn.Module) -> None:
    if hasattr(text_encoder, "save"):  # CLIP encoders of an SD-family model write their tokenizers too
        text_encoder.save(folder)
        return
    save_component(folder, text_encoder, {"type": "TextEncoder", "config": dataclasses.asdict(text_encoder.config)})


def load_text_encoder(folder: str | Path, verbose: bool = False) -> nn.Module:
    if read_config(folder).get("type") == "SDTextEncoder":  # CLIP encoders of an SD-family model (latentdiff.interop)
        from latentdiff.conditioning.clip import load_sd_text_encoder

        return load_sd_text_encoder(folder, verbose)
    cfg = read_component_config(folder, "TextEncoder", "a text encoder")
    model = build_text_encoder(from_dict(TextEncoderConfig, cfg, f"{folder}/config.json"))
    _report(load_component_weights(model, folder, "text_encoder"), verbose)
    return model.eval()


@dataclass
class ModelFolder:
    """A model folder's index and components, loaded or about to be written."""

    index: ModelIndex
    autoencoder: AutoencoderKL
    denoiser: Denoiser
    spec: DenoiserSpec
    text_encoder: nn.Module


def read_model_folder(folder: str | Path, verbose: bool = False) -> ModelFolder:
    """Open a latentdiff model folder: its index (any version) and its three components, strictly."""
    folder = Path(folder)
    index = ModelIndex.read(folder)
    denoiser, spec = load_denoiser(folder / "denoiser", verbose)
    return ModelFolder(index, load_autoencoder(folder / "autoencoder", verbose), denoiser, spec,
                       load_text_encoder(folder / "text_encoder", verbose))


def write_model_folder(folder: str | Path, model: ModelFolder) -> Path:
    """Write a complete model folder atomically (all of it or nothing): components, then model_index.json."""
    with atomic_folder(folder) as tmp:
        save_autoencoder(tmp / "autoencoder", model.autoencoder)
        save_denoiser(tmp / "denoiser", model.denoiser, model.spec)
        save_text_encoder(tmp / "text_encoder", model.text_encoder)
        model.index.write(tmp)
    return Path(folder)


def _report(report: LoadReport, verbose: bool) -> None:
    if verbose:
        print(report)
