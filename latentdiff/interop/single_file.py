"""Single-file original checkpoints (SD 1.x, SD 2.x, SDXL, SD 3 / 3.5): detect the family, infer configs, map keys.

A single file holds every component under the original prefixes: the U-Net under
``model.diffusion_model.``, the autoencoder under ``first_stage_model.``, the text encoder(s) under
``cond_stage_model.`` (SD 1.x: transformers CLIP; SD 2.x: OpenCLIP) or ``conditioner.embedders.N.``
(SDXL). The family is detected from which of these keys exist, the configs are read off the tensor
shapes (channels, levels, blocks, depths, context width), and the tables in ``keymaps`` move every
tensor to our names. What the shapes cannot tell (attention heads, norm groups, SD 2.x's prediction
type) comes from the family, or from ``overrides``. Every tensor of the file must be used or
explicitly dropped with a reason, and every tensor of the model must be set.

SD 3 / 3.5 files (Stability's reference layout) hold the MMDiT under ``model.diffusion_model.``
(``joint_blocks.N.x_block`` / ``context_block``, fused ``attn.qkv``), the 16-channel autoencoder under
``first_stage_model.`` and, in the ``incl_clips`` variants, CLIP-L and CLIP-G in transformers' layout
under ``text_encoders.clip_l.transformer.`` / ``text_encoders.clip_g.transformer.``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from latentdiff.components import DenoiserSpec, NoiseSchedule
from latentdiff.conditioning.clip import CLIPEncoderSpec, SDTextConfig, build_sd_text_encoder, load_tokenizer
from latentdiff.diffusion.schedules import vp_sigma_table
from latentdiff.interop.common import (
    NoTextEncoder,
    SamplerHint,
    SDModel,
    as_dtype,
    build_autoencoder,
    make_denoiser,
)
from latentdiff.interop.files import read_state_file
from latentdiff.interop.keymaps import (
    KeyMap,
    clip_rules,
    mmdit_rules,
    openclip_ignored,
    openclip_rules,
    t5_rules,
    unet_rules,
    vae_rules,
)
from latentdiff.io import LoadReport
from latentdiff.model_index import INPAINT, ModelIndex, split_input_channels
from latentdiff.models.autoencoder import PRESETS as AUTOENCODER_PRESETS
from latentdiff.models.autoencoder import AutoencoderConfig
from latentdiff.models.mmdit import MMDiTConfig
from latentdiff.models.unet import UNetConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SUPPORTED = ("sd1", "sd2", "sdxl", "sd3", "sd35")
SD3_FAMILIES = ("sd3", "sd35")  # MMDiT without / with QK RMS-norm (SD 3 medium / SD 3.5 large)
# The keys that identify each family's text side.
TEXT_PREFIXES = {
    "sd1": [("hf", "cond_stage_model.transformer.")],
    "sd2": [("openclip", "cond_stage_model.model.")],
    "sdxl": [("hf", "conditioner.embedders.0.transformer."), ("openclip", "conditioner.embedders.1.model.")],
    "sd3": [("hf", "text_encoders.clip_l.transformer."), ("hf", "text_encoders.clip_g.transformer.")],
}
TEXT_PREFIXES["sd35"] = TEXT_PREFIXES["sd3"]
T5 = "text_encoders.t5xxl.transformer."
SD3_VAE = AUTOENCODER_PRESETS["sd3"]
SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025,  # the autoencoders' latent scales (and shifts)
         "sd3": SD3_VAE.scale_factor, "sd35": SD3_VAE.scale_factor}
SHIFT = {"sd3": SD3_VAE.shift_factor, "sd35": SD3_VAE.shift_factor}
# The tensors an original file may carry that no model here uses, with the reason each is dropped.
DROPPABLE = {
    r"^model_ema\.": "EMA copy kept by the training script (the main weights are the EMA weights in releases)",
    r"^(alphas_cumprod|alphas_cumprod_prev|betas|log_one_minus_alphas_cumprod|posterior_.*|sqrt_.*|model_ema_.*"
    r"|logvar)$": "noise-schedule buffers of the training wrapper; the schedule is rebuilt from the family",
    r"\.position_ids$": "CLIP position-id buffer, recomputed",
    r"^first_stage_model\.loss\.": "the autoencoder's training loss (discriminator, LPIPS)",
}


class UnsupportedCheckpoint(ValueError):
    """A checkpoint of a family this loader does not read; the message names what was detected."""


@dataclass
class Detection:
    family: str  # "sd1", "sd2", "sdxl" (or an unsupported name)
    notes: list[str] = field(default_factory=list)


def _has(state: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def detect_family(state: dict[str, Tensor]) -> Detection:
    """Which SD family a flat original state dict is, from its keys; refuse the ones not supported."""
    if _has(state, UNET + "joint_blocks."):
        return _detect_sd3(state)
    if _has(state, "joint_blocks."):
        raise UnsupportedCheckpoint("detected an SD 3.x MMDiT without the 'model.diffusion_model.' prefix (a "
                                    "transformer-only file); load the full single file, which also holds the "
                                    "autoencoder under 'first_stage_model.'")
    if _has(state, "double_blocks.") or _has(state, UNET + "double_blocks."):
        raise UnsupportedCheckpoint("detected a Flux checkpoint; Flux is not supported")
    if not _has(state, UNET):
        sample = ", ".join(sorted(state)[:3])
        raise UnsupportedCheckpoint(f"no U-Net under '{UNET}' (keys start like: {sample}): not an original "
                                    "SD-family checkpoint (a diffusers folder or a LoRA file?)")
    if _has(state, "conditioner.embedders.1.model.") and _has(state, "conditioner.embedders.0.transformer."):
        family = "sdxl"
    elif _has(state, "conditioner.embedders.0.model."):
        raise UnsupportedCheckpoint("detected an SDXL refiner (one OpenCLIP-bigG encoder, aesthetic-score "
                                    "conditioning); only SDXL base is supported")
    elif _has(state, "cond_stage_model.model."):
        family = "sd2"
    elif _has(state, "cond_stage_model.transformer."):
        family = "sd1"
    else:
        raise UnsupportedCheckpoint("detected a U-Net but no text encoder (cond_stage_model / conditioner); "
                                    "U-Net-only files are not supported")
    conv_in = state.get(UNET + "input_blocks.0.0.weight")
    conv_out = state.get(UNET + "out.2.weight")
    notes = []
    if conv_in is not None and conv_out is not None and conv_in.shape[1] != conv_out.shape[0]:
        try:
            kind = split_input_channels(conv_in.shape[1], conv_out.shape[0], f"detected {family}")[2]
        except ValueError as e:
            raise UnsupportedCheckpoint(str(e)) from None
        if kind != INPAINT:  # a file holds neither the low-res noise schedule nor its highest level
            raise UnsupportedCheckpoint(f"detected {family}: {conv_in.shape[1]} input channels and "
                                        f"{conv_out.shape[0]} output channels, an x4 upscaler U-Net: single files of "
                                        "it are not supported; load its diffusers folder "
                                        "(StableDiffusionUpscalePipeline)")
        notes.append(f"an inpainting U-Net ({conv_in.shape[1]} input channels: latents, mask, masked-image latents)"
                     + ("; SD 2 inpainting is eps-prediction: pass prediction='eps'" if family == "sd2" else ""))
    return Detection(family, notes)


def _detect_sd3(state: dict[str, Tensor]) -> Detection:
    """SD 3 (no QK norm) or SD 3.5 large (QK RMS-norm); SD 3.5 medium's dual attention is refused."""
    if any(k.startswith(UNET + "joint_blocks.") and ".attn2." in k for k in state):
        raise UnsupportedCheckpoint("detected SD 3.5 medium (MMDiT-X: a second self-attention 'attn2' in the "
                                    "first joint blocks); latentdiff's MMDiT does not implement it")
    family = "sd35" if any(k.startswith(UNET) and ".attn.ln_q." in k for k in state) else "sd3"
    if not _has(state, VAE):
        name = {"sd3": "SD 3", "sd35": "SD 3.5 large"}[family]
        raise UnsupportedCheckpoint(f"detected {name} ({family}, MMDiT) but no autoencoder under '{VAE}'; "
                                    "a transformer-only file is not supported")
    return Detection(family)


# ---------------------------------------------------------------------------------------------
# configs from shapes


def _indices(state: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


def infer_unet_config(state: dict[str, Tensor], family: str, overrides: dict | None = None) -> UNetConfig:
    """The U-Net's config from the shapes of its tensors (original names); heads from the family."""
    p = UNET
    conv_in = state[p + "input_blocks.0.0.weight"]  # (mc, in, 3, 3)
    mc = conv_in.shape[0]
    n_in = max(_indices(state, re.escape(p) + r"input_blocks\.(\d+)\.")) + 1
    downs = [i for i in range(n_in) if p + f"input_blocks.{i}.0.op.weight" in state]
    levels = len(downs) + 1
    nrb = (n_in - 1 - len(downs)) // levels
    chans, attn, depths = [], [], []
    for i in range(levels):
        first = 1 + i * (nrb + 1)
        chans.append(state[p + f"input_blocks.{first}.0.in_layers.2.weight"].shape[0])
        blocks = _indices(state, re.escape(p + f"input_blocks.{first}.1.transformer_blocks.") + r"(\d+)\.")
        if blocks:
            attn.append(i)
        depths.append(len(blocks))
    mid_blocks = _indices(state, re.escape(p + "middle_block.1.transformer_blocks.") + r"(\d+)\.")
    if mid_blocks:
        if depths[-1] and depths[-1] != len(mid_blocks):
            raise UnsupportedCheckpoint(f"mid-block depth {len(mid_blocks)} differs from the last level's "
                                        f"{depths[-1]}")
        depths[-1] = len(mid_blocks)
    depths = [d or 1 for d in depths]
    proj = next((k for k in state if k.startswith(p) and k.endswith("proj_in.weight")), None)
    to_k = next((k for k in state if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    heads = {"num_heads": 8, "head_dim": None} if family == "sd1" else {"num_heads": 8, "head_dim": 64}
    in_channels, concat_channels, _ = split_input_channels(conv_in.shape[1], state[p + "out.2.weight"].shape[0],
                                                           "unet")
    kw = dict(
        in_channels=in_channels, concat_channels=concat_channels, out_channels=state[p + "out.2.weight"].shape[0],
        model_channels=mc,
        channel_mult=tuple(c // mc for c in chans), num_res_blocks=nrb, attention_levels=tuple(attn),
        mid_attention=bool(mid_blocks), context_dim=state[to_k].shape[1] if to_k else None,
        transformer_depth=depths[0] if len(set(depths)) == 1 else tuple(depths),
        use_linear_projection=proj is not None and state[proj].ndim == 2,
        vector_dim=state[p + "label_emb.0.0.weight"].shape[1] if p + "label_emb.0.0.weight" in state else None,
        num_classes=state[p + "label_emb.weight"].shape[0] if p + "label_emb.weight" in state else None,
        **heads,
    )
    return _config(UNetConfig, kw, overrides, "unet")


def infer_vae_config(state: dict[str, Tensor], family: str, overrides: dict | None = None) -> AutoencoderConfig:
    p = VAE
    conv_in = state[p + "encoder.conv_in.weight"]  # (base, 3, 3, 3)
    base = conv_in.shape[0]
    levels = _indices(state, re.escape(p) + r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight")
    mult = tuple(state[p + f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base for i in levels)
    kw = {
        "in_channels": conv_in.shape[1], "base_channels": base, "channel_mult": mult,
        "num_res_blocks": len(_indices(state, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight")),
        "latent_channels": state[p + "decoder.conv_in.weight"].shape[1],
        "mid_attention": p + "encoder.mid.attn_1.q.weight" in state,
        "use_quant_conv": p + "quant_conv.weight" in state, "scale_factor": SCALE[family],
        "shift_factor": SHIFT.get(family, 0.0),
    }
    return _config(AutoencoderConfig, kw, overrides, "vae")


def infer_mmdit_config(state: dict[str, Tensor], family: str, overrides: dict | None = None) -> MMDiTConfig:
    """The MMDiT's config from its tensors' shapes; heads of width 64 and 128x128 latents as in SD 3 / 3.5."""
    p = UNET
    proj = state[p + "x_embedder.proj.weight"]  # (D, C, p, p)
    width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    table = state[p + "pos_embed"].shape[1]  # (1, G * G, D)
    grid = math.isqrt(table)
    if grid * grid != table:
        raise UnsupportedCheckpoint(f"{p}pos_embed holds {table} positions, not a square grid")
    fc1 = state[p + "joint_blocks.0.x_block.mlp.fc1.weight"]  # (mlp_ratio * D, D)
    kw = {
        "in_channels": channels, "sample_size": 128, "patch_size": patch, "hidden_size": width,
        "depth": len(_indices(state, re.escape(p + "joint_blocks.") + r"(\d+)\.")),
        "num_heads": max(1, width // 64), "context_dim": state[p + "context_embedder.weight"].shape[1],
        "vector_dim": state[p + "y_embedder.mlp.0.weight"].shape[1], "pos_embed_max_size": grid,
        "qk_norm": family == "sd35", "mlp_ratio": fc1.shape[0] / width,
    }
    out = state[p + "final_layer.linear.weight"].shape[0]
    if out != patch * patch * channels:
        raise UnsupportedCheckpoint(f"the MMDiT maps {channels} channels in to {out // (patch * patch)} out; only "
                                    "text-to-image models (in = out) are supported")
    return _config(MMDiTConfig, kw, overrides, "mmdit")


def _config(cls, inferred: dict, overrides: dict | None, what: str):
    """Build a config from inferred fields plus user overrides, naming unknown override keys."""
    unknown = sorted(set(overrides or {}) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} override(s) {unknown}; fields: {[f.name for f in fields(cls)]}")
    return cls(**{**inferred, **(overrides or {})})


def _clip_hf_config(state: dict, style: str, prefix: str, keep_layers: int | None, overrides: dict) -> dict:
    """transformers CLIPTextConfig fields read off the shapes of a CLIP / OpenCLIP text tower."""
    if style == "hf":
        t = prefix + "text_model."
        tok, pos = state[t + "embeddings.token_embedding.weight"], state[t + "embeddings.position_embedding.weight"]
        layers = len(_indices(state, re.escape(t + "encoder.layers.") + r"(\d+)\."))
        inter = state[t + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        act, proj = "quick_gelu", tok.shape[1]  # OpenAI CLIP-L
    else:
        tok, pos = state[prefix + "token_embedding.weight"], state[prefix + "positional_embedding"]
        layers = len(_indices(state, re.escape(prefix + "transformer.resblocks.") + r"(\d+)\."))
        inter = state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        tp = state.get(prefix + "text_projection")
        act, proj = "gelu", tp.shape[1] if tp is not None else tok.shape[1]
    hidden = tok.shape[1]
    cfg = {"vocab_size": tok.shape[0], "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": keep_layers if keep_layers is not None else layers,
           "num_attention_heads": max(1, hidden // 64), "max_position_embeddings": pos.shape[0],
           "hidden_act": act, "projection_dim": proj, "layer_norm_eps": 1e-5,
           "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    cfg.update(overrides)
    return cfg, layers


def _text_side(state: dict, family: str, tokenizers: list, overrides: dict
               ) -> tuple[SDTextConfig, dict[str, Tensor], set[str], list[str], list[str]]:
    """Text encoder config, its state (our names), the original keys consumed, absent keys and notes."""
    specs, ours, consumed, absent, notes = [], {}, set(), [], []
    for i, (style, prefix) in enumerate(TEXT_PREFIXES[family]):
        o = overrides.get(f"text_encoder_{i}", {})
        if style == "hf":
            hf, layers = _clip_hf_config(state, style, prefix, None, o)
            km = KeyMap(clip_rules(layers), prefix, f"encoders.{i}.")
            spec = CLIPEncoderSpec(hf, layer="penultimate" if family == "sdxl" else "last")
        else:
            _, total = _clip_hf_config(state, style, prefix, None, o)
            keep = total - 1 if family == "sd2" else total
            hf, _ = _clip_hf_config(state, style, prefix, keep, o)
            projection = family == "sdxl"
            km = KeyMap(openclip_rules(keep, projection), prefix, f"encoders.{i}.",
                        ignored=openclip_ignored(keep, total, projection))
            spec = CLIPEncoderSpec(hf, layer="penultimate" if family == "sdxl" else "last", projection=projection)
            if keep < total:
                notes.append(f"text encoder {i}: dropped OpenCLIP layer {total - 1} ({km.ignored[next(iter(km.ignored))]})")
        converted, miss, dropped = km.to_ours(state)
        ours.update(converted)
        absent += miss
        consumed |= km.original_keys() | set(dropped)
        specs.append(spec)
    time_dim = 0
    if family == "sdxl":
        vector_dim = state[UNET + "label_emb.0.0.weight"].shape[1]
        time_dim = (vector_dim - specs[1].hf_config["projection_dim"]) // 6
    config = SDTextConfig(encoders=specs, max_length=77, time_embed_dim=time_dim,
                          image_size=(1024, 1024) if family == "sdxl" else (512, 512),
                          zero_empty_prompt=family == "sdxl")  # sgm samples SDXL with a zero text uncond
    return config, ours, consumed, absent, notes


TOKENIZER_HELP = ("pass the folder with --tokenizer DIR (latentdiff generate / convert) or tokenizer=DIR "
                  "(latentdiff.load, latentdiff.interop.open_model)")


def _tokenizers(tokenizer: str | Path | None, family: str, t5: bool = False) -> list:
    """The CLIP tokenizer(s) of a single file's text encoder(s), from a folder the user names.

    One encoder (SD 1.x / 2.x): DIR holds the tokenizer itself (vocab.json + merges.txt, or tokenizer.json)
    or is a diffusers folder with ``tokenizer/``. Two encoders (SDXL, SD3): DIR is a diffusers folder with
    ``tokenizer/`` and ``tokenizer_2/``; the second pads with '!' rather than the end token, so one
    tokenizer for both would silently change the second encoder's output. SD3 with T5 also needs
    ``tokenizer_3/`` (T5's).
    """
    n = len(TEXT_PREFIXES[family])
    names = ["tokenizer", "tokenizer_2"] + (["tokenizer_3"] if t5 else [])
    wanted = " and ".join(f"{x}/" for x in names) if n == 2 else "tokenizer/ (or vocab.json + merges.txt itself)"
    if tokenizer is None:
        raise ValueError(f"this {family} single file holds text encoder weights but no tokenizer vocabulary: "
                         f"{TOKENIZER_HELP}, where DIR is the model's diffusers folder (or a copy of its "
                         f"{wanted})")
    folder = Path(tokenizer)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist; {TOKENIZER_HELP}")
    if n == 1:
        try:
            return [load_tokenizer(folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder)]
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}; {TOKENIZER_HELP}, where DIR holds {wanted}") from e
    absent = [name for name in names if not (folder / name).is_dir()]
    if absent:
        raise FileNotFoundError(f"{family} has {len(names)} text encoders, each with its own tokenizer: {folder} "
                                f"lacks {' and '.join(a + '/' for a in absent)}; {TOKENIZER_HELP}, where DIR holds "
                                f"{wanted} (as a diffusers {family} folder does)")
    return [load_tokenizer(folder / name, "t5" if name == "tokenizer_3" else "clip") for name in names]


def _drop_reason(key: str) -> str | None:
    for pattern, why in DROPPABLE.items():
        if re.search(pattern, key):
            return why
    return None


def _refuse_partial(state: dict[str, Tensor], family: str, consumed: set[str], absent: list[str]) -> list[str]:
    """Refuse a file with a tensor the tables want but lack, or one no table places and no rule drops;
    return notes on what was dropped and why."""
    leftover = sorted(k for k in state if k not in consumed)
    dropped = {k: _drop_reason(k) for k in leftover}
    unused = [k for k, why in dropped.items() if why is None]
    if absent or unused:
        report = LoadReport(f"{family} single file", matched=len(consumed & set(state)), missing=absent,
                            unused=unused)
        raise ValueError(f"refusing a partial load: {report}")
    reasons: dict[str, int] = {}
    for why in dropped.values():
        reasons[why] = reasons.get(why, 0) + 1
    return [f"dropped {n} tensors: {why}" for why, n in reasons.items()]


def convert_single_file(state: dict[str, Tensor], tokenizers: list | None = None, *, family: str | None = None,
                        prediction: str | None = None, overrides: dict | None = None,
                        dtype: torch.dtype | None = torch.float32, tokenizer_path=None) -> SDModel:
    """An original flat state dict -> SDModel; strict: every model tensor set, every file tensor placed."""
    overrides = overrides or {}
    det = detect_family(state)
    if family is not None and family != det.family:
        raise ValueError(f"asked for family {family!r} but the keys say {det.family!r}")
    family = det.family
    if family in SD3_FAMILIES:
        if prediction not in (None, "flow"):
            raise ValueError(f"{family} is a rectified-flow model; prediction {prediction!r} does not apply")
        return _convert_sd3(state, det, tokenizers, overrides, dtype, tokenizer_path)
    notes = list(det.notes)
    if tokenizers is None:  # first: what the user must supply, before anything is built
        tokenizers = _tokenizers(tokenizer_path, family)
    unet_cfg = infer_unet_config(state, family, overrides.get("unet"))
    vae_cfg = infer_vae_config(state, family, overrides.get("vae"))
    if prediction is None:
        prediction = "v" if family == "sd2" else "eps"
        if family == "sd2":
            notes.append("SD 2.x: assumed v-prediction (the 768px 2.0-v / 2.1 models); pass prediction='eps' "
                         "for the 512px -base models")
    elif prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    spec = DenoiserSpec(parameterization=prediction, schedule=NoiseSchedule("scaled_linear", 1000), unet=unet_cfg)

    # Key maps, one per component; collect what each could not find.
    unet_map = KeyMap(unet_rules(unet_cfg), UNET)
    vae_map = KeyMap(vae_rules(vae_cfg), VAE)
    unet_state, unet_absent, _ = unet_map.to_ours(state)
    vae_state, vae_absent, _ = vae_map.to_ours(state)
    text_cfg, text_state, text_keys, text_absent, text_notes = _text_side(state, family, tokenizers, overrides)
    notes += text_notes
    absent = unet_absent + vae_absent + text_absent
    consumed = unet_map.original_keys() | vae_map.original_keys() | text_keys
    notes += _refuse_partial(state, family, consumed, absent)

    denoiser, unet_report = make_denoiser(spec, as_dtype(unet_state, dtype))
    vae, vae_report = build_autoencoder(vae_cfg, as_dtype(vae_state, dtype))
    text, text_report = build_sd_text_encoder(text_cfg, as_dtype(text_state, dtype), tokenizers)
    # The SD releases' scheduler settings (leading spacing, steps_offset 1, VP-prior start); their DDIM / PLMS
    # (CompVis, and diffusers' PNDMScheduler config) end at alphas_cumprod[0], not 1.
    hint = SamplerHint(sampler="plms", schedule="leading", steps_offset=1, vp_init=True,
                       final_sigma=float(vp_sigma_table(spec.schedule.alphas_cumprod())[0]))
    size = {"sd1": 512, "sd2": 768 if prediction == "v" else 512, "sdxl": 1024}[family]
    index = ModelIndex(family=family, sample_size=size, scheduler=hint,
                       concat=INPAINT if unet_cfg.concat_channels else None)
    return SDModel(index=index, autoencoder=vae,
                   denoiser=denoiser, spec=spec, text_encoder=text, reports=[unet_report, vae_report, text_report], notes=notes)


def _sd3_text_side(state: dict, family: str, tokenizers: list, overrides: dict, joint_dim: int
                   ) -> tuple[SDTextConfig, dict[str, Tensor], set[str], list[str]]:
    """SD3's CLIP-L and CLIP-G (transformers layout, both with projections): config, state, keys used, absent.

    Each contributes its penultimate hidden states (768 + 1280 = 2048 features, zero-padded to the
    MMDiT's joint width) and its projected pooled output (768 + 1280 = 2048 = cond.vector). The T5
    tokens that follow the CLIP tokens are 256 zero tokens (diffusers' SD3 pipeline without T5).
    """
    specs, ours, consumed, absent = [], {}, set(), []
    for i, (_, prefix) in enumerate(TEXT_PREFIXES[family]):
        hf, layers = _clip_hf_config(state, "hf", prefix, None, {})
        proj = state.get(prefix + "text_projection.weight")
        hf["projection_dim"] = proj.shape[0] if proj is not None else hf["hidden_size"]
        hf["hidden_act"] = "quick_gelu" if i == 0 else "gelu"  # OpenAI CLIP-L, OpenCLIP bigG
        hf.update(overrides.get(f"text_encoder_{i}", {}))
        km = KeyMap(clip_rules(layers, projection=True), prefix, f"encoders.{i}.")
        converted, miss, _ = km.to_ours(state)
        ours.update(converted)
        absent += miss
        consumed |= km.original_keys()
        specs.append(CLIPEncoderSpec(hf, layer="penultimate", projection=True))
    length = specs[0].hf_config["max_position_embeddings"]  # 77 in the releases
    if _has(state, T5):
        hf, gated = _t5_config(state, T5, overrides.get("text_encoder_2", {}))
        km = KeyMap(t5_rules(hf["num_layers"], gated), T5, f"encoders.{len(specs)}.",
                    ignored={"encoder.embed_tokens.weight": "T5's input embedding, tied to shared.weight"})
        converted, miss, dropped = km.to_ours(state)
        ours.update(converted)
        absent += miss
        consumed |= km.original_keys() | set(dropped)
        specs.append(CLIPEncoderSpec(hf, kind="t5", max_length=256))
    config = SDTextConfig(encoders=specs, max_length=length, image_size=(1024, 1024), context_width=joint_dim,
                          zero_tokens=256)
    return config, ours, consumed, absent


def _t5_config(state: dict, prefix: str, overrides: dict) -> tuple[dict, bool]:
    """transformers T5Config fields read off the shapes of a T5 encoder (SD3's T5-XXL v1.1: gated GELU)."""
    bias = state[prefix + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # (buckets, h)
    q = state[prefix + "encoder.block.0.layer.0.SelfAttention.q.weight"]  # (h * d_kv, d_model)
    gated = prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = state[prefix + "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    cfg = {"vocab_size": state[prefix + "shared.weight"].shape[0], "d_model": q.shape[1],
           "d_kv": q.shape[0] // bias.shape[1], "d_ff": wi.shape[0], "num_heads": bias.shape[1],
           "num_layers": len(_indices(state, re.escape(prefix + "encoder.block.") + r"(\d+)\.")),
           "relative_attention_num_buckets": bias.shape[0], "relative_attention_max_distance": 128,
           "feed_forward_proj": "gated-gelu" if gated else "relu", "layer_norm_epsilon": 1e-6,
           "is_encoder_decoder": False, "use_cache": False}
    cfg.update(overrides)
    return cfg, gated


def _convert_sd3(state: dict[str, Tensor], det: Detection, tokenizers: list | None, overrides: dict,
                 dtype: torch.dtype | None, tokenizer_path) -> SDModel:
    """An SD 3 / 3.5 original file -> SDModel: MMDiT (flow), 16-channel autoencoder, CLIP-L/G if present."""
    family, notes = det.family, list(det.notes)
    has_clips = [_has(state, prefix) for _, prefix in TEXT_PREFIXES[family]]
    if _has(state, T5) and not all(has_clips):
        raise ValueError("refusing a partial load: the file holds SD3's T5 encoder but not both CLIP encoders")
    if all(has_clips) and tokenizers is None:
        tokenizers = _tokenizers(tokenizer_path, family, t5=_has(state, T5))
    mmdit_cfg = infer_mmdit_config(state, family, overrides.get("mmdit"))
    vae_cfg = infer_vae_config(state, family, overrides.get("vae"))
    spec = DenoiserSpec(network="mmdit", parameterization="flow", mmdit=mmdit_cfg)
    mmdit_map, vae_map = KeyMap(mmdit_rules(mmdit_cfg), UNET), KeyMap(vae_rules(vae_cfg), VAE)
    mmdit_state, mmdit_absent, _ = mmdit_map.to_ours(state)
    vae_state, vae_absent, _ = vae_map.to_ours(state)
    absent, consumed = mmdit_absent + vae_absent, mmdit_map.original_keys() | vae_map.original_keys()
    if any(has_clips) and not all(has_clips):
        raise ValueError(f"refusing a partial load: the file holds only one of SD3's two CLIP text encoders "
                         f"({', '.join(p for (_, p), h in zip(TEXT_PREFIXES[family], has_clips) if h)})")
    text_cfg = None
    if all(has_clips):
        text_cfg, text_state, text_keys, text_absent = _sd3_text_side(state, family, tokenizers, overrides,
                                                                      mmdit_cfg.context_dim)
        absent += text_absent
        consumed |= text_keys
    notes += _refuse_partial(state, family, consumed, absent)
    if all(has_clips) and not _has(state, T5):
        notes.append("no T5 in the file: its 256 tokens are zeros, as in diffusers' SD3 pipeline without "
                     "text_encoder_3")

    denoiser, mmdit_report = make_denoiser(spec, as_dtype(mmdit_state, dtype))
    vae, vae_report = build_autoencoder(vae_cfg, as_dtype(vae_state, dtype))
    reports = [mmdit_report, vae_report]
    if text_cfg is not None:
        text, text_report = build_sd_text_encoder(text_cfg, as_dtype(text_state, dtype), tokenizers)
        reports.append(text_report)
    else:
        text = NoTextEncoder(f"this {family} file holds no text encoders (text_encoders.clip_l / clip_g); "
                             "use a file that includes them (the '_incl_clips' releases)")
        notes.append("no text encoders in the file: the pipeline cannot encode prompts")
    # SD 3 / 3.5's scheduler: FlowMatchEulerDiscreteScheduler(shift=3.0), its default grid ('flow_match').
    hint = SamplerHint(sampler="euler", schedule="flow_match", flow_shift=3.0)
    index = ModelIndex(family=family, sample_size=mmdit_cfg.sample_size * vae_cfg.factor, scheduler=hint)
    return SDModel(index=index, autoencoder=vae, denoiser=denoiser, spec=spec, text_encoder=text, reports=reports,
                   notes=notes)


def read_single_file(path: str | Path, tokenizer: str | Path | None = None, **kw) -> SDModel:
    """Open an original .safetensors / .ckpt checkpoint (see ``convert_single_file`` for the keywords)."""
    state = read_state_file(path)
    return convert_single_file(state, tokenizer_path=tokenizer, **kw)


# ---------------------------------------------------------------------------------------------
# writing: our components -> one original-layout file


def to_original_state(model: SDModel) -> dict[str, Tensor]:
    """An SD 1.x or SDXL SDModel as one flat original-layout state dict (the inverse tables)."""
    if model.family not in ("sd1", "sdxl"):
        raise ValueError(f"writing {model.family!r} single files is not supported (SD 2.x drops a text layer "
                         "on load, so it cannot be written back); write a folder instead")
    out: dict[str, Tensor] = {}

    def put(km: KeyMap, state: dict[str, Tensor], what: str) -> None:
        converted, absent = km.to_original(state)
        if absent:
            raise ValueError(f"{what}: the model lacks {absent[:3]} the table needs")
        out.update(converted)

    put(KeyMap(unet_rules(model.spec.unet), UNET), model.denoiser.network.state_dict(), "unet")
    put(KeyMap(vae_rules(model.autoencoder.config), VAE), model.autoencoder.state_dict(), "vae")
    text_state = model.text_encoder.canonical_state_dict()
    for i, ((style, prefix), spec) in enumerate(zip(TEXT_PREFIXES[model.family], model.text_encoder.config.encoders)):
        layers = spec.hf_config["num_hidden_layers"]
        rules = clip_rules(layers) if style == "hf" else openclip_rules(layers, spec.projection)
        put(KeyMap(rules, prefix, f"encoders.{i}."), text_state, f"text encoder {i}")
    return out
