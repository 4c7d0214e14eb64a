"""What every checkpoint route shares: meta-device strict builds, the loaded model, writing our folder.

A loader (diffusers folder, single file) produces an :class:`SDModel`: the three components, the
denoiser spec, the sampler settings its scheduler implies, the family it detected and one load
report per component. ``pipeline.to_pipeline`` turns it into a :class:`~latentdiff.pipeline.Pipeline`
(the pipeline builds on interop, not the other way round); ``save_latentdiff`` writes it as our own model folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff.components import (
    DenoiserSpec,
    build_parameterization,
    save_autoencoder,
    save_denoiser,
    save_text_encoder,
    write_model_index,
)
from latentdiff.conditioning.clip import SDTextEncoder
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.io import LoadReport, atomic_folder, load_state_strict
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.families import FAMILIES
from latentdiff.models.unet import UNet, UNetConfig


@dataclass
class SamplerHint:
    """The sampler and grid a checkpoint's own scheduler config asks for."""

    sampler: str = "euler"  # a sampling.SAMPLERS name
    schedule: str = "leading"  # a schedules.GRIDS name
    steps_offset: int = 0  # diffusers' steps_offset (added to 'leading' timesteps)
    vp_init: bool = False  # start from noise * sqrt(1 + sigma_max^2) as diffusers' VP schedulers do
    final_sigma: float = 0.0  # DDIM / PLMS end here, not at 0 (set_alpha_to_one=False: sigma of timestep 0)
    note: str = ""  # what of the scheduler config is not reproduced, said in the load report
    flow_shift: float = 1.0  # flow models: the shift of the 'flow' / 'flow_match' grids (SD3: 3.0)


@dataclass
class SDModel:
    """A loaded SD-family model before it becomes a Pipeline."""

    family: str  # "sd1", "sd2", "sdxl", ... as detected
    autoencoder: AutoencoderKL
    denoiser: Denoiser
    spec: DenoiserSpec
    text_encoder: nn.Module
    hint: SamplerHint = field(default_factory=SamplerHint)
    sample_size: int = 512  # default image size in pixels
    reports: list[LoadReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was detected, dropped or assumed

    def summary(self) -> str:
        betas = f"{self.spec.schedule.betas} betas" if self.spec.parameterization in ("eps", "v", "x0") else \
            f"{self.spec.network}"
        lines = [f"detected {self.family}: {self.spec.parameterization}-prediction, "
                 f"{betas}; scheduler -> sampler {self.hint.sampler!r}, "
                 f"schedule {self.hint.schedule!r}" + (f" (steps_offset {self.hint.steps_offset})"
                                                       if self.hint.steps_offset else "")]
        if self.hint.final_sigma:
            lines.append(f"ddim / plms end at sigma {self.hint.final_sigma:.4g} (set_alpha_to_one=False: the last "
                         "step goes to alphas_cumprod[0]), as diffusers' scheduler does")
        if self.hint.flow_shift != 1.0:
            lines.append(f"flow grids ('flow', 'flow_match') shifted by {self.hint.flow_shift:g}")
        lines += [self.hint.note] if self.hint.note else []
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
    """Write an SDModel as a latentdiff model folder (atomically: all of it or nothing)."""
    if isinstance(model.text_encoder, NoTextEncoder):
        raise ValueError(f"cannot write a model folder without a text encoder: {model.text_encoder.why}")  # noqa: TRY004
    with atomic_folder(folder) as tmp:
        save_autoencoder(tmp / "autoencoder", model.autoencoder)
        save_denoiser(tmp / "denoiser", model.denoiser, model.spec)
        if isinstance(model.text_encoder, SDTextEncoder):
            model.text_encoder.save(tmp / "text_encoder")
        else:
            save_text_encoder(tmp / "text_encoder", model.text_encoder)
        write_model_index(tmp, ["autoencoder", "denoiser", "text_encoder"], {
            "sample_size": model.sample_size, "family": model.family,
            "sampler": dataclasses.asdict(model.hint),
        })
