"""Text-to-image generation on top of the pieces: text encoder -> sampler with CFG -> autoencoder decode."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from latentdiff.components import load_autoencoder, load_denoiser, load_text_encoder
from latentdiff.diffusion import guidance as guidance_lib
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.sampling import FINAL_SIGMA_SAMPLERS, get_sampler, init_x
from latentdiff.diffusion.schedules import make_sigmas
from latentdiff.images import to_pil, to_uint8
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.train.common import autocast
from latentdiff.types import Cond

OUTPUTS = ("pil", "np", "pt", "latent")


class Pipeline:
    """An autoencoder, a denoiser and a text encoder, ready to generate."""

    def __init__(self, autoencoder: AutoencoderKL, denoiser: Denoiser, text_encoder: nn.Module,
                 precision: str = "fp32", name: str = "model", default_size: int = 64, steps_offset: int = 0,
                 vp_init: bool = False, final_sigma: float = 0.0, flow_shift: float = 1.0):
        self.autoencoder = autoencoder.eval()
        self.denoiser = denoiser.eval()
        self.text_encoder = text_encoder.eval()
        self.precision = precision  # "fp32" or "bf16" autocast for the denoiser
        self.name = name  # recorded in the PNG parameters
        self.default_size = default_size  # pixels, when generate() is given no height/width
        self.steps_offset = steps_offset  # added to 'leading' timesteps (a diffusers scheduler's steps_offset)
        # Start from noise * sqrt(1 + sigma_max^2), the VP prior's marginal, instead of noise * sigma_max:
        # what diffusers' DDIM / PNDM / DPM-Solver (and its Euler with 'leading' spacing) start from.
        self.vp_init = vp_init
        # DDIM / PLMS stop at this sigma instead of 0 (diffusers' set_alpha_to_one=False); 0: they go to 0.
        self.final_sigma = final_sigma
        self.flow_shift = flow_shift  # shift of the 'flow' / 'flow_match' grids (SD3: 3.0)

    def encode_prompts(self, prompts: list[str], negative: list[str]) -> tuple[Cond, Cond]:
        """Prompts and negative prompts through the text encoder in one call, so both share a length."""
        both = self.text_encoder(prompts + negative)
        n = len(prompts)
        return both.map(lambda t: t[:n]), both.map(lambda t: t[n:])

    @torch.no_grad()
    def generate(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None, steps: int = 20,
                 sampler: str = "dpmpp_2m", schedule: str | None = "karras", guidance: float = 5.0, seed: int = 0,
                 height: int | None = None, width: int | None = None, num_images: int = 1,
                 latents: Tensor | None = None, output: str = "pil", guidance_rescale: float = 0.0,
                 callback=None):
        """Generate ``num_images`` images per prompt; the same arguments give the same images."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given: pass a prompt string or a non-empty list of prompts")
        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        height = height or self.default_size
        width = width or self.default_size
        factor = self.autoencoder.factor
        if height % factor or width % factor:
            raise ValueError(f"height and width ({height}x{width}) must be multiples of the autoencoder's factor "
                             f"{factor}; try {height // factor * factor}x{width // factor * factor}")
        sample_fn, default_grid = get_sampler(sampler)
        grid = schedule or default_grid
        grid_kw = {"steps_offset": self.steps_offset} if self.steps_offset and grid == "leading" else {}
        if self.flow_shift != 1.0 and grid in ("flow", "flow_match"):
            grid_kw = {"shift": self.flow_shift}
        sigmas = make_sigmas(grid, steps, self.denoiser.parameterization, **grid_kw)

        # Conditioning: prompts and negative prompts, each repeated num_images times.
        if hasattr(self.text_encoder, "set_image_size"):  # SDXL's size conditioning follows the request
            self.text_encoder.set_image_size(height, width)
        cond, uncond = self.encode_prompts(prompts, negatives)
        cond, uncond = cond.repeat(num_images), uncond.repeat(num_images)
        shape = (len(prompts) * num_images, self.autoencoder.latent_channels, height // factor, width // factor)

        # Initial noise on the CPU in float32 (the diffusers convention), then scaled to sigmas[0].
        generator = torch.Generator("cpu").manual_seed(seed)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        x = init_x(latents, sigmas)
        if self.vp_init and not torch.isinf(sigmas[0]):
            x = latents * (1 + sigmas[0].item() ** 2) ** 0.5

        denoiser = guidance_lib.cfg(self.denoiser, guidance, uncond, rescale=guidance_rescale)
        final = {"final_sigma": self.final_sigma} if self.final_sigma and sample_fn in FINAL_SIGMA_SAMPLERS else {}
        with autocast(self.precision, x.device):
            z = sample_fn(denoiser, x, sigmas, cond, generator=generator, callback=callback, **final)
        if output == "latent":
            return z.float()
        images = self.autoencoder.decode(z.float()).float()
        if output == "pt":
            return images
        if output == "np":
            return to_uint8(images)
        return to_pil(images)


def load(path: str | Path, *, precision: str = "fp32", verbose: bool = False, **interop_kw) -> Pipeline:
    """Open a latentdiff model folder (``model_index.json`` with autoencoder/, denoiser/, text_encoder/),
    a diffusers Stable Diffusion (XL, 3) folder, or a single-file SD / SDXL / SD3 checkpoint (``.safetensors``,
    ``.ckpt``).

    For the last two, ``interop_kw`` go to ``latentdiff.interop.open_model`` (e.g. ``tokenizer=FOLDER`` for
    single files, ``prediction="eps"`` for SD 2.x -base files); what was detected and loaded is printed.
    """
    folder = Path(path)
    weights_file = folder.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
    if folder.is_file() or weights_file or (folder / "model_index.json").is_file() and _is_diffusers(folder):
        from latentdiff.interop import open_model, to_pipeline

        model = open_model(folder, **interop_kw)
        print(model.summary())
        return to_pipeline(model, precision=precision, name=folder.stem)
    if interop_kw:
        raise TypeError(f"unexpected arguments {sorted(interop_kw)} for a latentdiff model folder")
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist; train one with `latentdiff demo` "
                                "or `latentdiff train`")
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json: it is not a model folder "
                                "(expected model_index.json, autoencoder/, denoiser/, text_encoder/)")
    try:
        info = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is corrupt ({e})") from e
    if info.get("format") != "latentdiff":
        raise ValueError(f"{index} is not a latentdiff model index (format {info.get('format')!r})")
    autoencoder = load_autoencoder(folder / "autoencoder", verbose)
    denoiser, _ = load_denoiser(folder / "denoiser", verbose)
    text_encoder = load_text_encoder(folder / "text_encoder", verbose)
    return Pipeline(autoencoder, denoiser, text_encoder, precision=precision, name=folder.name,
                    default_size=info.get("sample_size", 64),
                    steps_offset=info.get("sampler", {}).get("steps_offset", 0),
                    vp_init=info.get("sampler", {}).get("vp_init", False),
                    final_sigma=info.get("sampler", {}).get("final_sigma", 0.0),
                    flow_shift=info.get("sampler", {}).get("flow_shift", 1.0))


def _is_diffusers(folder: Path) -> bool:
    from latentdiff.interop import is_diffusers_folder

    return is_diffusers_folder(folder)


def save_images(images: list[Image.Image], path: str | Path, parameters: dict, grid: bool = False) -> list[Path]:
    """Write images as PNGs carrying ``parameters``: one file, numbered files, or one grid."""
    from latentdiff.images import make_grid, save_png

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if grid or len(images) == 1:
        image = make_grid(images) if len(images) > 1 else images[0]
        return [save_png(image, path, parameters)]
    return [save_png(im, path.with_name(f"{path.stem}_{i:03d}{path.suffix}"), {**parameters, "index": i})
            for i, im in enumerate(images)]
