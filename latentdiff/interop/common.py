"""What every checkpoint route shares: meta-device strict builds, the loaded model, writing our folder.

A loader (diffusers folder, single file, our own folder) produces an :class:`SDModel`: the three
components, the denoiser spec, the model index (the family it detected, the sample size, the sampler
settings its scheduler implies) and one load report per component. ``latentdiff.load`` turns it into a
:class:`~latentdiff.pipeline.Pipeline`; ``save_latentdiff`` writes it as our own model folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff.components import (
    DenoiserSpec,
    ModelFolder,
    build_parameterization,
    write_model_folder,
)
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import takes_alphas_cumprod
from latentdiff.io import LoadReport, load_state_strict
from latentdiff.model_index import SamplerHint
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.families import FAMILIES
from latentdiff.models.unet import UNet, UNetConfig


@dataclass
class SDModel(ModelFolder):
    """A loaded model (SD family, or our own folder) before it becomes a Pipeline or is written again."""

    reports: list[LoadReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was detected, dropped or assumed

    @property
    def family(self) -> str:
        return self.index.family  # "sd1", "sd2", "sdxl", ... as detected; "latentdiff" for our own

    @property
    def hint(self) -> SamplerHint:
        return self.index.scheduler

    @property
    def sample_size(self) -> int:
        return self.index.sample_size  # default image size in pixels

    def summary(self) -> str:
        discrete = takes_alphas_cumprod(self.spec.parameterization)
        betas = f"{self.spec.schedule.betas} betas" if discrete else f"{self.spec.network}"
        hint = self.hint
        scheduler = "no scheduler config" if hint.sampler is None else \
            f"scheduler -> sampler {hint.sampler!r}, schedule {hint.schedule!r}" + \
            (f" (steps_offset {hint.steps_offset})" if hint.steps_offset else "")
        lines = [f"detected {self.family}: {self.spec.parameterization}-prediction, {betas}; {scheduler}"]
        if hint.final_sigma:
            lines.append(f"ddim / plms end at sigma {hint.final_sigma:.4g} (set_alpha_to_one=False: the last "
                         "step goes to alphas_cumprod[0]), as diffusers' scheduler does")
        if hint.flow_shift != 1.0:
            lines.append(f"flow grids ('flow', 'flow_match') shifted by {hint.flow_shift:g}")
        noise = self.index.noise_augmentation
        if noise is not None:
            lines.append(f"super-resolution x{self.index.upscale}: the low-res image joins the latent, noised by "
                         f"{noise.betas} betas to noise_level 0..{noise.max_level} (default {noise.default_level}), "
                         "the level its class label")
        lines += [hint.note] if hint.note else []
        lines += [str(r) for r in self.reports] + self.notes
        return "\n".join(lines)


def as_dtype(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Floating tensors cast to ``dtype`` (None keeps the stored dtypes)."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def check_materialized(module: nn.Module, name: str) -> None:
    """Refuse a module that still holds a meta tensor (a weight or buffer the load did not set)."""
    unset = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if unset:
        raise ValueError(f"{name}: {len(unset)} tensors were left unset by the load, e.g. {unset[:3]}")


def build_network(cls: type[nn.Module], cfg, state: dict[str, Tensor], name: str) -> tuple[nn.Module, LoadReport]:
    """Build a network on the meta device and assign the weights: strict, no second copy."""
    with torch.device("meta"):
        net = cls(cfg)
    report = load_state_strict(net, state, name, assign=True)
    check_materialized(net, name)
    return net, report


def build_unet(cfg: UNetConfig, state: dict[str, Tensor], name: str = "unet") -> tuple[UNet, LoadReport]:
    """Build the U-Net on the meta device and assign the weights: strict, no second copy."""
    return build_network(UNet, cfg, state, name)


def build_autoencoder(cfg: AutoencoderConfig, state: dict[str, Tensor], name: str = "vae"):
    """Build the autoencoder on the meta device and assign the weights strictly."""
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    report = load_state_strict(vae, state, name, assign=True)
    check_materialized(vae, name)
    return vae.eval(), report


def make_denoiser(spec: DenoiserSpec, state: dict[str, Tensor]) -> tuple[Denoiser, LoadReport]:
    """The spec's network (U-Net, DiT or MMDiT) built strictly from ``state``, wrapped as a Denoiser."""
    network_class, _ = FAMILIES[spec.network]
    net, report = build_network(network_class, getattr(spec, spec.network), state, spec.network)
    return Denoiser(net, build_parameterization(spec)).eval(), report


class NoTextEncoder(nn.Module):
    """Stands in for the text encoder of a checkpoint that carries none; says what to do when asked for one."""

    def __init__(self, why: str):
        super().__init__()
        self.why = why

    def forward(self, prompts: list[str]):
        raise ValueError(self.why)


def save_latentdiff(model: SDModel, folder: str | Path) -> None:
    """Write an SDModel as a latentdiff model folder (atomically: all of it or nothing), its index whole."""
    if isinstance(model.text_encoder, NoTextEncoder):
        raise ValueError(f"cannot write a model folder without a text encoder: {model.text_encoder.why}")  # noqa: TRY004
    write_model_folder(folder, model)
