"""``latentdiff convert``: any model we can read -> our folder or a diffusers folder.

Sources: our model folder, a diffusers SD / SDXL folder, a single-file original checkpoint. Targets:
``latentdiff`` (our folder: components with config.json + model.safetensors) or ``diffusers`` (a
folder ``StableDiffusionPipeline.from_pretrained`` / ``StableDiffusionXLPipeline.from_pretrained``
opens). Every target is written atomically: a failed conversion leaves no half-written folder.
"""

from __future__ import annotations

from pathlib import Path

from latentdiff.components import read_model_folder
from latentdiff.conditioning.clip import SDTextEncoder
from latentdiff.interop.common import SDModel, save_latentdiff
from latentdiff.interop.diffusers_folder import (
    INPAINT_PIPELINE,
    SD3_PIPELINE,
    UPSCALE_PIPELINE,
    is_diffusers_folder,
    low_res_scheduler_to_diffusers,
    mmdit_config_to_diffusers,
    read_diffusers,
    schedule_to_diffusers,
    unet_config_to_diffusers,
    vae_config_to_diffusers,
)
from latentdiff.interop.single_file import read_single_file
from latentdiff.io import atomic_folder, write_json, write_safetensors
from latentdiff.model_index import INPAINT, LOW_RES

FORMATS = ("latentdiff", "diffusers")


def read_our_folder(folder: Path, verbose: bool = False) -> SDModel:
    """Our model folder as an SDModel (so both writers take one type), its index whole."""
    return SDModel(**vars(read_model_folder(folder, verbose)))


def open_any(src: str | Path, **kw) -> SDModel:
    src = Path(src)
    if src.is_file():
        return read_single_file(src, **kw)
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"{src} is neither a checkpoint file nor a model folder (no model_index.json)")
    if kw.get("tokenizer") is not None:
        kw.pop("tokenizer")  # folders carry their own tokenizers
    if is_diffusers_folder(src):
        return read_diffusers(src, **{k: v for k, v in kw.items() if k == "dtype"})
    if kw.get("prediction") is not None:
        raise ValueError("--prediction applies to single-file checkpoints only")
    return read_our_folder(src)


def _write_text_encoders(tmp: Path, encoder: SDTextEncoder) -> list[tuple[str, str, str]]:
    """text_encoder[_2, _3]/ and tokenizer[_2, _3]/ in transformers' layout; returns model_index entries."""
    state = encoder.canonical_state_dict()
    entries = []
    for i, (spec, tok) in enumerate(zip(encoder.config.encoders, encoder.tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"
        if spec.kind == "t5":
            cls, model_type, tok_cls = "T5EncoderModel", "t5", type(tok).__name__
        else:
            cls = "CLIPTextModelWithProjection" if spec.projection else "CLIPTextModel"
            model_type, tok_cls = "clip_text_model", "CLIPTokenizer"
        prefix = f"encoders.{i}."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        write_safetensors(tmp / f"text_encoder{suffix}" / "model.safetensors", weights, metadata={"format": "pt"})
        hf = {**spec.hf_config, "architectures": [cls], "model_type": model_type}
        write_json(tmp / f"text_encoder{suffix}" / "config.json", hf)
        tok.save_pretrained(tmp / f"tokenizer{suffix}")
        entries += [(f"text_encoder{suffix}", "transformers", cls), (f"tokenizer{suffix}", "transformers", tok_cls)]
    return entries


def _save_sd3_diffusers(model: SDModel, folder: str | Path) -> list[str]:
    """An SD3 SDModel as a StableDiffusion3Pipeline folder (transformer/, vae/, CLIP-L/G [+ T5], scheduler/)."""
    text = model.text_encoder
    if not isinstance(text, SDTextEncoder):
        raise ValueError(f"a {model.family} model without its text encoders has no diffusers pipeline form; "  # noqa: TRY004
                         "write a latentdiff folder instead (--format latentdiff)")
    hint = model.hint
    if hint.schedule != "flow_match":
        raise ValueError(f"an SD3 model sampled on the {hint.schedule!r} grid has no FlowMatchEulerDiscreteScheduler "
                         "counterpart")
    notes = []
    with atomic_folder(folder) as tmp:
        write_json(tmp / "transformer" / "config.json", mmdit_config_to_diffusers(model.spec.mmdit))
        write_safetensors(tmp / "transformer" / "diffusion_pytorch_model.safetensors",
                          model.denoiser.network.state_dict(), metadata={"format": "pt"})
        write_json(tmp / "vae" / "config.json", vae_config_to_diffusers(model.autoencoder.config))
        write_safetensors(tmp / "vae" / "diffusion_pytorch_model.safetensors", model.autoencoder.state_dict(),
                          metadata={"format": "pt"})
        write_json(tmp / "scheduler" / "scheduler_config.json",
                   {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                    "shift": hint.flow_shift})
        index = {"_class_name": SD3_PIPELINE, "_diffusers_version": "0.30.0",
                 "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "text_encoder_3": [None, None], "tokenizer_3": [None, None],
                 "image_encoder": [None, None], "feature_extractor": [None, None]}
        for name, lib, cls in _write_text_encoders(tmp, text):
            index[name] = [lib, cls]
        if index["text_encoder_3"][0] is None:
            notes.append("no T5: written without text_encoder_3 (open it with text_encoder_3=None, tokenizer_3=None)")
        write_json(tmp / "model_index.json", index)
    return notes


def save_diffusers(model: SDModel, folder: str | Path) -> list[str]:
    """Write an SDModel as a diffusers pipeline folder; returns notes on what could not be carried over."""
    notes = []
    if model.spec.network == "mmdit":
        return _save_sd3_diffusers(model, folder)
    if model.spec.network != "unet":
        raise ValueError(f"writing a {model.family} ({model.spec.network}) model as a diffusers folder is not "
                         "supported yet; write a latentdiff folder instead (--format latentdiff)")
    text = model.text_encoder
    sdxl = isinstance(text, SDTextEncoder) and len(text.config.encoders) == 2
    unet_cfg = unet_config_to_diffusers(model.spec.unet, model.sample_size // model.autoencoder.factor)
    if model.spec.unet.vector_dim is not None:
        if not (sdxl and text.config.time_embed_dim):
            raise ValueError("this U-Net adds a pooled vector to its time embedding the way only SDXL's text_time "
                             "embedding does in diffusers, but its text encoder is not SDXL's; cannot export")
        unet_cfg["addition_time_embed_dim"] = text.config.time_embed_dim
    extra = _upscaler_index(model) if model.index.concat == LOW_RES else {}
    with atomic_folder(folder) as tmp:
        write_json(tmp / "unet" / "config.json", unet_cfg)
        write_safetensors(tmp / "unet" / "diffusion_pytorch_model.safetensors", model.denoiser.network.state_dict(),
                          metadata={"format": "pt"})
        write_json(tmp / "vae" / "config.json", vae_config_to_diffusers(model.autoencoder.config))
        write_safetensors(tmp / "vae" / "diffusion_pytorch_model.safetensors", model.autoencoder.state_dict(),
                          metadata={"format": "pt"})
        write_json(tmp / "scheduler" / "scheduler_config.json", schedule_to_diffusers(model.spec, model.hint))
        pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
        if model.index.concat == INPAINT:
            if sdxl:
                raise ValueError("an SDXL inpainting model cannot be exported to a diffusers folder here")
            pipeline = INPAINT_PIPELINE
        if extra:
            pipeline = UPSCALE_PIPELINE
            write_json(tmp / "low_res_scheduler" / "scheduler_config.json",
                       low_res_scheduler_to_diffusers(model.index.noise_augmentation))
        index = {"_class_name": pipeline,
                 "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
        if isinstance(text, SDTextEncoder):
            for name, lib, cls in _write_text_encoders(tmp, text):
                index[name] = [lib, cls]
        else:
            index.update(text_encoder=[None, None], tokenizer=[None, None])
            notes.append(f"text encoder {type(text).__name__} has no diffusers counterpart: written without one "
                         "(unet/ and vae/ open in diffusers on their own)")
        if sdxl:
            index["force_zeros_for_empty_prompt"] = text.config.zero_empty_prompt
        elif extra:
            index.update(extra, safety_checker=[None, None], feature_extractor=[None, None], watermarker=[None, None])
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        write_json(tmp / "model_index.json", index)
    return notes


def _upscaler_index(model: SDModel) -> dict:
    """An x4 upscaler's model_index.json entries (its low-res scheduler, its highest noise level). A super-resolution
    model of another layout (no noise augmentation, or a low-res image larger than the latent) is refused."""
    noise, text = model.index.noise_augmentation, model.text_encoder
    if noise is None or model.index.upscale != model.autoencoder.factor or not isinstance(text, SDTextEncoder):
        raise ValueError("only SD's x4 upscaler layout (the low-res image at the latent's size, noise-augmented, a CLIP "
                         "text encoder) has a diffusers pipeline (StableDiffusionUpscalePipeline); write a latentdiff "
                         "folder instead (--format latentdiff)")
    return {"low_res_scheduler": ["diffusers", "DDPMScheduler"], "max_noise_level": noise.max_level}


def convert(src: str | Path, dst: str | Path, fmt: str = "latentdiff", **kw) -> SDModel:
    """Read ``src`` (any supported checkpoint) and write it to ``dst`` in ``fmt``; prints what it did."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if Path(dst).resolve() == Path(src).resolve():
        raise ValueError("destination and source are the same path; choose another destination")
    model = open_any(src, **kw)
    print(model.summary())
    notes = save_latentdiff(model, dst) if fmt == "latentdiff" else save_diffusers(model, dst)
    for note in notes or []:
        print(f"note: {note}")
    print(f"wrote {fmt} folder {dst}")
    return model
