"""``model_index.json``: what a latentdiff model folder holds and how to sample it. One reader, one writer.

Version 1::

    {"format": "latentdiff", "version": 1, "components": ["autoencoder", "denoiser", "text_encoder"],
     "sample_size": 32, "family": "latentdiff", "class_names": null, "size_conditioning": {"embed_dim": 0},
     "scheduler": {"sampler": null, "schedule": null, "steps_offset": 0, ...},
     "generation": {"sampler": null, "steps": null, "guidance": null, "schedule": null}}

Version 2 adds ``distilled`` (a few-step student of ``latentdiff distill``: method, the guidance scale its
w-embedding is given, the step range it was distilled for; absent or null for any other model); version 1
reads as version 2 without it.

Version 0 (no ``version`` key; latentdiff before issue 14) had the same keys, all optional, except that
the scheduler of a converted checkpoint was stored under ``sampler`` and there was no ``generation``.
It is read as version 1; a version newer than this code is refused.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.audio import MelSpec
from latentdiff.config import (
    COUNT,
    FINITE,
    FRACTION,
    Bound,
    above,
    at_least,
    between,
    bounds,
    from_dict,
    one_of,
)
from latentdiff.diffusion.schedules import BETA_SCHEDULES, alphas_cumprod
from latentdiff.io import read_json, write_json

VERSION = 2
MAX_STEPS = 10_000  # sampler steps a generation may ask for (a typo such as 1e12 is refused, not run for years)
INDEX_FILE = "model_index.json"
COMPONENTS = ("autoencoder", "denoiser", "text_encoder")
INPAINT = "inpaint"  # concat inputs of an inpainting denoiser: the mask (1) and the masked image's latents (C)
LOW_RES = "low_res"  # concat inputs of a super-resolution denoiser: the low-res image (conditioning/concat.py)
CONCAT_INPUTS = (INPAINT, LOW_RES)  # what a denoiser's concat channels (``Cond.concat``) may carry


@dataclass
class SamplerHint:
    """What a converted checkpoint's own scheduler config implies (diffusers' scheduler semantics).

    ``sampler`` / ``schedule`` name what that scheduler samples with (said in the load summary, written back
    when exporting to diffusers); the other fields are grid details ``generate`` reproduces on any grid.
    A model trained by latentdiff has no scheduler config: sampler and schedule None, the rest neutral.
    """

    sampler: str | None = None  # a sampling.SAMPLERS name
    schedule: str | None = None  # a schedules.GRIDS name
    steps_offset: int = 0  # diffusers' steps_offset (added to 'leading' timesteps)
    vp_init: bool = False  # start from noise * sqrt(1 + sigma_max^2) as diffusers' VP schedulers do
    final_sigma: float = 0.0  # DDIM / PLMS end here, not at 0 (set_alpha_to_one=False: sigma of timestep 0)
    note: str = ""  # what of the scheduler config is not reproduced, said in the load report
    flow_shift: float = 1.0  # flow models: the shift of the 'flow' / 'flow_match' grids (SD3: 3.0)

    BOUNDS = bounds({"steps_offset": between(0, 999), "final_sigma": at_least(0), "flow_shift": above(0)})


@dataclass
class GenerationSettings:
    """Sampler, steps, guidance and sigma grid of a generation; None leaves the choice to the next in line.

    In a model index these are the model's recommendations (a distilled student: its few steps and
    guidance 1), which ``generate`` uses where its caller passes nothing.
    """

    sampler: str | None = None  # a sampling.SAMPLERS name or alias
    steps: int | None = None  # sampler steps
    guidance: float | None = None  # classifier-free guidance scale
    schedule: str | None = None  # a schedules.GRIDS name
    guidance_method: str | None = None  # "cfg", "apg" (adaptive projected) or "autoguidance" (needs the folder's guide/)
    pag_scale: float | None = None  # perturbed-attention guidance on top of the method (0: off)

    BOUNDS = bounds({"steps": between(1, MAX_STEPS), "guidance": FINITE, "pag_scale": at_least(0)})


# What Pipeline.generate uses where neither its caller nor the model's index says (schedule None: the sampler's
# own grid, as the model's parameterization takes it: the flow grid for a flow model).
DEFAULT_GENERATION = GenerationSettings(sampler="dpmpp_2m", steps=20, guidance=5.0, schedule=None,
                                        guidance_method="cfg", pag_scale=0.0)
GUIDANCE_METHODS = ("cfg", "apg", "autoguidance")


@dataclass
class GenerateRequest:
    """The other per-call options of a generation a caller (the CLI, a server) may get wrong: ``Pipeline.generate``
    checks them here, types and bounds, before any work (the CLI before it loads the model); what needs the model
    (multiples of the autoencoder's factor, memory) the pipeline checks next."""

    height: int | None = None  # pixels; None: the model's sample size
    width: int | None = None  # pixels; None: the model's sample size
    num_images: int = 1  # images per prompt
    seed: int = 0  # noise seed
    guidance_rescale: float = 0.0  # phi of guidance rescale
    guidance_interval: tuple[float, float] | None = None  # (sigma_lo, sigma_hi); sigma_hi may be inf
    dynamic_threshold: float | None = None  # a percentile such as 0.995
    preview_every: int = 1  # sampler steps between previews
    strength: float | None = None  # editing: the share of the steps run from the noised image (None: 0.8 or 1)
    outpaint: tuple[int, int, int, int] | None = None  # outpainting: pixels added (left, top, right, bottom)
    frames: int | None = None  # a video model's frames per clip (None: its clip length)
    noise_level: int | None = None  # an x4 upscaler's low-res noise level (None: its default; at most its maximum)

    BOUNDS = bounds({"height": COUNT, "width": COUNT, "num_images": COUNT, "seed": between(-2**63, 2**64 - 1),
                     "guidance_rescale": FRACTION, "guidance_interval": Bound(0, finite=False),
                     "dynamic_threshold": between(0, 1, hi_open=True), "preview_every": COUNT,
                     "strength": Bound(0, 1, lo_open=True), "outpaint": at_least(0),
                     "frames": COUNT, "noise_level": at_least(0)})


@dataclass
class SizeConditioning:
    """SDXL-style size and crop ids (conditioning/sizes.py)."""

    embed_dim: int = 0  # sinusoidal features per id; 0: the denoiser takes no size ids

    BOUNDS = bounds({"embed_dim": between(0, 4096)})


@dataclass
class Distilled:
    """A few-step student (``train/distill.py``): how it was distilled and how it must be called."""

    method: str = "lcm"  # "lcm" (latent consistency distillation), "ct" (consistency training), "add" (adversarial),
    # "reflow" (rectified-flow straightening: a plain flow model, no consistency scalings)
    teacher: str = ""  # the teacher's model folder, for the record
    guidance_embed_dim: int = 0  # > 0: Fourier features of the guidance scale w follow cond.vector
    embedded_guidance: float = 1.0  # the w the student is given (its CFG is baked in: generate with guidance 1)
    guidance_range: tuple[float, float] = (1.0, 1.0)  # the w it was distilled for
    steps_range: tuple[int, int] = (1, 8)  # the sampler steps it was distilled for; others work with a warning
    grid_steps: int = 50  # points of the teacher grid it was trained on (the 'lcm' grid's original_steps)

    BOUNDS = bounds({"method": one_of("lcm", "ct", "add", "reflow"), "guidance_embed_dim": between(0, 4096),
                     "embedded_guidance": FINITE, "guidance_range": FINITE, "steps_range": between(1, MAX_STEPS),
                     "grid_steps": between(1, MAX_STEPS)})

    def steps_warning(self, steps: int) -> str | None:
        """What to say when a generation asks for steps outside the distilled range (None inside it)."""
        lo, hi = self.steps_range
        if lo <= steps <= hi:
            return None
        return (f"this {self.method} student was distilled for {lo} to {hi} sampler steps; {steps} steps run, "
                "but expect worse images")


@dataclass
class NoiseAugmentation:
    """A super-resolution model whose low-res input is noised before it is joined to the latent (SD's x4 upscaler;
    noise conditioning augmentation, Ho et al. 2022 "Cascaded Diffusion Models"): the image at timestep ``level`` of
    its own DDPM schedule, sqrt(a) x + sqrt(1 - a) eps, and ``level`` given to the denoiser as its class label."""

    betas: str = "upscaler"  # beta schedule of the low-res noise (diffusers' low_res_scheduler)
    num_timesteps: int = 1000  # its discrete timesteps
    max_level: int = 350  # the highest noise level a generation may ask for (diffusers' max_noise_level)
    default_level: int = 20  # the level when a generation names none (diffusers' default noise_level)

    BOUNDS = bounds({"betas": one_of(*BETA_SCHEDULES), "num_timesteps": at_least(2), "max_level": at_least(0),
                     "default_level": at_least(0)})

    def level(self, asked: int | None) -> int:
        """The noise level of a generation: ``asked``, else the default; an error outside [0, max_level]."""
        level = self.default_level if asked is None else asked
        if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 0 <= level <= self.max_level:
            raise ValueError(f"noise_level must be a whole number in [0, {self.max_level}] (this model's "
                             f"max_noise_level), got {level!r}")
        return int(level)

    def alphas_cumprod(self):
        """The signal fraction of each timestep of the low-res noise's schedule (float64)."""
        return alphas_cumprod(BETA_SCHEDULES[self.betas](self.num_timesteps))


@dataclass
class ModelIndex:
    """``model_index.json`` of a latentdiff model folder."""

    sample_size: int = 64  # default image side in pixels (what the model was trained at)
    components: list[str] = field(default_factory=lambda: list(COMPONENTS))  # subfolders, each config.json + weights
    family: str = "latentdiff"  # "latentdiff" (trained here) or what a converted checkpoint was: "sd1", "sdxl", ...
    class_names: list[str] | None = None  # a class-conditional denoiser's classes (label len(class_names) = null)
    size_conditioning: SizeConditioning = field(default_factory=SizeConditioning)
    scheduler: SamplerHint = field(default_factory=SamplerHint)  # a converted checkpoint's scheduler semantics
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # recommended generation settings
    distilled: Distilled | None = None  # a few-step student's distillation (None: not distilled)
    frames: int | None = None  # a video model's clip length (what `generate --frames` defaults to); None: images
    audio: MelSpec | None = None  # an audio model's mel front end (its images are mel spectrograms: height n_mels,
    # width frames; sample_size is its clip length in frames); None: not audio
    concat: str | None = None  # what the denoiser's concat channels carry: None, "inpaint" (SD inpainting's layout)
    # or "low_res" (super-resolution, LDM's layout)
    upscale: int = 1  # a super-resolution model: output side / low-res input side
    noise_augmentation: NoiseAugmentation | None = None  # its low-res image noised, the level a class label (x4)
    format: str = "latentdiff"  # tells our folders from diffusers' (which have "_class_name")
    version: int = VERSION  # of this layout

    BOUNDS = bounds({"sample_size": COUNT, "frames": COUNT, "concat": one_of(*CONCAT_INPUTS), "upscale": COUNT})

    @classmethod
    def read(cls, folder: str | Path) -> ModelIndex:
        """The index of a model folder, of any version up to ``VERSION``; an error that says what is wrong."""
        folder = Path(folder)
        path = folder / INDEX_FILE
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist; train one with `latentdiff demo` "
                                    "or `latentdiff train`")
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {INDEX_FILE}: it is not a model folder (expected {INDEX_FILE}, "
                                    f"{', '.join(f'{c}/' for c in COMPONENTS)})")
        data = read_json(path, "")
        if data.get("format") != "latentdiff":
            raise ValueError(f"{path} is not a latentdiff model index (format {data.get('format')!r})")
        version = data.get("version", 0)
        if not isinstance(version, int) or not 0 <= version <= VERSION:
            raise ValueError(f"{path} has version {version!r}; this latentdiff reads versions 0 to {VERSION}: "
                             "a newer latentdiff wrote it, upgrade to open it")
        if version == 0:
            data = _from_version_0(data)
        return from_dict(cls, {**data, "version": VERSION}, str(path))  # an older version reads as this one

    def write(self, folder: str | Path) -> None:
        """Write ``folder/model_index.json`` (atomically), always at the current version."""
        write_json(Path(folder) / INDEX_FILE, dataclasses.asdict(dataclasses.replace(self, version=VERSION)))


def _from_version_0(data: dict) -> dict:
    """A version-0 index as version 1: the scheduler hint moves from "sampler" to "scheduler"."""
    data = {**data, "version": 1}
    if "sampler" in data:
        data["scheduler"] = data.pop("sampler")
    return data


def split_input_channels(in_channels: int, out_channels: int, where: str) -> tuple[int, int, str | None]:
    """A U-Net's input channels as (latent channels, concat channels, what the concat carries): text-to-image
    (in = out) as it is; SD inpainting's in = 2 out + 1 (noisy latents, the mask, the masked image's latents) as
    ``(out, out + 1, "inpaint")``; SD's x4 upscaler's in = out + 3 (noisy latents, the low-res RGB image at the
    latent's size) as ``(out, 3, "low_res")``; any other layout (depth) refused by name."""
    if in_channels == out_channels:
        return in_channels, 0, None
    if in_channels == 2 * out_channels + 1:
        return out_channels, out_channels + 1, INPAINT
    if in_channels == out_channels + 3:
        return out_channels, 3, LOW_RES
    raise ValueError(f"{where}: {in_channels} input channels and {out_channels} output channels (a depth U-Net?); "
                     "only text-to-image U-Nets (in = out), inpainting U-Nets (in = 2 out + 1) and x4 upscaler "
                     "U-Nets (in = out + 3) load here")
