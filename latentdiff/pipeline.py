"""Generation on top of the pieces: text encoder -> sampler with CFG -> autoencoder decode; img2img, inpainting and
outpainting start from an encoded image."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from latentdiff.components import ConsistencyScalings, read_model_folder
from latentdiff.conditioning.concat import inpaint_concat, low_res_concat, noise_low_res
from latentdiff.conditioning.guidance_scale import with_guidance_scale
from latentdiff.conditioning.image_encoder import CLIPImageEncoder
from latentdiff.conditioning.labels import null_label, resolve_labels, with_labels
from latentdiff.conditioning.sizes import size_ids, with_sizes
from latentdiff.config import from_dict
from latentdiff.diffusion import guidance as guidance_lib
from latentdiff.diffusion.control import Control, ControlledDenoiser
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.editing import edit_start, keep_known, strength_sigmas
from latentdiff.diffusion.parameterization import Consistency
from latentdiff.diffusion.sampling import FINAL_SIGMA_SAMPLERS, get_sampler, init_x, sample_lcm
from latentdiff.diffusion.schedules import make_sigmas
from latentdiff.edit_inputs import (
    Edit,
    grown_latent_mask,
    latent_mask,
    prepare_edit,
    read_control,
    read_image,
)
from latentdiff.images import to_pil, to_uint8
from latentdiff.model_index import (
    DEFAULT_GENERATION,
    GUIDANCE_METHODS,
    INPAINT,
    LOW_RES,
    Distilled,
    GenerateRequest,
    GenerationSettings,
    ModelIndex,
)
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.controlnet import ControlNet, check_compatible
from latentdiff.models.families import family_of, is_video_network, spatial_factor
from latentdiff.models.ip_adapter import IPAdapter
from latentdiff.models.layers import perturbed_self_attention
from latentdiff.models.lora import LoRASet
from latentdiff.models.runtime import autocast, available_memory, feature_width
from latentdiff.models.tome import check_ratio
from latentdiff.models.unet import StepCache, TokenMerging
from latentdiff.models.vae_inference import AUTO_TILE_LATENTS, decode_latents, encode_image
from latentdiff.types import Cond

OUTPUTS = ("pil", "np", "pt", "latent")
FLOW_GRIDS = ("flow", "flow_match")  # the sigma grids made for flow models (the ones a flow shift applies to)
BATCH_BYTES = 2 * 2**30  # images are generated in batches whose working memory (estimated) stays under this
ACTIVATIONS = 8  # tensors of a network's widest width per position alive at once (a generous, rough count)
LATENT_COPIES = 8  # latent-sized tensors a sampler holds per image (x, noise, estimates, multistep history)


class Pipeline:
    """An autoencoder, a denoiser and a text encoder, and the model index that says how to use them."""

    def __init__(self, autoencoder: AutoencoderKL, denoiser: Denoiser, text_encoder: nn.Module,
                 index: ModelIndex | None = None, *, precision: str = "fp32", name: str = "model",
                 preview_decoder: nn.Module | None = None, guide: Pipeline | None = None):
        self.autoencoder = autoencoder.eval()
        self.denoiser = denoiser.eval()
        self.text_encoder = text_encoder.eval()
        self.index = index if index is not None else ModelIndex()  # sample size, labels, sampler hints, ...
        self.precision = precision  # "fp32", "bf16" or "fp16" autocast for the denoiser (``runtime.autocast``)
        self.name = name  # recorded in the PNG parameters
        self.preview_decoder = preview_decoder  # a tiny decoder for live previews (models/preview.py), if any
        self.guide = guide  # a weaker model of the same data (autoguidance), e.g. an early checkpoint of the run
        self.tile, self.tile_overlap = 64, 8  # latent pixels of a decoding tile and of the overlap of two
        self._widths: tuple[int, int] | None = None  # widest feature widths of denoiser and autoencoder (memory)
        self.loras: list = []  # LoRASets attached by load_lora, in order
        self._before_student: tuple[ModelIndex, Denoiser] | None = None  # index and denoiser before an LCM-LoRA
        self.controlnets: list[Control] = []  # add_controlnet's, in order; generate(control=) gives their images
        self.ip_adapter: IPAdapter | None = None  # load_ip_adapter's; generate(ip_image=) gives its image prompt
        self.image_encoder: nn.Module | None = None  # the IP-Adapter's image encoder (images -> embeddings)
        self.backend = "torch"  # what runs the denoiser network and the autoencoder (``to_backend``)

    def load_lora(self, path: str | Path, weight: float = 1.0, *, name: str | None = None) -> LoRASet:
        """Attach a LoRA file (ours, diffusers / PEFT, older diffusers, kohya) to the denoiser, its text-encoder
        layers to a CLIP text encoder and (ours) its autoencoder layers to the autoencoder, at strength ``weight``;
        several may be attached. Returns it: change its ``weight`` or ``enabled``, ``merge()`` it into the weights,
        ``detach()`` it. A file whose layers or shapes do not fit this model is refused before anything changes.

        An LCM-LoRA distilled here (``latentdiff distill --lora-rank R``) makes this pipeline its student: the
        index's generation settings and ``distilled`` entry are the file's (sampler 'lcm', its steps, guidance 1;
        steps outside its trained range warn), and the denoiser gets its boundary scalings; ``unload_loras`` undoes
        it."""
        from latentdiff.interop.lora import lora_for_model

        lora = lora_for_model(path, self.denoiser.network, self.text_encoder, autoencoder=self.autoencoder,
                              weight=weight, name=name)
        student = self._lora_student(lora.metadata, str(path))
        lora.attach()
        self.loras.append(lora)
        if student is not None:
            self._before_student = (self.index, self.denoiser)
            self.index, self.denoiser = student
        return lora

    def _lora_student(self, meta: dict, source: str) -> tuple[ModelIndex, Denoiser] | None:
        """The index and denoiser an LCM-LoRA's metadata makes of this pipeline (None for other LoRAs), checked."""
        if "distilled" not in meta:
            return None
        param = self.denoiser.parameterization
        if self._before_student is not None or self.index.distilled is not None or isinstance(param, Consistency):
            raise ValueError(f"{source} is an LCM-LoRA, and {self.name!r} is already a few-step student (or has an "
                             "LCM-LoRA loaded): load it onto the model it was distilled from")
        if meta.get("parameterization") != param.name:
            raise ValueError(f"{source} is an LCM-LoRA distilled from a {meta.get('parameterization')}-prediction "
                             f"model ({meta.get('base_model')}); {self.name!r} is {param.name}: load it onto its "
                             "teacher")
        distilled = from_dict(Distilled, meta["distilled"], f"{source}: distilled")
        generation = from_dict(GenerationSettings, meta["generation"], f"{source}: generation")
        scalings = from_dict(ConsistencyScalings, meta["consistency"], f"{source}: consistency")
        index = dataclasses.replace(self.index, generation=generation, distilled=distilled)
        return index, Denoiser(self.denoiser.network, Consistency(param, scalings.sigma_data,
                                                                   scalings.timestep_scaling))

    def unload_loras(self) -> None:
        """Detach every LoRA ``load_lora`` attached (the model's own weights, exactly, again; after an LCM-LoRA
        also its own index and denoiser)."""
        while self.loras:
            self.loras.pop().detach()
        if self._before_student is not None:
            self.index, self.denoiser = self._before_student
            self._before_student = None

    def to_backend(self, backend: str = "openvino", *, precision: str = "auto", int8: bool = False,
                   cache_dir: str | Path | None = None) -> Pipeline:
        """This pipeline with its denoiser network and autoencoder halves run by ``backend``: "openvino" (compiled
        per shape, cached on disk: ``backends/openvino.py``), "openvino-or-torch" (a module OpenVINO cannot convert
        runs in torch), or "torch" (this pipeline). The weights are shared and this pipeline is unchanged; the text
        encoder and the samplers stay in torch. ``precision``: OpenVINO's hint, "auto" (bf16 where the CPU has it,
        else fp32), "fp32" or "bf16"; ``int8``: the denoiser's weights compressed to int8 (weight-only)."""
        from latentdiff.backends import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "torch":
            if int8:
                raise ValueError("int8 weights need the OpenVINO backend: backend='openvino' (--backend openvino)")
            return self
        live = [lora_set.name for lora_set in self.loras if any(not lora.merged for lora in lora_set.loras)]
        if live:  # an attached adapter is not in the network's state_dict, so the compiled-model cache key misses it
            raise ValueError(f"LoRA {live} attached but not merged: merge it first (lora.merge()) so that the "
                             f"converted weights, and the key of the cache of compiled models, include it")
        if self.controlnets:
            raise ValueError("ControlNets run in torch only: the compiled network takes no control residuals "
                             "(use backend='torch')")
        if self.ip_adapter is not None:
            raise ValueError("IP-Adapters run in torch only: the compiled network takes no image-prompt keys and "
                             "values (use backend='torch')")
        from latentdiff.backends.openvino import OpenVINOCoder, OpenVINONetwork, cpu_precision, with_child

        options = {"precision": cpu_precision(precision), "fallback": backend == "openvino-or-torch",
                   "cache_dir": cache_dir}
        denoiser = Denoiser(OpenVINONetwork(self.denoiser.network, int8=int8, **options),
                            self.denoiser.parameterization)
        ae = self.autoencoder
        ae = with_child(ae, "decoder", OpenVINOCoder(ae.decoder, "decoder", **options))
        ae = with_child(ae, "encoder", OpenVINOCoder(ae.encoder, "encoder", **options))
        guide = self.guide.to_backend(backend, precision=precision, int8=int8, cache_dir=cache_dir) \
            if self.guide is not None else None
        out = Pipeline(ae, denoiser, self.text_encoder, self.index, name=self.name,
                       preview_decoder=self.preview_decoder, guide=guide)
        out.backend = f"openvino {options['precision']}" + (" int8" if int8 else "")
        return out

    @property
    def default_size(self) -> int:
        """Pixels, when generate() is given no height/width: the model's training size."""
        return self.index.sample_size

    @property
    def class_names(self) -> list[str] | None:
        """A class-conditional denoiser's classes (None for a text model)."""
        return self.index.class_names

    @property
    def size_embed_dim(self) -> int:
        """> 0: the denoiser takes SDXL-style size ids (conditioning.sizes)."""
        return self.index.size_conditioning.embed_dim

    @property
    def concat_inputs(self) -> str | None:
        """What the denoiser takes in its concat channels: None, or "inpaint" (the mask and the masked image's
        latents, SD inpainting's layout): the index's word, else read from the channel count (latent channels + 1
        concat channels is that layout)."""
        if self.index.concat is not None:
            return self.index.concat
        channels = getattr(getattr(getattr(self.denoiser, "network", None), "config", None), "concat_channels", 0)
        return INPAINT if channels and channels == self.autoencoder.latent_channels + 1 else None

    def blank_canvas(self, height: int | None = None, width: int | None = None) -> dict:
        """``generate`` arguments for text-to-image on an inpainting model: a blank image under an all-white mask
        (what its fully masked training samples were); {} for any other model."""
        if self.concat_inputs != INPAINT:
            return {}
        height, width = self.image_size(height, width)
        return {"image": torch.zeros(1, 3, height, width), "mask": torch.ones(1, 1, height, width)}

    def settings(self, *, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                 schedule: str | None = None, guidance_method: str | None = None,
                 pag_scale: float | None = None) -> GenerationSettings:
        """The sampler, steps, guidance (scale, method, PAG scale) and sigma grid a generation uses: what is asked,
        else what the model recommends (its index), else ``DEFAULT_GENERATION``; the grid named, e.g. the flow
        grid for a flow model. Types and bounds (steps 1..``MAX_STEPS``, a finite guidance) are checked."""
        asked = {"sampler": sampler, "steps": steps, "guidance": guidance, "schedule": schedule,
                 "guidance_method": guidance_method, "pag_scale": pag_scale}
        out = {key: next((v for v in (value, getattr(self.index.generation, key), getattr(DEFAULT_GENERATION, key))
                          if v is not None), None) for key, value in asked.items()}
        out = dataclasses.asdict(from_dict(GenerationSettings, out, "generation settings"))
        if self.index.distilled is not None and self.index.distilled.steps_warning(out["steps"]):
            warnings.warn(self.index.distilled.steps_warning(out["steps"]), stacklevel=1)  # once
        param = self.denoiser.parameterization
        _, sampler_grid = get_sampler(out["sampler"])
        grid = out["schedule"] or param.sampling_grid(sampler_grid)
        out["schedule"] = param.default_grid if grid == "default" else grid
        if out["guidance_method"] not in GUIDANCE_METHODS:
            raise ValueError(f"unknown guidance method {out['guidance_method']!r}: expected one of {GUIDANCE_METHODS}")
        if out["guidance_method"] == "autoguidance" and self.guide is None:
            raise ValueError("autoguidance needs a guide model (a weaker version of this one): a model folder with "
                             "guide/, or Pipeline.guide set to one")
        return GenerationSettings(**out)

    def add_controlnet(self, controlnet, *, scale: float = 1.0, start: float = 0.0, end: float = 1.0) -> ControlNet:
        """Add a ControlNet (Zhang et al. 2023; a folder from ``latentdiff train-controlnet``, a diffusers
        ``ControlNetModel`` folder, an original single file (``control_*.safetensors``), or a ``ControlNet``) that
        every ``generate(control=...)`` call then uses: its residuals times ``scale``, for the steps between ``start``
        and ``end`` (fractions of the run). Several add up. One built for another base model is refused here,
        naming what differs; it is moved to the denoiser's device and dtype."""
        name = str(controlnet) if not isinstance(controlnet, ControlNet) else "the ControlNet"
        if not isinstance(controlnet, ControlNet):
            from latentdiff.interop.controlnet import open_controlnet

            controlnet, report = open_controlnet(controlnet, getattr(getattr(self.denoiser, "network", None),
                                                                     "config", None))
            print(f"{name}: {report}")
        check_compatible(controlnet, getattr(getattr(self.denoiser, "network", None), "config", None), name)
        if controlnet.config.factor != self.autoencoder.factor:
            raise ValueError(f"{name} brings control images down by {controlnet.config.factor}, this model's "
                             f"autoencoder by {self.autoencoder.factor}: it was built for another base model")
        param = next(self.denoiser.parameters())
        controlnet = controlnet.to(param.device, param.dtype).eval()
        self.controlnets.append(Control(controlnet, None, float(scale), float(start), float(end)))
        return controlnet

    def load_ip_adapter(self, adapter, *, image_encoder=None) -> IPAdapter:
        """Load an IP-Adapter (Ye et al. 2023: a file in the tencent-ailab / diffusers layout, plain or "plus", e.g.
        ``ip-adapter_sd15.safetensors`` / ``.bin``, or an ``IPAdapter``) and its ``image_encoder`` (a transformers
        ``CLIPVisionModelWithProjection`` folder, or a module with ``preprocess(image)``, ``embed_dim`` and
        ``forward(pixels) -> (B, E)``; a file from ``train-ip-adapter`` carries its own); then
        ``generate(..., ip_image=IMAGE, ip_scale=S)`` takes an image prompt. One made for another base model, or an
        encoder of another width, is refused here, naming the key and shapes; this pipeline's modules are not
        changed (the adapter's keys and values travel in ``Cond.image_kv``)."""
        from latentdiff.interop.ip_adapter import builtin_image_encoder, ip_adapter_for_unet

        if image_encoder is None and not isinstance(adapter, IPAdapter):
            image_encoder = builtin_image_encoder(adapter)  # train-ip-adapter's files carry theirs
        if image_encoder is None:
            raise ValueError("an IP-Adapter needs the image encoder its embeddings come from: pass image_encoder= a "
                             "CLIPVisionModelWithProjection folder (--image-encoder DIR)")
        network = getattr(self.denoiser, "network", None)
        if isinstance(adapter, IPAdapter):
            adapter.check_unet(network)
        else:
            adapter = ip_adapter_for_unet(adapter, network)
        encoder = image_encoder if isinstance(image_encoder, nn.Module) else CLIPImageEncoder(image_encoder)
        width = getattr(encoder, "hidden_dim", None) if adapter.takes_hidden_states else encoder.embed_dim
        what = "hidden states" if adapter.takes_hidden_states else "embeddings"
        if width != adapter.config.image_embed_dim:
            raise ValueError(f"the image encoder makes {width}-wide {what}, the IP-Adapter takes "
                             f"{adapter.config.image_embed_dim}: use the image encoder it was trained with")
        param = next(self.denoiser.parameters())
        self.ip_adapter, self.image_encoder = adapter.to(param.device, param.dtype).eval(), encoder.eval()
        return self.ip_adapter

    def _with_image_prompt(self, cond: Cond, uncond: Cond, rows: int, ip_image, ip_scale: float) -> tuple[Cond, Cond]:
        """cond and uncond with the IP-Adapter's keys and values of the image prompt; the uncond's are those of a
        zero embedding (as diffusers' CFG does)."""
        if ip_image is None:
            return cond, uncond
        if self.ip_adapter is None:
            raise ValueError("ip_image given but no IP-Adapter loaded: Pipeline.load_ip_adapter(FILE, image_encoder=DIR)"
                             " (--ip-adapter FILE --image-encoder DIR)")
        if not abs(float(ip_scale)) < float("inf"):
            raise ValueError(f"ip_scale must be a finite number, got {ip_scale}")
        images = list(ip_image) if isinstance(ip_image, (list, tuple)) else [ip_image]
        if len(images) not in (1, rows):
            raise ValueError(f"{len(images)} image prompts for {rows} prompts: give one for all, or one per prompt")
        param = next(self.ip_adapter.parameters())
        pixels = torch.cat([self.image_encoder.preprocess(im) for im in images])  # (1 or rows, 3, S, S)
        if self.ip_adapter.takes_hidden_states:  # "plus": the penultimate hidden states; uncond: of a zero image
            embeds, zero = (self.image_encoder(p, hidden_states=True) for p in (pixels, torch.zeros_like(pixels)))
        else:  # the embedding; uncond: a zero embedding (diffusers' encode_image)
            embeds = self.image_encoder(pixels)  # (1 or rows, E)
            zero = torch.zeros_like(embeds)
        embeds, zero = (e.to(param.device, param.dtype).expand(rows, *e.shape[1:]) for e in (embeds, zero))
        return (dataclasses.replace(cond, image_kv=self.ip_adapter(embeds, float(ip_scale))),
                dataclasses.replace(uncond, image_kv=self.ip_adapter(zero, float(ip_scale))))

    def _controlled(self, control, size: tuple[int, int]) -> list[Control]:
        """The added ControlNets with their control images (one per ControlNet, at the output size)."""
        if control is None:
            if self.controlnets:
                raise ValueError(f"{len(self.controlnets)} ControlNet(s) added but no control image given: pass "
                                 "control= one image per ControlNet (--control FILE)")
            return []
        images = list(control) if isinstance(control, (list, tuple)) else [control]
        if len(images) != len(self.controlnets):
            raise ValueError(f"{len(images)} control image(s) for {len(self.controlnets)} ControlNet(s): add one "
                             "ControlNet per control image (Pipeline.add_controlnet, --controlnet DIR)")
        return [dataclasses.replace(c, image=read_control(im, size, c.net.config.conditioning_channels))
                for c, im in zip(self.controlnets, images)]

    def _guided(self, use: GenerationSettings, cond: Cond, uncond: Cond, guide_cond: Cond | None,
                base: Denoiser | None = None, **cfg_options):
        """The guided denoiser of one batch: CFG (with its options), APG or autoguidance, then PAG, around ``base``
        (default: the model's denoiser; a ``ControlledDenoiser`` with ControlNets)."""
        base = self.denoiser if base is None else base
        if use.guidance_method == "apg":
            denoiser = guidance_lib.apg(base, use.guidance, uncond)
        elif use.guidance_method == "autoguidance":
            def guide(x, sigma, cond=None):  # the guide reads the prompts through its own text encoder
                return self.guide.denoiser(x, sigma, guide_cond)

            denoiser = guidance_lib.autoguidance(base, guide, use.guidance)
        else:
            denoiser = guidance_lib.cfg(base, use.guidance, uncond, **cfg_options)
        if use.pag_scale:
            denoiser = guidance_lib.pag(denoiser, use.pag_scale, perturbed_self_attention)
        return denoiser

    def encode_prompts(self, prompts: list[str], negative: list[str],
                       image_size: tuple[int, int] | None = None) -> tuple[Cond, Cond]:
        """Prompts and negative prompts through the text encoder in one call, so both share a length; an encoder
        whose pooled vector announces the image size (SDXL) is told ``image_size`` (height, width), if given."""
        sized = image_size is not None and getattr(self.text_encoder, "takes_image_size", False)
        both = self.text_encoder(prompts + negative, image_size=image_size) if sized else \
            self.text_encoder(prompts + negative)
        n = len(prompts)
        return both.map(lambda t: t[:n]), both.map(lambda t: t[n:])

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) of a request: None is the model's sample size; each a positive multiple of the
        autoencoder's factor, or an error that suggests the nearest."""
        height, width = height or self.default_size, width or self.default_size
        factor, net = self.size_factors()
        if height % factor or width % factor:
            fit = lambda n: max(factor, round(n / factor) * factor)
            raise ValueError(f"height and width ({height}x{width}) must be multiples of the autoencoder's factor "
                             f"{factor}; try {fit(height)}x{fit(width)}")
        if (height // factor) % net or (width // factor) % net:
            step = factor * net
            fit = lambda n: max(step, round(n / step) * step)
            raise ValueError(f"height and width ({height}x{width}) must be multiples of {step} for this model (the "
                             f"autoencoder's factor {factor} x the denoiser's {net}); try {fit(height)}x{fit(width)}")
        return height, width

    def size_factors(self) -> tuple[int, int]:
        """(the autoencoder's factor, the denoiser's: a U-Net's downsampling, a DiT's patch): an image's sides are
        multiples of the first, its latent's of the second."""
        network = getattr(self.denoiser, "network", None)
        network = getattr(network, "wrapped", network)  # a compiled stand-in's torch network
        family = family_of(network) if network is not None else None
        return self.autoencoder.factor, spatial_factor(family, network.config) if family else 1

    def memory_estimate(self, height: int, width: int, tiled: bool | None = None, output: str = "pil"
                        ) -> tuple[int, int]:
        """Rough bytes one image of ``height`` x ``width`` needs: (while it is made, once it is made).

        While: ``LATENT_COPIES`` latents (the sampler's state and history); the denoiser's activations,
        ``ACTIVATIONS`` x its widest feature width (``runtime.feature_width``) x latent positions, twice (guidance
        runs cond and uncond together); the decoder's, ``ACTIVATIONS`` x its widest width x the pixels decoded at
        once (a tile when tiled); the decoded image in float32. Once made: its pixels as uint8 (float32 for
        ``output="pt"``, the latent for ``"latent"``). Deliberately generous: an estimate to refuse the impossible
        with, not a measurement.
        """
        factor, channels = self.autoencoder.factor, self.autoencoder.latent_channels
        latent = channels * (height // factor) * (width // factor) * 4
        if tiled is None:
            tiled = (height // factor) * (width // factor) > AUTO_TILE_LATENTS
        decoded_at_once = min(height * width, (self.tile * factor) ** 2) if tiled else height * width
        if self._widths is None:
            self._widths = feature_width(self.denoiser), feature_width(self.autoencoder)
        denoiser_width, decoder_width = self._widths
        working = (LATENT_COPIES * latent + 2 * ACTIVATIONS * denoiser_width * latent // channels
                   + (ACTIVATIONS * decoder_width * decoded_at_once + 2 * 3 * height * width) * 4)
        held = {"latent": latent, "pt": 3 * height * width * 4}.get(output, 3 * height * width)
        return working, held

    def batch_size(self, n: int, height: int, width: int, tiled: bool | None = None, output: str = "pil",
                   device: torch.device | str = "cpu") -> int:
        """How many of ``n`` images are made at once: as many as ``BATCH_BYTES`` of working memory holds (at least
        one); refuses a request whose working memory and outputs together exceed the memory available, with the
        numbers (``memory_estimate``)."""
        working, held = self.memory_estimate(height, width, tiled, output)
        batch = max(1, min(n, BATCH_BYTES // max(working, 1)))
        need, free = batch * working + n * held, available_memory(device)
        if need > free:
            gib = lambda b: f"{b / 2**30:,.1f} GiB"
            raise MemoryError(f"{n} image(s) of {width}x{height} need about {gib(need)} ({gib(batch * working)} to "
                              f"make {batch} at a time, {gib(n * held)} to hold them), but {gib(free)} is available: "
                              "ask for fewer or smaller images")
        return batch

    @torch.no_grad()
    def generate(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, sampler: str | None = None, schedule: str | None = None,
                 guidance: float | None = None, seed: int = 0, height: int | None = None, width: int | None = None,
                 num_images: int = 1, latents: Tensor | None = None, output: str = "pil",
                 guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] | None = None,
                 dynamic_threshold: float | None = None, callback=None, label: int | str | list | None = None,
                 original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0),
                 tiled: bool | None = None, decode_precision: str = "fp32", preview=None, preview_every: int = 1,
                 guidance_method: str | None = None, pag_scale: float | None = None, image=None,
                 strength: float | None = None, mask=None, outpaint: tuple[int, int, int, int] | None = None,
                 paste_back: bool = True, frames: int | None = None, control=None, low_res=None,
                 cache_interval: int = 1, noise_level: int | None = None, ip_image=None, ip_scale: float = 1.0,
                 tome: float = 0.0, mask_grow: int = 1):
        """Generate ``num_images`` images per prompt; the same arguments give the same images.

        ``sampler``, ``steps``, ``guidance``, ``schedule``: None takes what the model's index recommends, else
        ``DEFAULT_GENERATION`` (dpmpp_2m, 20 steps, guidance 5, the sampler's grid as the model takes it);
        ``settings(...)`` says what a call uses. ``guidance_interval=(sigma_lo, sigma_hi)`` guides only where
        sigma_lo < sigma <= sigma_hi (Kynkaanniemi et al. 2024); ``dynamic_threshold`` is a percentile such as
        0.995 (Saharia et al. 2022). ``guidance_method``: "cfg" (classifier-free), "apg" (adaptive projected
        guidance, Sadat et al. 2024: CFG without its update's part along the conditional prediction) or
        "autoguidance" (Karras et al. 2024: guided by ``self.guide``, a weaker model of the same data, at scale
        ``guidance``); ``pag_scale`` > 0 adds perturbed-attention guidance (Ahn et al. 2024) on top.

        A class-conditional model (``class_names``) needs ``label``: a class name or index, or one per prompt
        (one prompt, e.g. "", is repeated for a list of labels); guidance runs against the null class.
        A size-conditioned model (``size_embed_dim``) is told ``original_size`` (default: the requested size)
        and ``crop_top_left`` (default (0, 0): uncropped).
        Decoding: ``tiled`` True/False, or None to tile latents larger than ``AUTO_TILE_LATENTS`` positions
        (``self.tile`` / ``self.tile_overlap`` latents); ``decode_precision`` "bf16"/"fp16" decodes in low
        precision and again in fp32 if that gives non-finite values. ``preview(step, image)`` is called every
        ``preview_every`` steps with the preview decoder's image of the current estimate (needs a model
        folder with ``preview_decoder/``).

        Editing (``edit_inputs``, ``diffusion/editing.py``), on any model and sampler: ``image`` (a path, PIL
        image, uint8 array or tensor in [-1, 1]) is encoded and every image starts from it, noised to the
        sigma ``strength`` in (0, 1] of the way up the grid (img2img, SDEdit; default 0.8; 1 is text-to-image);
        with ``mask`` (white = repaint, black = keep) the kept latents are held on the image's (inpainting;
        default strength 1) and, with ``paste_back``, its pixels pasted back outside the mask after decoding;
        ``outpaint=(left, top, right, bottom)`` pixels inpaints a border added around the image. Without
        ``height`` / ``width`` the output is the image's size (plus the border).
        Concat-conditioned models (``concat_inputs``, ``conditioning/concat.py``): an inpainting model (SD's
        9-channel layout) is given the mask and the masked image's latents instead of latent blending, and needs
        ``image`` and ``mask`` (``blank_canvas()`` for text-to-image); a super-resolution model needs ``low_res``
        (an image as ``image`` takes) and makes it ``index.upscale`` times larger (SD's x4 upscaler: ``noise_level``).
        Video (``latentdiff train-video`` models): ``frames`` per clip (None: the model's length); a clip is a list of
        frames ("pil"), an array (F, H, W, 3) ("np"), or (B, C, F, ...) ("pt", "latent"). ControlNets
        (``add_controlnet``): ``control`` is one image per added ControlNet (resized to the output, and said).
        U-Net in torch: ``cache_interval=N`` > 1 DeepCache (``unet.StepCache``), ``tome`` in [0, 1) token merging
        (``models/tome.py``). IP-Adapter: ``ip_image`` is the image prompt (or one per prompt), weight ``ip_scale``.

        Options are checked and the memory needed estimated (``batch_size``) before any work; images are made in
        batches of at most ``BATCH_BYTES`` (``callback`` and ``preview`` see one batch at a time). A non-finite
        latent or image is an error naming the likely cause, never a black image.
        """
        prompts, negatives = _prompt_lists(prompt, negative_prompt, label)
        _check_request(output, height=height, width=width, num_images=num_images, seed=seed,
                       guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
                       dynamic_threshold=dynamic_threshold, preview_every=preview_every, strength=strength,
                       outpaint=outpaint, frames=frames, noise_level=noise_level)
        frames = self.clip_length(frames, edited=image is not None or mask is not None or outpaint is not None)
        self.image_size(height, width)  # the sizes asked for are multiples of the factor
        edit = prepare_edit(image, mask=mask, outpaint=outpaint, strength=strength, paste_back=paste_back,
                            height=height, width=width, factor=self.autoencoder.factor, grow=mask_grow)
        height, width = self.image_size(*(edit.size if edit is not None else (height, width)))
        concat_kind = self._check_concat_inputs(edit, low_res, noise_level)
        if concat_kind == LOW_RES:  # the output is the low-res image's size times the model's upscale factor
            low_res, (height, width) = self._low_res_input(low_res, height, width)
        controls = self._controlled(control, (height, width))
        use = self.settings(sampler=sampler, steps=steps, guidance=guidance, schedule=schedule,
                            guidance_method=guidance_method, pag_scale=pag_scale)
        n = len(prompts) * num_images
        factor = self.autoencoder.factor
        shape = (n, self.autoencoder.latent_channels, *([frames] if frames else []), height // factor, width // factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        per = frames or 1  # images per sample: a clip's frames
        batch = max(1, self.batch_size(n * per, height, width, tiled, output,
                                       next(self.denoiser.parameters()).device) // per)
        sample_fn, _ = get_sampler(use.sampler)
        sigmas = self._sigmas(use)
        if edit is not None:
            sigmas = strength_sigmas(sigmas, edit.strength)  # img2img: the grid's last steps (diffusers' t_start)
        base = self._sampled_denoiser(sample_fn, controls, sigmas, tome)
        step_cache = self._step_cache(cache_interval, tome, controls, base)
        cond, uncond, guide_cond = self._conditions(prompts, negatives, label, (height, width), original_size,
                                                    crop_top_left, use, (ip_image, ip_scale))
        # Initial noise on the CPU in float32 (the diffusers convention), for all images at once, then scaled to
        # sigmas[0]; stochastic samplers draw from the same generator, batch after batch.
        generator = torch.Generator("cpu").manual_seed(seed)
        # Concat inputs first: a noise-augmented low-res image draws its noise before the latents (diffusers' order).
        cond, uncond, guide_cond = self._with_concat(concat_kind, (cond, uncond, guide_cond), len(prompts), edit,
                                                     low_res, noise_level, generator, tiled, latents)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        z0, keep = self._encode_edit(edit, tiled, latents.device) if edit is not None else (None, None)
        keep = None if concat_kind == INPAINT else keep  # an inpainting model sees the mask: no latent blending
        if preview is not None:
            callback = self._preview_callback(preview, preview_every, callback)
        hint = self.index.scheduler
        final = {"final_sigma": hint.final_sigma} if hint.final_sigma and sample_fn in FINAL_SIGMA_SAMPLERS else {}
        rows = torch.arange(len(prompts)).repeat_interleave(num_images)  # image -> its prompt
        out = []
        for start in range(0, n, batch):
            pick = (lambda c, r=rows[start:start + batch]: c.map(lambda t: t[r]) if c is not None else None)
            x = self._start(latents[start:start + batch], sigmas, edit, z0, keep)
            denoiser = self._guided(use, pick(cond), pick(uncond), pick(guide_cond), step_cache() or base,
                                    rescale=guidance_rescale, interval=guidance_interval, threshold=dynamic_threshold)
            if keep is not None:  # inpainting: x0_hat is the image's latent outside the mask
                denoiser = keep_known(denoiser, z0, keep, early=grown_latent_mask(keep, edit.grow))
            # bf16 on the CPU: channels-last convolutions for the loop (an NCHW bf16 step is 2-7x slower, BENCHMARKS).
            convs = [self.denoiser, *(c.net for c in controls)] + ([self.preview_decoder] if preview is not None else [])
            with autocast(self.precision, x.device, *convs):
                z = sample_fn(denoiser, x, sigmas, pick(cond), generator=generator, callback=callback, **final)
            if keep is not None:  # exactly the image's latent where nothing is repainted, whatever the rounding
                z = torch.where(keep == 0, z0.to(z.dtype), z)
            out.append(self._decoded(z.float(), use, output, tiled, decode_precision, edit))
        if output in ("latent", "pt"):
            return torch.cat(out)
        return np.concatenate(out) if output == "np" else [im for part in out for im in part]

    def _sampled_denoiser(self, sample_fn, controls: list | None = None, sigmas: Tensor | None = None,
                          tome: float = 0.0) -> Denoiser:
        """The denoiser the sampler calls (before guidance): the model's own, with ControlNets a
        ``ControlledDenoiser``. LCM sampling of a discrete model that is not a consistency model (an SD checkpoint
        with a diffusers LCM-LoRA) gets LCM's boundary scalings (sigma_data 0.5, timestep scaling 10:
        ``parameterization.Consistency``), as diffusers' LCMScheduler applies them: a new Denoiser on the same
        network, the pipeline unchanged. ``tome`` > 0: the network is a ``TokenMerging`` of the U-Net."""
        denoiser, param = self.denoiser, self.denoiser.parameterization
        if check_ratio(tome):
            denoiser = Denoiser(TokenMerging(denoiser.network, tome), param)
        if sample_fn is sample_lcm and not isinstance(param, Consistency) and \
                getattr(param, "alphas_cumprod", None) is not None:
            denoiser = Denoiser(denoiser.network, Consistency(param))
        return ControlledDenoiser(denoiser, controls, sigmas) if controls else denoiser

    def _step_cache(self, interval: int, tome: float, controls: list, denoiser: Denoiser) -> object:
        """A function giving each batch its step-cached denoiser (``interval`` > 1: a fresh ``StepCache`` per batch,
        with token merging ``tome``, the pipeline's modules unchanged), or None (no caching: the batch uses the plain
        or controlled denoiser)."""
        if interval == 1:
            return lambda: None
        if controls:
            raise ValueError("cache_interval > 1 (DeepCache) cannot take ControlNets: its shallow steps skip the "
                             "layers the residuals go to")
        network = self.denoiser.network
        StepCache(network, interval, tome)  # checks the network and the interval before any work
        return lambda: Denoiser(StepCache(network, interval, tome), denoiser.parameterization)

    def clip_length(self, frames: int | None, edited: bool = False) -> int | None:
        """The frames per clip of a request: ``frames``, else a video model's clip length; None for an image model,
        which refuses ``frames`` (its denoiser has no temporal layers)."""
        network = getattr(self.denoiser, "network", None)
        if not is_video_network(network):
            if frames is not None:
                raise ValueError(f"frames={frames} asked, but {self.name!r} is an image model: its denoiser has no "
                                 "temporal layers (make a video model with `latentdiff train-video`)")
            return None
        most = network.config.max_frames
        frames = frames if frames is not None else (self.index.frames or most)
        if not 1 <= frames <= most:
            raise ValueError(f"frames={frames}: this video model makes 1 to {most} frames per clip")
        if edited:
            raise ValueError("a video model takes no image, mask or outpaint (no video editing yet)")
        return frames

    MAX_SECONDS = 600.0  # the longest audio clip a generation may ask for

    def audio_frames(self, seconds: float | None) -> int:
        """The mel frames of an audio request: ``seconds`` (None: the model's clip length) as a whole number of
        frames that the autoencoder and the network can take, or an error that suggests the nearest length."""
        spec = self.index.audio
        if spec is None:
            raise ValueError(f"{self.name!r} is an image model, not an audio model (make one with `latentdiff "
                             "train-audio`): it takes no audio length")
        if seconds is None:
            return self.index.sample_size
        if not 0 < seconds <= self.MAX_SECONDS:
            raise ValueError(f"audio length {seconds} s must be in (0, {self.MAX_SECONDS:g}] seconds")
        frames = spec.frames(seconds)
        network = getattr(self.denoiser, "network", None)
        network = getattr(network, "wrapped", network)
        family = family_of(network) if network is not None else None
        step = self.autoencoder.factor * (spatial_factor(family, network.config) if family else 1)
        if frames < step or frames % step:
            fit = max(step, round(frames / step) * step)
            raise ValueError(f"audio length {seconds} s is {frames} mel frames; this model makes clips of a multiple "
                             f"of {step} frames ({spec.seconds(step):.3f} s): try {spec.seconds(fit):.3f} s")
        return frames

    @torch.no_grad()
    def generate_audio(self, prompt: str | list[str], *, seconds: float | None = None, **options) -> tuple[Tensor, Tensor]:
        """An audio model's clips: (waveforms (B, T) float in [-1, 1], mel spectrograms (B, 1, n_mels, frames)).
        ``seconds``: the clip length (None: the model's); checked before any work. ``options`` are ``generate``'s
        (no ``height``, ``width``, ``output``: the mel's size and the waveform follow from ``seconds``). The mel
        spectrograms are decoded to waveforms by Griffin-Lim (``audio.mel_to_wave``)."""
        from latentdiff.audio import mel_to_wave

        fixed = sorted({"height", "width", "output", "frames"} & set(options))
        if fixed:
            raise ValueError(f"generate_audio sets {', '.join(fixed)} itself: ask for a length with seconds=")
        frames = self.audio_frames(seconds)
        spec = self.index.audio
        mels = self.generate(prompt, height=spec.n_mels, width=frames, output="pt", **options).float().cpu()
        waves = mel_to_wave(mels, spec, seed=options.get("seed", 0))
        _refuse_non_finite(waves, "Griffin-Lim gave non-finite samples from finite mel spectrograms")
        return waves.clamp(-1, 1), mels

    def _sigmas(self, use: GenerationSettings) -> Tensor:
        """The sigma grid of a generation: the settings' grid and steps, with the scheduler hint's offset or shift."""
        hint = self.index.scheduler
        grid_kw = {"steps_offset": hint.steps_offset} if hint.steps_offset and use.schedule == "leading" else {}
        if hint.flow_shift != 1.0 and use.schedule in FLOW_GRIDS:
            grid_kw = {"shift": hint.flow_shift}
        if use.schedule == "lcm" and self.index.distilled is not None:  # the teacher grid the student learned
            grid_kw = {"original_steps": self.index.distilled.grid_steps}
        return make_sigmas(use.schedule, use.steps, self.denoiser.parameterization, **grid_kw)

    def _conditions(self, prompts: list[str], negatives: list[str], label, size: tuple[int, int], original_size,
                    crop_top_left, use: GenerationSettings, image_prompt: tuple = (None, 1.0)
                    ) -> tuple[Cond, Cond, Cond | None]:
        """Conditioning, one row per prompt: prompts and negative prompts, labels, size ids, the image prompt
        (``image_prompt`` = (image, scale), IP-Adapter) and the guide's reading of the prompts. SDXL's size
        conditioning follows the request (passed along: the shared text encoder is not changed)."""
        cond, uncond = self.encode_prompts(prompts, negatives, size)
        cond, uncond = self._with_labels(cond, uncond, label, len(prompts))
        cond, uncond = self._with_image_prompt(cond, uncond, len(prompts), *image_prompt)
        if not self.size_embed_dim and (original_size is not None or tuple(crop_top_left) != (0, 0)):
            raise ValueError("original_size / crop_top_left given, but this model takes no size conditioning")
        if self.size_embed_dim:
            ids = size_ids(len(prompts), *size, original_size, crop_top_left)
            cond, uncond = with_sizes(cond, ids, self.size_embed_dim), with_sizes(uncond, ids, self.size_embed_dim)
        student = self.index.distilled
        if student is not None and student.guidance_embed_dim:  # the scale a guidance-distilled student is given
            w, dim = student.embedded_guidance, student.guidance_embed_dim
            cond, uncond = with_guidance_scale(cond, w, dim), with_guidance_scale(uncond, w, dim)
        guide_cond = self.guide.encode_prompts(prompts, [], size)[0] if use.guidance_method == "autoguidance" else None
        return cond, uncond, guide_cond

    def _encode(self, pixels: Tensor, tiled: bool | None, device: torch.device) -> Tensor:
        """Pixels (1, 3, H, W) in [-1, 1] as normalized latents (1, C, h, w) on ``device``."""
        param = next(self.autoencoder.parameters())
        factor = self.autoencoder.factor
        z = encode_image(self.autoencoder, pixels.to(param.device, param.dtype), tiled=tiled,
                         tile=self.tile * factor, overlap=self.tile_overlap * factor).float().to(device)
        _refuse_non_finite(z, "encoding the image gave non-finite latents: the autoencoder's weights or its latent "
                              "scale are damaged; use another autoencoder")
        return z

    def _encode_edit(self, edit: Edit, tiled: bool | None, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The edit's image as normalized latents (1, C, h, w) on ``device`` and its latent mask (None: img2img)."""
        z0 = self._encode(edit.pixels, tiled, device)
        keep = latent_mask(edit.mask, self.autoencoder.factor).to(device) if edit.mask is not None else None
        return z0, keep

    def _check_concat_inputs(self, edit: Edit | None, low_res, noise_level: int | None) -> str | None:
        """What the denoiser's concat channels carry (``concat_inputs``), after checking that the call gives it:
        an inpainting model needs an image and a mask (as diffusers' inpainting pipeline does), a super-resolution
        model its low-res image and no edit, and ``noise_level`` is for a noise-augmented one only and within its
        range; an error before any work otherwise."""
        kind, noise = self.concat_inputs, self.index.noise_augmentation
        if noise_level is not None and noise is None:
            raise ValueError(f"noise_level given, but {self.name} does not noise its low-res input (SD's x4 upscaler "
                             "does)")
        if noise is not None:
            noise.level(noise_level)
        if low_res is not None and kind != LOW_RES:
            raise ValueError(f"low_res given, but {self.name} is not a super-resolution model (train one with "
                             "`latentdiff train --preset shapes-sr`)")
        if kind == INPAINT and (edit is None or edit.mask is None):
            raise ValueError(f"{self.name} is an inpainting model (its denoiser takes the mask and the masked "
                             "image's latents): pass image= and mask= (--image FILE --mask FILE) or outpaint=; an "
                             "all-white mask repaints everything (text-to-image)")
        if kind == LOW_RES and (low_res is None or edit is not None):
            raise ValueError(f"{self.name} is a super-resolution model: pass low_res= the image to upscale "
                             "(`latentdiff upscale IN.png`, or generate --upscale FILE), and no image / mask")
        return kind

    def _low_res_input(self, low_res, height: int | None, width: int | None) -> tuple[Tensor, tuple[int, int]]:
        """A super-resolution model's input (1, 3, h, w) in [-1, 1] and the output size: (h, w) x the upscale; an
        image whose output would not fit the autoencoder and the denoiser is refused, with the size that would."""
        image = read_image(low_res)
        factor, net = self.size_factors()
        step, (h, w) = factor * net // self.index.upscale, image.shape[-2:]
        if h % step or w % step:
            fit = lambda n: max(step, round(n / step) * step)
            raise ValueError(f"a {w}x{h} low-res image does not fit this model: its sides must be multiples of {step} "
                             f"(so that the output, {self.index.upscale} times larger, is a multiple of the "
                             f"autoencoder's factor {factor} x the denoiser's {net}); crop or resize it to "
                             f"{fit(w)}x{fit(h)}")
        size = (h * self.index.upscale, w * self.index.upscale)
        if (height, width) != size and (height, width) != (self.default_size, self.default_size):
            raise ValueError(f"this model upscales by {self.index.upscale}: a {image.shape[-1]}x{image.shape[-2]} "
                             f"image gives {size[1]}x{size[0]}, not the {width}x{height} asked for")
        return image, self.image_size(*size)

    def _with_concat(self, kind: str | None, conds: tuple, n: int, edit: Edit | None, low_res: Tensor | None,
                     noise_level: int | None, generator: torch.Generator, tiled: bool | None,
                     latents: Tensor | None) -> tuple:
        """The conditions with a concat model's inputs, one row per prompt: an inpainting model's mask and masked
        latents; a super-resolution model's low-res image at the latent's size, for a noise-augmented one (SD's x4
        upscaler) noised to ``noise_level`` (noise from ``generator``) and that level as its class label."""
        if kind is None:
            return conds
        device = latents.device if latents is not None else torch.device("cpu")
        extra = {}
        if kind == INPAINT:
            concat = self._inpaint_inputs(edit, tiled, device)
        else:
            noise = self.index.noise_augmentation
            if noise is not None:
                level = noise.level(noise_level)
                eps = torch.randn(low_res.shape, generator=generator, dtype=torch.float32)
                low_res = noise_low_res(low_res.float(), eps, float(noise.alphas_cumprod()[level]))
                extra["vector"] = torch.full((n,), level, dtype=torch.long, device=device)
            concat = low_res_concat(low_res.to(device), self.autoencoder.factor // self.index.upscale)
        extra["concat"] = concat.expand(n, -1, -1, -1)
        return tuple(c if c is None else dataclasses.replace(c, **extra) for c in conds)

    def _inpaint_inputs(self, edit: Edit, tiled: bool | None, device: torch.device) -> Tensor:
        """An inpainting denoiser's concat channels (1, 1 + C, h, w), SD inpainting's layout: the pixel mask at
        latent size (nearest, as diffusers), then the latents of the image with the repainted pixels zeroed
        (``image * (mask < 0.5)``, in [-1, 1])."""
        masked = self._encode(edit.pixels * (edit.mask < 0.5), tiled, device)
        return inpaint_concat(edit.mask.to(device), masked)

    def _start(self, noise: Tensor, sigmas: Tensor, edit: Edit | None, z0: Tensor | None,
               keep: Tensor | None) -> Tensor:
        """The sampler's first x: the noise at sigmas[0] (diffusers' VP start where the index asks for it), or an
        edit's image noised to sigmas[0] (``editing.edit_start``)."""
        x = init_x(noise, sigmas)
        if self.index.scheduler.vp_init and not torch.isinf(sigmas[0]):
            x = noise * (1 + sigmas[0].item() ** 2) ** 0.5
        if edit is None:
            return x
        return edit_start(x, noise, float(sigmas[0]), z0, keep, edit.strength)

    def _decoded(self, z: Tensor, use: GenerationSettings, output: str, tiled: bool | None, precision: str,
                 edit: Edit | None = None):
        """One batch's latents as ``output`` asks, refusing non-finite latents and images with their likely cause;
        an inpainting edit's pixels pasted back outside its mask."""
        _refuse_non_finite(z, f"sampling gave non-finite latents (guidance {use.guidance:g} with {use.guidance_method}, "
                              f"{use.sampler}, {use.steps} steps, precision {self.precision}): the denoiser's weights "
                              "may be damaged, or the guidance too strong for this model; try a smaller guidance "
                              "scale or precision fp32")
        if output == "latent":
            return z
        if z.ndim == 5:  # clips (B, C, F, h, w): every frame decoded as an image, then grouped back
            B, _, frames = z.shape[:3]
            images = self._decoded(z.transpose(1, 2).flatten(0, 1), use, output, tiled, precision)
            if output == "pil":
                return [images[i * frames:(i + 1) * frames] for i in range(B)]
            images = images.reshape(B, frames, *images.shape[1:])  # (B, F, ...)
            return images.transpose(1, 2) if output == "pt" else images  # pt: (B, 3, F, H, W); np: (B, F, H, W, 3)
        images = decode_latents(self.autoencoder, z, tiled=tiled, precision=precision, tile=self.tile,
                                overlap=self.tile_overlap)
        config = self.autoencoder.config
        _refuse_non_finite(images, f"decoding gave non-finite pixels from finite latents: the autoencoder's weights "
                                   f"or its latent scale (scale_factor {config.scale_factor:g}, shift_factor "
                                   f"{config.shift_factor:g}) are damaged; measure the scale again with "
                                   "`latentdiff latent-stats`, or use another autoencoder")
        if edit is not None:
            images = edit.paste(images)
        if output == "pt":
            return images
        return to_uint8(images) if output == "np" else to_pil(images)

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


def _check_request(output: str, **values) -> None:
    """``generate``'s plain arguments against ``GenerateRequest``'s bounds, and the output kind."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    from_dict(GenerateRequest, values, "generate")


def _prompt_lists(prompt: str | list[str], negative_prompt: str | list[str] | None, label) -> tuple[list, list]:
    """The prompts (one repeated for a list of labels) and one negative prompt per prompt."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if isinstance(label, (list, tuple)) and len(prompts) == 1:
        prompts = prompts * len(label)
    if not prompts:
        raise ValueError("no prompt given: pass a prompt string or a non-empty list of prompts")
    negative = negative_prompt if negative_prompt is not None else ""
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one per prompt")
    return prompts, negatives


def _refuse_non_finite(t: Tensor, message: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise RuntimeError(f"{message} ({bad} of {t.numel()} values are NaN or inf)")


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
    preview = guide = None
    if folder.is_file() or weights_file or (folder / "model_index.json").is_file() and _is_diffusers(folder):
        from latentdiff.interop import open_model

        model = open_model(folder, **interop_kw)
        print(model.summary())
        name = folder.stem
    else:
        if interop_kw:
            raise TypeError(f"unexpected arguments {sorted(interop_kw)} for a latentdiff model folder")
        model, name = read_model_folder(folder, verbose), folder.name
        if (folder / "preview_decoder").is_dir():  # optional: `distill-preview --out MODEL/preview_decoder`
            from latentdiff.models.preview import load_preview_decoder

            preview = load_preview_decoder(folder / "preview_decoder")
        if (folder / "guide").is_dir():  # optional: a weaker model of the same data, for autoguidance
            guide = load(folder / "guide", precision=precision, verbose=verbose)
    return Pipeline(model.autoencoder, model.denoiser, model.text_encoder, model.index, precision=precision,
                    name=name, preview_decoder=preview, guide=guide)


def _is_diffusers(folder: Path) -> bool:
    from latentdiff.interop import is_diffusers_folder

    return is_diffusers_folder(folder)


def clip_paths(path: str | Path, count: int) -> tuple[list[Path], Path]:
    """Where :func:`save_clips` writes ``count`` clips for OUT = ``path``, and its frame grid: OUT's suffix picks
    the clip format (.gif, .webp, .mp4); OUT with .png or no suffix gets GIFs. Clips are OUT with that suffix
    (``stem_000``, ``stem_001``, ... when several), the grid OUT with .png. Any other suffix is refused."""
    from latentdiff.images import ANIMATION_SUFFIXES

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*ANIMATION_SUFFIXES, ".png", ""):
        raise ValueError(f"a video model's output {path} must end in {', '.join(ANIMATION_SUFFIXES)} (the clips; "
                         "the frame grid goes beside it as .png) or .png (GIF clips)")
    clip = path.suffix if suffix in ANIMATION_SUFFIXES else ".gif"
    clips = [path.with_suffix(clip)] if count == 1 else \
        [path.with_name(f"{path.stem}_{i:03d}{clip}") for i in range(count)]
    return clips, path.with_suffix(".png")


def save_clips(clips: list[list[Image.Image]], path: str | Path, parameters: dict,
               per_clip: list[dict] | None = None, fps: float = 8.0) -> list[Path]:
    """Write clips as animations at ``fps`` in the format OUT = ``path`` names (see :func:`clip_paths`: .gif,
    .webp, .mp4; .png or none: GIF) and one PNG grid of their frames, a row per clip, carrying ``parameters``
    (and each key of ``per_clip`` once, or the list of its values)."""
    from latentdiff.images import save_animation

    files, grid_path = clip_paths(path, len(clips))
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    written = [save_animation(clip, file, fps) for clip, file in zip(clips, files)]
    frames = [f for clip in clips for f in clip]
    grid = save_images(frames, grid_path, {**parameters, "frames": len(clips[0]), "fps": fps}, grid=True,
                       per_image=[d for d in per_clip for _ in clips[0]] if per_clip else None, ncols=len(clips[0]))
    return written + grid


def save_audio(waves: Tensor, mels: Tensor, sample_rate: int, path: str | Path, parameters: dict,
               per_clip: list[dict] | None = None) -> list[Path]:
    """Write an audio model's clips as 16-bit WAV files (``path`` with .wav; numbered when several) and their mel
    spectrograms (low frequencies at the bottom) as one PNG grid at ``path`` with .png, all carrying ``parameters``
    (each WAV its own ``per_clip`` entry, and its ``index`` when several; the grid as :func:`save_images`)."""
    from latentdiff.audio import write_wav

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parameters = {**parameters, "sample_rate": sample_rate}
    own = per_clip if per_clip is not None else [{} for _ in waves]
    if len(waves) == 1:
        written = [write_wav(path.with_suffix(".wav"), waves[0], sample_rate, {**parameters, **own[0]})]
    else:
        written = [write_wav(path.with_name(f"{path.stem}_{i:03d}.wav"), w, sample_rate,
                             {**parameters, **own[i], "index": i}) for i, w in enumerate(waves)]
    grid = save_images(to_pil(mels.flip(-2)), path.with_suffix(".png"), parameters, grid=True, per_image=per_clip)
    return written + grid


def save_images(images: list[Image.Image], path: str | Path, parameters: dict, grid: bool = False,
                per_image: list[dict] | None = None, ncols: int | None = None) -> list[Path]:
    """Write images as PNGs carrying ``parameters``: one file, numbered files, or one grid.

    ``per_image`` (one dict per image, e.g. its prompt) goes into that image's PNG; a grid carries each key
    once when all its images agree, else the list of their values in grid order.
    """
    from latentdiff.images import make_grid, save_png

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    own = per_image if per_image is not None else [{} for _ in images]
    if len(own) != len(images):
        raise ValueError(f"{len(own)} per-image parameter sets for {len(images)} images")
    if grid or len(images) == 1:
        shared = {k: [d[k] for d in own] for k in own[0]}
        shared = {k: v[0] if all(x == v[0] for x in v) else v for k, v in shared.items()}
        image = make_grid(images, ncols) if len(images) > 1 else images[0]
        return [save_png(image, path, {**parameters, **shared})]
    return [save_png(im, path.with_name(f"{path.stem}_{i:03d}{path.suffix}"), {**parameters, **own[i], "index": i})
            for i, im in enumerate(images)]
