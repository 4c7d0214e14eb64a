"""Text-to-image generation on top of the pieces: text encoder -> sampler with CFG -> autoencoder decode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor, nn

from latentdiff.components import load_autoencoder, load_denoiser, load_text_encoder
from latentdiff.conditioning.labels import null_label, resolve_labels, with_labels
from latentdiff.conditioning.sizes import size_ids, with_sizes
from latentdiff.diffusion import guidance as guidance_lib
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.sampling import FINAL_SIGMA_SAMPLERS, get_sampler, init_x
from latentdiff.diffusion.schedules import make_sigmas
from latentdiff.images import to_pil, to_uint8
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.runtime import autocast
from latentdiff.models.vae_inference import decode_latents
from latentdiff.types import Cond

if TYPE_CHECKING:
    from latentdiff.interop.common import SDModel

OUTPUTS = ("pil", "np", "pt", "latent")
FLOW_GRIDS = ("flow", "flow_match")  # the sigma grids made for flow models (the ones a flow shift applies to)


class Pipeline:
    """An autoencoder, a denoiser and a text encoder, ready to generate."""

    def __init__(self, autoencoder: AutoencoderKL, denoiser: Denoiser, text_encoder: nn.Module,
                 precision: str = "fp32", name: str = "model", default_size: int = 64, steps_offset: int = 0,
                 vp_init: bool = False, class_names: list[str] | None = None, size_embed_dim: int = 0,
                 preview_decoder: nn.Module | None = None, final_sigma: float = 0.0, flow_shift: float = 1.0):
        self.autoencoder = autoencoder.eval()
        self.denoiser = denoiser.eval()
        self.text_encoder = text_encoder.eval()
        self.precision = precision  # "fp32", "bf16" or "fp16" autocast for the denoiser (``runtime.autocast``)
        self.name = name  # recorded in the PNG parameters
        self.default_size = default_size  # pixels, when generate() is given no height/width
        self.steps_offset = steps_offset  # added to 'leading' timesteps (a diffusers scheduler's steps_offset)
        # Start from noise * sqrt(1 + sigma_max^2), the VP prior's marginal, instead of noise * sigma_max:
        # what diffusers' DDIM / PNDM / DPM-Solver (and its Euler with 'leading' spacing) start from.
        self.vp_init = vp_init
        self.class_names = list(class_names) if class_names else None  # a class-conditional denoiser's classes
        self.size_embed_dim = size_embed_dim  # > 0: the denoiser takes SDXL-style size ids (conditioning.sizes)
        self.preview_decoder = preview_decoder  # a tiny decoder for live previews (models/preview.py), if any
        self.tile, self.tile_overlap = 64, 8  # latent pixels of a decoding tile and of the overlap of two
        # DDIM / PLMS stop at this sigma instead of 0 (diffusers' set_alpha_to_one=False); 0: they go to 0.
        self.final_sigma = final_sigma
        self.flow_shift = flow_shift  # shift of the 'flow' / 'flow_match' grids (SD3: 3.0)

    def encode_prompts(self, prompts: list[str], negative: list[str],
                       image_size: tuple[int, int] | None = None) -> tuple[Cond, Cond]:
        """Prompts and negative prompts through the text encoder in one call, so both share a length; an encoder
        whose pooled vector announces the image size (SDXL) is told ``image_size`` (height, width), if given."""
        sized = image_size is not None and getattr(self.text_encoder, "takes_image_size", False)
        both = self.text_encoder(prompts + negative, image_size=image_size) if sized else \
            self.text_encoder(prompts + negative)
        n = len(prompts)
        return both.map(lambda t: t[:n]), both.map(lambda t: t[n:])

    @torch.no_grad()
    def generate(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None, steps: int = 20,
                 sampler: str = "dpmpp_2m", schedule: str | None = "karras", guidance: float = 5.0, seed: int = 0,
                 height: int | None = None, width: int | None = None, num_images: int = 1,
                 latents: Tensor | None = None, output: str = "pil", guidance_rescale: float = 0.0,
                 callback=None, label: int | str | list | None = None,
                 original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
                 tiled: bool | None = None, decode_precision: str = "fp32", preview=None, preview_every: int = 1):
        """Generate ``num_images`` images per prompt; the same arguments give the same images.

        A class-conditional model (``class_names``) needs ``label``: a class name or index, or one per prompt
        (one prompt, e.g. "", is repeated for a list of labels); guidance runs against the null class.
        A size-conditioned model (``size_embed_dim``) is told ``original_size`` (default: the requested size)
        and ``crop_top_left`` (default (0, 0): uncropped).
        Decoding: ``tiled`` True/False, or None to tile latents larger than ``AUTO_TILE_LATENTS`` positions
        (``self.tile`` / ``self.tile_overlap`` latents); ``decode_precision`` "bf16"/"fp16" decodes in low
        precision and again in fp32 if that gives non-finite values. ``preview(step, image)`` is called every
        ``preview_every`` steps with the preview decoder's image of the current estimate (needs a model
        folder with ``preview_decoder/``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if isinstance(label, (list, tuple)) and len(prompts) == 1:
            prompts = prompts * len(label)
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
        if schedule is None and self.denoiser.parameterization.name == "flow" and grid not in (*FLOW_GRIDS, "default"):
            grid = "flow"  # unasked, a flow model samples on its own grid: a Karras ramp in t draws worse scenes
        grid_kw = {"steps_offset": self.steps_offset} if self.steps_offset and grid == "leading" else {}
        if self.flow_shift != 1.0 and grid in FLOW_GRIDS:
            grid_kw = {"shift": self.flow_shift}
        sigmas = make_sigmas(grid, steps, self.denoiser.parameterization, **grid_kw)

        # Conditioning: prompts and negative prompts, each repeated num_images times.
        # SDXL's size conditioning follows the request (passed along: the shared text encoder is not changed).
        cond, uncond = self.encode_prompts(prompts, negatives, (height, width))
        cond, uncond = self._with_labels(cond, uncond, label, len(prompts))
        if not self.size_embed_dim and (original_size is not None or tuple(crop_top_left) != (0, 0)):
            raise ValueError("original_size / crop_top_left given, but this model takes no size conditioning")
        if self.size_embed_dim:
            ids = size_ids(len(prompts), height, width, original_size, crop_top_left)
            cond, uncond = with_sizes(cond, ids, self.size_embed_dim), with_sizes(uncond, ids, self.size_embed_dim)
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
        if preview is not None:
            callback = self._preview_callback(preview, preview_every, callback)
        final = {"final_sigma": self.final_sigma} if self.final_sigma and sample_fn in FINAL_SIGMA_SAMPLERS else {}
        # bf16 on the CPU: channels-last convolutions for the loop (an NCHW bf16 step is 2-7x slower, BENCHMARKS).
        convs = [self.denoiser] + ([self.preview_decoder] if preview is not None else [])
        with autocast(self.precision, x.device, *convs):
            z = sample_fn(denoiser, x, sigmas, cond, generator=generator, callback=callback, **final)
        if output == "latent":
            return z.float()
        images = decode_latents(self.autoencoder, z.float(), tiled=tiled, precision=decode_precision,
                                tile=self.tile, overlap=self.tile_overlap)
        if output == "pt":
            return images
        if output == "np":
            return to_uint8(images)
        return to_pil(images)

    def _preview_callback(self, preview, every: int, callback):
        if self.preview_decoder is None:
            raise ValueError(f"{self.name} has no preview decoder: distill one with `latentdiff distill-preview "
                             "--autoencoder MODEL/autoencoder --out MODEL/preview_decoder`")
        from latentdiff.models.preview import preview_callback

        return preview_callback(self.preview_decoder, preview, every, callback)


    def _with_labels(self, cond: Cond, uncond: Cond, label, n: int) -> tuple[Cond, Cond]:
        """The class labels in ``cond`` and the null class in ``uncond`` (class-conditional models only)."""
        if self.class_names is None:
            if label is not None:
                raise ValueError(f"label={label!r} given, but this model is not class-conditional "
                                 "(it was not trained on class folders or labelled tar shards)")
            return cond, uncond
        if label is None:
            shown = ", ".join(self.class_names[:20]) + (" ..." if len(self.class_names) > 20 else "")
            raise ValueError(f"this model is class-conditional: pass label= a class name or index ({shown})")
        labels = resolve_labels(label, self.class_names, n)
        null = torch.full_like(labels, null_label(self.class_names))
        return with_labels(cond, labels), with_labels(uncond, null)


def load(path: str | Path | None = None, *, precision: str = "fp32", verbose: bool = False,
         **interop_kw) -> Pipeline:
    """Open a latentdiff model folder (``model_index.json`` with autoencoder/, denoiser/, text_encoder/),
    a diffusers Stable Diffusion (XL, 3) folder, or a single-file SD / SDXL / SD3 checkpoint (``.safetensors``,
    ``.ckpt``); no path or ``"default"``: the bundled default model (checked against its manifest first).

    For the last two, ``interop_kw`` go to ``latentdiff.interop.open_model`` (e.g. ``tokenizer=FOLDER`` for
    single files, ``prediction="eps"`` for SD 2.x -base files); what was detected and loaded is printed.
    """
    if path is None or str(path) == "default":
        from latentdiff.default import verify

        path = verify()
    folder = Path(path)
    weights_file = folder.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
    if folder.is_file() or weights_file or (folder / "model_index.json").is_file() and _is_diffusers(folder):
        from latentdiff.interop import open_model

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
    preview = None
    if (folder / "preview_decoder").is_dir():  # optional: written by `distill-preview --out MODEL/preview_decoder`
        from latentdiff.models.preview import load_preview_decoder

        preview = load_preview_decoder(folder / "preview_decoder")
    return Pipeline(autoencoder, denoiser, text_encoder, precision=precision, name=folder.name,
                    default_size=info.get("sample_size", 64),
                    steps_offset=info.get("sampler", {}).get("steps_offset", 0),
                    vp_init=info.get("sampler", {}).get("vp_init", False), class_names=info.get("class_names"),
                    size_embed_dim=info.get("size_conditioning", {}).get("embed_dim", 0), preview_decoder=preview,
                    final_sigma=info.get("sampler", {}).get("final_sigma", 0.0),
                    flow_shift=info.get("sampler", {}).get("flow_shift", 1.0))


def to_pipeline(model: SDModel, precision: str = "fp32", name: str = "model") -> Pipeline:
    """A Pipeline over an ``SDModel`` that ``latentdiff.interop`` read (a diffusers folder, a single file)."""
    return Pipeline(model.autoencoder, model.denoiser, model.text_encoder, precision=precision, name=name,
                    default_size=model.sample_size, steps_offset=model.hint.steps_offset,
                    vp_init=model.hint.vp_init, final_sigma=model.hint.final_sigma,
                    flow_shift=model.hint.flow_shift)


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
