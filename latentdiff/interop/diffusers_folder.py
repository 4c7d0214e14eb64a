"""diffusers pipeline folders: read them into our components, and write our components as one.

A diffusers folder is ``model_index.json`` (``_class_name`` plus ``component: [library, class]``) and one
folder per component: ``unet/`` and ``vae/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``),
``text_encoder[_2]/`` (transformers ``config.json`` + ``model.safetensors``), ``tokenizer[_2]/`` and
``scheduler/scheduler_config.json``; SD 3 folders (``StableDiffusion3Pipeline``) have ``transformer/``
instead of ``unet/``, two CLIP encoders with projections and a T5 encoder (``text_encoder_3``; when it is
absent, zeros stand in, as in diffusers). Our U-Net, MMDiT and autoencoder carry diffusers' parameter names, so
only the configs need translating; each translation refuses settings our models do not implement,
naming the key, rather than building a model that would compute something else.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from latentdiff.components import DenoiserSpec, NoiseSchedule
from latentdiff.conditioning.clip import CLIPEncoderSpec, SDTextConfig, build_sd_text_encoder, load_tokenizer
from latentdiff.diffusion.schedules import vp_sigma_table
from latentdiff.interop.common import SamplerHint, SDModel, as_dtype, build_autoencoder, make_denoiser
from latentdiff.interop.files import read_state_file
from latentdiff.io import read_json, reads_file
from latentdiff.model_index import INPAINT, LOW_RES, ModelIndex, NoiseAugmentation, split_input_channels
from latentdiff.models.autoencoder import PRESETS as AUTOENCODER_PRESETS
from latentdiff.models.autoencoder import AutoencoderConfig
from latentdiff.models.unet import UNetConfig

SD3_PIPELINE = "StableDiffusion3Pipeline"
INPAINT_PIPELINE = "StableDiffusionInpaintPipeline"
UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
PIPELINES = {"StableDiffusionPipeline", "StableDiffusionXLPipeline", INPAINT_PIPELINE, UPSCALE_PIPELINE, SD3_PIPELINE}
CONCAT_PIPELINES = {INPAINT: INPAINT_PIPELINE, LOW_RES: UPSCALE_PIPELINE}  # what a U-Net's concat inputs belong in
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETAS = {  # our beta schedule -> (diffusers' beta_schedule, the (beta_start, beta_end) it has; None: any)
    "scaled_linear": ("scaled_linear", (0.00085, 0.012)),
    "upscaler": ("scaled_linear", (0.0001, 0.02)),
    "linear": ("linear", (0.0001, 0.02)),
    "cosine": ("squaredcos_cap_v2", None),
}
SCHEDULER_SAMPLERS = {  # diffusers scheduler class -> our sampler
    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m", "UniPCMultistepScheduler": "unipc", "LCMScheduler": "lcm",
    "PNDMScheduler": "plms",  # PLMS; the Runge-Kutta warm-up of skip_prk_steps=False is not reproduced
}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")


def is_diffusers_folder(folder: Path) -> bool:
    index = folder / "model_index.json"
    if not index.is_file():
        return False
    try:
        return "_class_name" in json.loads(index.read_text())
    except json.JSONDecodeError:
        return False


_DAMAGED = "the diffusers folder is damaged, or of a layout latentdiff does not read"


def _read_json(path: Path) -> dict:
    return read_json(path, "the diffusers folder is incomplete")


def _require(cfg: dict, where: str, expected: dict) -> None:
    """Refuse settings we do not implement: each key must be absent or hold one of its allowed values."""
    for key, allowed in expected.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{where}: {key} = {cfg[key]!r} is not supported (supported: {list(allowed)})")


# ---------------------------------------------------------------------------------------------
# configs


@reads_file(fix=_DAMAGED)
def unet_config_from_diffusers(d: dict, where: str = "unet/config.json") -> UNetConfig:
    """diffusers UNet2DConditionModel config -> UNetConfig (SD 1.x, 2.x, XL layouts)."""
    _require(d, where, {
        "act_fn": ["silu"], "resnet_time_scale_shift": ["default"], "time_embedding_type": ["positional"],
        "dual_cross_attention": [False], "class_embed_type": [None],
        "encoder_hid_dim": [None], "conv_in_kernel": [3], "conv_out_kernel": [3], "time_cond_proj_dim": [None],
        "attention_type": ["default"], "resnet_skip_time_act": [False], "resnet_out_scale_factor": [1.0, 1],
        "time_embedding_dim": [None], "timestep_post_act": [None], "center_input_sample": [False],
        "mid_block_type": ["UNetMidBlock2DCrossAttn"], "addition_embed_type": [None, "text_time"],
        "reverse_transformer_layers_per_block": [None], "cross_attention_norm": [None],
        "class_embeddings_concat": [False], "downsample_padding": [1], "mid_block_scale_factor": [1, 1.0],
        "time_embedding_act_fn": [None], "mid_block_only_cross_attention": [None, False],
    })
    boc = list(d["block_out_channels"])
    if any(c % boc[0] for c in boc):
        raise ValueError(f"{where}: block_out_channels {boc} are not multiples of the first")
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    for t in down:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ValueError(f"{where}: down block type {t!r} is not supported")
    attn = tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D")
    expected_up = ["CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(down)))]
    if up != expected_up:
        raise ValueError(f"{where}: up_block_types {up} do not mirror down_block_types {down}")
    if not isinstance(d.get("layers_per_block", 2), int):
        raise ValueError(f"{where}: per-level layers_per_block {d['layers_per_block']} is not supported")  # noqa: TRY004 (a config value)
    in_channels, concat_channels, _ = split_input_channels(d["in_channels"], d["out_channels"], where)
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(boc)
    attended = sorted(set(attn) | {len(boc) - 1})
    num_heads, head_dim = 8, None
    if len({heads[i] for i in attended}) == 1:
        num_heads = heads[attended[0]]
    else:
        dims = {boc[i] // heads[i] for i in attended}
        if len(dims) != 1 or any(boc[i] % heads[i] for i in attended):
            raise ValueError(f"{where}: attention heads {heads} for channels {boc} give neither a fixed head "
                             "count nor a fixed head width")
        head_dim = dims.pop()
    depth = d.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if any(isinstance(x, (list, tuple)) for x in depth):
            raise ValueError(f"{where}: nested transformer_layers_per_block is not supported")
        depth = tuple(depth)
    if d.get("transformer_layers_per_mid_block") not in (None, depth if isinstance(depth, int) else depth[-1]):
        raise ValueError(f"{where}: transformer_layers_per_mid_block differs from the last level's depth")
    context = d.get("cross_attention_dim", 1280)
    if isinstance(context, (list, tuple)):
        raise ValueError(f"{where}: per-level cross_attention_dim is not supported")  # noqa: TRY004
    vector_dim = d.get("projection_class_embeddings_input_dim") if d.get("addition_embed_type") else None
    return UNetConfig(
        cross_only_levels=_cross_only_levels(d.get("only_cross_attention", False), attn, len(down), where),
        in_channels=in_channels, concat_channels=concat_channels, out_channels=d["out_channels"], model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=d.get("layers_per_block", 2),
        attention_levels=attn, mid_attention=True, num_heads=num_heads, head_dim=head_dim,
        context_dim=context, transformer_depth=depth, use_linear_projection=d.get("use_linear_projection", False),
        vector_dim=vector_dim, num_classes=d.get("num_class_embeds"), dropout=d.get("dropout", 0.0),
        norm_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
        flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0),
    )


def _cross_only_levels(only: bool | list, attn: tuple[int, ...], levels: int, where: str) -> tuple[int, ...]:
    """diffusers' only_cross_attention (one bool, or one per down block; the up blocks mirror it) as the attention
    levels whose blocks cross-attend in place of self-attention (the middle block keeps its self-attention)."""
    only = [only] * levels if isinstance(only, bool) else list(only)
    if len(only) != levels or any(not isinstance(x, bool) for x in only):
        raise ValueError(f"{where}: only_cross_attention {only} must be one bool or one per down block ({levels})")
    return tuple(i for i in attn if only[i])


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int | None = None) -> dict:
    """UNetConfig -> diffusers UNet2DConditionModel config (the inverse of unet_config_from_diffusers)."""
    if cfg.concat_channels not in (0, cfg.in_channels + 1, 3):
        raise ValueError(f"a U-Net with {cfg.concat_channels} concat channels has no diffusers counterpart (an "
                         f"inpainting U-Net has {cfg.in_channels + 1}, an x4 upscaler's 3)")
    levels = len(cfg.channel_mult)
    boc = [cfg.model_channels * m for m in cfg.channel_mult]
    heads = [cfg.heads_at(c) if (i in cfg.attention_levels or i == levels - 1) else cfg.heads_at(boc[-1])
             for i, c in enumerate(boc)] if cfg.head_dim is not None else cfg.num_heads
    if not cfg.mid_attention:
        raise ValueError("a U-Net without mid attention has no diffusers UNet2DConditionModel counterpart")
    d = {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": cfg.in_channels + cfg.concat_channels, "out_channels": cfg.out_channels, "block_out_channels": boc,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D"
                             for i in range(levels)],
        "up_block_types": ["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D"
                           for i in reversed(range(levels))],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": list(cfg.transformer_depth) if isinstance(cfg.transformer_depth, tuple)
        else cfg.transformer_depth,
        "use_linear_projection": cfg.use_linear_projection, "num_class_embeds": cfg.num_classes,
        "dropout": cfg.dropout, "norm_num_groups": cfg.norm_groups, "norm_eps": cfg.norm_eps,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
    }
    if cfg.vector_dim is not None:
        d.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=cfg.vector_dim)
    if cfg.cross_only_levels:
        d["only_cross_attention"] = [i in cfg.cross_only_levels for i in range(levels)]
    return d


@reads_file(fix=_DAMAGED)
def vae_config_from_diffusers(d: dict, where: str = "vae/config.json") -> AutoencoderConfig:
    """diffusers AutoencoderKL config -> AutoencoderConfig."""
    _require(d, where, {"act_fn": ["silu"], "latents_mean": [None], "latents_std": [None]})
    if any(t != "DownEncoderBlock2D" for t in d["down_block_types"]) or any(
            t != "UpDecoderBlock2D" for t in d["up_block_types"]):
        raise ValueError(f"{where}: only DownEncoderBlock2D / UpDecoderBlock2D autoencoders are supported")
    if d.get("in_channels", 3) != d.get("out_channels", 3):
        raise ValueError(f"{where}: in_channels {d.get('in_channels')} != out_channels {d.get('out_channels')}")
    if d.get("use_quant_conv", True) != d.get("use_post_quant_conv", True):
        raise ValueError(f"{where}: use_quant_conv and use_post_quant_conv differ; not supported")
    boc = list(d["block_out_channels"])
    if any(c % boc[0] for c in boc):
        raise ValueError(f"{where}: block_out_channels {boc} are not multiples of the first")
    return AutoencoderConfig(
        in_channels=d.get("in_channels", 3), base_channels=boc[0], channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=d.get("layers_per_block", 2), latent_channels=d.get("latent_channels", 4),
        mid_attention=d.get("mid_block_add_attention", True), norm_groups=d.get("norm_num_groups", 32),
        use_quant_conv=d.get("use_quant_conv", True),
        scale_factor=d.get("scaling_factor", AUTOENCODER_PRESETS["sd"].scale_factor),  # diffusers' default: SD's
        shift_factor=d.get("shift_factor") or 0.0,
    )


def vae_config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    if cfg.regularizer != "kl":
        raise ValueError(f"a {cfg.regularizer!r}-regularized autoencoder has no diffusers AutoencoderKL form")
    if cfg.channel_scale:
        raise ValueError("per-channel latent statistics (channel_scale / channel_shift) are not exported: "
                         "store scalar ones first with `latentdiff latent-stats --set per_channel=false`")
    boc = [cfg.base_channels * m for m in cfg.channel_mult]
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(boc), "up_block_types": ["UpDecoderBlock2D"] * len(boc),
        "block_out_channels": boc, "layers_per_block": cfg.num_res_blocks, "act_fn": "silu",
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups,
        "scaling_factor": cfg.scale_factor, "shift_factor": cfg.shift_factor or None,
        "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    }


@reads_file(fix=_DAMAGED)
def schedule_from_diffusers(d: dict, where: str = "scheduler/scheduler_config.json"
                            ) -> tuple[str, NoiseSchedule, SamplerHint]:
    """Scheduler config -> (parameterization, noise schedule, sampler hint)."""
    cls = d.get("_class_name", "")
    if cls == "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{where}: a flow-matching scheduler belongs to a flow model (SD3 folders load as "
                         "StableDiffusion3Pipeline), not to a U-Net pipeline")
    pred = d.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise ValueError(f"{where}: prediction_type {pred!r} is not supported ({sorted(PREDICTIONS)})")
    schedule = NoiseSchedule(betas=_beta_schedule(d, where), num_timesteps=d.get("num_train_timesteps", 1000),
                             zero_terminal_snr=bool(d.get("rescale_betas_zero_snr", False)))
    spacing = d.get("timestep_spacing", "leading")
    if d.get("use_karras_sigmas"):
        spacing = "karras"
    # diffusers' Euler-family schedulers start from sigma_max * noise except with 'leading' spacing; its VP
    # schedulers (DDIM, PNDM, DPM-Solver, ...) from unit noise in VP space, i.e. sqrt(1 + sigma_max^2) * noise.
    euler_family = cls in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler")
    hint = SamplerHint(sampler=SCHEDULER_SAMPLERS.get(cls, "euler"), schedule=spacing,
                       steps_offset=int(d.get("steps_offset", 0)),
                       vp_init=not euler_family or spacing == "leading",
                       final_sigma=_final_sigma(cls, d, schedule), note=_scheduler_note(cls, d))
    return PREDICTIONS[pred], schedule, hint


def _beta_schedule(d: dict, where: str) -> str:
    """Our name (``BETAS``) for a scheduler config's beta_schedule with its beta_start and beta_end."""
    if d.get("trained_betas") is not None:
        raise ValueError(f"{where}: explicit trained_betas are not supported")
    beta = d.get("beta_schedule", "linear")
    got = (d.get("beta_start", 0.0001), d.get("beta_end", 0.02))
    kinds = {name: ends for name, (theirs, ends) in BETAS.items() if theirs == beta}
    if not kinds:
        raise ValueError(f"{where}: beta_schedule {beta!r} is not supported "
                         f"({sorted({theirs for theirs, _ in BETAS.values()})})")
    for name, ends in kinds.items():
        if ends is None or all(abs(a - b) <= 1e-12 for a, b in zip(got, ends)):
            return name
    raise ValueError(f"{where}: {beta} betas from {got[0]} to {got[1]} are not supported (supported: "
                     f"{', '.join(f'{a} to {b}' for a, b in kinds.values())})")


def _final_sigma(cls: str, d: dict, schedule: NoiseSchedule) -> float:
    """Where DDIM / PNDM end: 0 with set_alpha_to_one (their final alpha 1), else the sigma of timestep 0."""
    if cls not in ("DDIMScheduler", "PNDMScheduler"):
        return 0.0
    if d.get("set_alpha_to_one", cls == "DDIMScheduler"):  # diffusers' defaults: DDIM True, PNDM False
        return 0.0
    return float(vp_sigma_table(schedule.alphas_cumprod())[0])


def _scheduler_note(cls: str, d: dict) -> str:
    """Settings of the scheduler config that our samplers do not reproduce, named (empty if none)."""
    notes = []
    if cls == "PNDMScheduler" and not d.get("skip_prk_steps", False):
        notes.append("PNDMScheduler with skip_prk_steps=False: its Runge-Kutta warm-up steps are replaced by "
                     "PLMS's predictor-corrector first step (sampler 'plms'), so images differ from diffusers'")
    if cls == "PNDMScheduler" and d.get("prediction_type") == "v_prediction":
        notes.append("PNDMScheduler with v_prediction: diffusers averages the raw v outputs across steps, our 'plms' "
                     "averages eps estimates (as Stability's PLMS does), so images differ slightly")
    if cls in ("DDIMScheduler", "DDPMScheduler") and d.get("clip_sample", True):
        notes.append(f"{cls} with clip_sample=True: x0 is not clipped to [-1, 1] here")
    if d.get("thresholding"):
        notes.append(f"{cls} with thresholding=True: dynamic thresholding is not applied by default")
    return "; ".join(notes)


def schedule_to_diffusers(spec: DenoiserSpec, hint: SamplerHint) -> dict:
    inverse = {v: k for k, v in PREDICTIONS.items()}
    if spec.parameterization not in inverse:
        raise ValueError(f"a {spec.parameterization!r} model has no diffusers discrete scheduler counterpart")
    return {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": spec.schedule.num_timesteps,
            **_betas_to_diffusers(spec.schedule.betas), "prediction_type": inverse[spec.parameterization],
            "timestep_spacing": hint.schedule if hint.schedule in ("leading", "trailing", "linspace") else "leading",
            "steps_offset": hint.steps_offset, "rescale_betas_zero_snr": spec.schedule.zero_terminal_snr}


def low_res_scheduler_to_diffusers(noise: NoiseAugmentation) -> dict:
    """An x4 upscaler's low-res noise as the DDPMScheduler config of its ``low_res_scheduler/``."""
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": noise.num_timesteps,
            **_betas_to_diffusers(noise.betas)}


def _betas_to_diffusers(name: str) -> dict:
    """A scheduler config's beta_schedule (and beta_start, beta_end) for our beta schedule ``name``."""
    beta, ends = BETAS[name]
    return {"beta_schedule": beta, **(dict(zip(("beta_start", "beta_end"), ends)) if ends is not None else {})}


# ---------------------------------------------------------------------------------------------
# loading


def _component_weights(folder: Path) -> dict[str, Tensor]:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return read_state_file(folder / name)
    sharded = sorted(folder.glob("*.safetensors.index.json"))
    if sharded:
        index = _read_json(sharded[0])
        state: dict[str, Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            state.update(read_state_file(folder / shard))
        return state
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(WEIGHT_NAMES)}; found {present}); "
                            "fp16 'variant' files must be renamed or converted first")


def _text_encoders(folder: Path, index: dict, unet_cfg: dict, image_size: int) -> tuple[SDTextConfig, dict, list]:
    """The pipeline's CLIP text encoder(s) as one SDTextEncoder config + state + tokenizers.

    ``unet_cfg`` is the denoiser's diffusers config (SD3: the transformer's, for its joint width)."""
    cls = index["_class_name"]
    names = ["text_encoder"] + (["text_encoder_2"] if cls in ("StableDiffusionXLPipeline", SD3_PIPELINE) else [])
    specs, state, tokenizers = [], {}, []
    for i, name in enumerate(names):
        entry = index.get(name)
        if not entry or entry[1] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise ValueError(f"{folder}/model_index.json: {name} is {entry!r}; only CLIP text encoders are supported")
        hf = _read_json(folder / name / "config.json")
        projection = entry[1] == "CLIPTextModelWithProjection"
        # SD 1.x / 2.x: the final-normed last state; SDXL: penultimate states, pooled from the second; SD3:
        # penultimate states, pooled from both.
        specs.append(CLIPEncoderSpec(hf_config=hf, layer="penultimate" if len(names) == 2 else "last",
                                     projection=projection and len(names) == 2))
        weights = _component_weights(folder / name)
        weights.pop("text_model.embeddings.position_ids", None)  # a buffer, recomputed
        if projection and len(names) == 1:
            raise ValueError(f"{name}: a projection text encoder in a single-encoder pipeline is not supported")
        state.update({f"encoders.{i}.{k}": v for k, v in weights.items()})
        tok = "tokenizer" if i == 0 else "tokenizer_2"
        tokenizers.append(load_tokenizer(folder / tok))
    time_dim = (unet_cfg.get("addition_time_embed_dim") or 0) if cls == "StableDiffusionXLPipeline" else 0
    sd3 = cls == SD3_PIPELINE  # the CLIP context padded to the joint width, then 256 T5 tokens (or zeros)
    t5 = index.get("text_encoder_3") or [None, None]
    if sd3 and t5[1] is not None:
        if t5[1] != "T5EncoderModel":
            raise ValueError(f"{folder}/model_index.json: text_encoder_3 is {t5!r}; only T5EncoderModel is supported")
        weights = _component_weights(folder / "text_encoder_3")
        state.update({f"encoders.{len(specs)}.{k}": v for k, v in weights.items()})
        specs.append(CLIPEncoderSpec(hf_config=_read_json(folder / "text_encoder_3" / "config.json"), kind="t5",
                                     max_length=256))  # diffusers' SD3 max_sequence_length
        tokenizers.append(load_tokenizer(folder / "tokenizer_3", "t5"))
    config = SDTextConfig(encoders=specs, max_length=tokenizers[0].model_max_length if
                          tokenizers[0].model_max_length < 10_000 else 77,
                          time_embed_dim=time_dim, image_size=(image_size, image_size),
                          zero_empty_prompt=cls == "StableDiffusionXLPipeline" and
                          index.get("force_zeros_for_empty_prompt", True),
                          context_width=unet_cfg.get("joint_attention_dim", 4096) if sd3 else 0,
                          zero_tokens=256 if sd3 else 0)
    return config, state, tokenizers


def read_diffusers(folder: str | Path, dtype: torch.dtype | None = torch.float32) -> SDModel:
    """A diffusers StableDiffusion(XL)Pipeline folder -> SDModel, every component loaded strictly."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise ValueError(f"{folder} is a diffusers {cls!r}; supported pipelines: {sorted(PIPELINES)}")
    if cls == SD3_PIPELINE:
        return _read_sd3(folder, index, dtype)
    unet_d = _read_json(folder / "unet" / "config.json")
    vae_d = _read_json(folder / "vae" / "config.json")
    sched_d = _read_json(folder / "scheduler" / "scheduler_config.json")
    unet_cfg = unet_config_from_diffusers(unet_d, f"{folder}/unet/config.json")
    vae_cfg = vae_config_from_diffusers(vae_d, f"{folder}/vae/config.json")
    param, schedule, hint = schedule_from_diffusers(sched_d, f"{folder}/scheduler/scheduler_config.json")
    sample_size = (unet_d.get("sample_size") or 64) * vae_cfg.factor  # pixels
    text_cfg, text_state, tokenizers = _text_encoders(folder, index, unet_d, sample_size)
    if text_cfg.time_embed_dim and unet_cfg.vector_dim is not None:
        pooled = sum(s.hf_config.get("projection_dim", 0) for s in text_cfg.encoders if s.projection)
        if pooled + 6 * text_cfg.time_embed_dim != unet_cfg.vector_dim:
            raise ValueError(f"unet projection_class_embeddings_input_dim {unet_cfg.vector_dim} != pooled text "
                             f"{pooled} + 6 x addition_time_embed_dim {text_cfg.time_embed_dim}")
    spec = DenoiserSpec(parameterization=param, schedule=schedule, unet=unet_cfg)

    # Weights: one component at a time, each built on the meta device and assigned strictly.
    denoiser, unet_report = make_denoiser(spec, as_dtype(_component_weights(folder / "unet"), dtype))
    vae, vae_report = build_autoencoder(vae_cfg, as_dtype(_component_weights(folder / "vae"), dtype))
    text, text_report = build_sd_text_encoder(text_cfg, as_dtype(text_state, dtype), tokenizers)
    # SD 1.x conditions on OpenAI's CLIP (quick_gelu), SD 2.x on OpenCLIP (gelu).
    act = text_cfg.encoders[0].hf_config.get("hidden_act", "quick_gelu")
    family = "sdxl" if cls == "StableDiffusionXLPipeline" else ("sd1" if act == "quick_gelu" else "sd2")
    concat = _concat_fields(folder, index, unet_d, unet_cfg, vae_cfg.factor)
    return SDModel(index=ModelIndex(family=family, sample_size=sample_size, scheduler=hint, **concat),
                   autoencoder=vae, denoiser=denoiser, spec=spec, text_encoder=text,
                   reports=[unet_report, vae_report, text_report])


def _concat_fields(folder: Path, index: dict, unet_d: dict, unet_cfg: UNetConfig, factor: int) -> dict:
    """The model index's fields for what the U-Net's concat channels carry, checked against the pipeline class:
    an inpainting U-Net in a StableDiffusionInpaintPipeline; an x4 upscaler's (the low-res RGB image at the latent's
    size, noised by ``low_res_scheduler`` to the level its class embedding is given) in a
    StableDiffusionUpscalePipeline, which upscales by the VAE's factor."""
    cls = index["_class_name"]
    concat = split_input_channels(unet_d["in_channels"], unet_d["out_channels"], f"{folder}/unet/config.json")[2]
    if concat is not None and CONCAT_PIPELINES[concat] != cls or concat is None and cls in CONCAT_PIPELINES.values():
        kind = {INPAINT: "an inpainting", LOW_RES: "an x4 upscaler", None: "a text-to-image"}[concat]
        raise ValueError(f"{folder}: a {cls} whose U-Net has {unet_d['in_channels']} input channels: {kind} U-Net "
                         f"belongs in a {CONCAT_PIPELINES.get(concat, 'StableDiffusionPipeline')}")
    if concat != LOW_RES:
        return {"concat": concat}
    where = f"{folder}/low_res_scheduler/scheduler_config.json"
    low_res = _read_json(folder / "low_res_scheduler" / "scheduler_config.json")
    _require(low_res, where, {"_class_name": ["DDPMScheduler"], "rescale_betas_zero_snr": [False]})
    steps = low_res.get("num_train_timesteps", 1000)
    noise = NoiseAugmentation(betas=_beta_schedule(low_res, where), num_timesteps=steps,
                              max_level=index.get("max_noise_level", 350))
    noise.default_level = min(noise.default_level, noise.max_level)
    if unet_cfg.num_classes is None or unet_cfg.num_classes <= noise.max_level:
        raise ValueError(f"{folder}/unet/config.json: num_class_embeds {unet_cfg.num_classes} cannot embed the noise "
                         f"levels 0..{noise.max_level} (max_noise_level of model_index.json)")
    if noise.max_level >= noise.num_timesteps:
        raise ValueError(f"{folder}/model_index.json: max_noise_level {noise.max_level} is past the low-res "
                         f"scheduler's {noise.num_timesteps} timesteps")
    return {"concat": LOW_RES, "upscale": factor, "noise_augmentation": noise}


# ---------------------------------------------------------------------------------------------
# SD 3 / 3.5 folders


@reads_file(fix=_DAMAGED)
def flow_hint_from_diffusers(d: dict, where: str = "scheduler/scheduler_config.json") -> SamplerHint:
    """FlowMatchEulerDiscreteScheduler config -> Euler on the 'flow_match' grid with its shift; what is not
    reproduced is named in the hint's note."""
    if d.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{where}: an SD3 pipeline with a {d.get('_class_name')!r} is not supported "
                         "(expected FlowMatchEulerDiscreteScheduler)")
    defaults = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                "stochastic_sampling": False}
    changed = [f"{k}={d[k]!r}" for k, v in defaults.items() if d.get(k, v) != v]
    note = (f"FlowMatchEulerDiscreteScheduler settings not reproduced: {', '.join(changed)} (latentdiff samples "
            "euler on the shifted 'flow_match' grid)") if changed else ""
    if d.get("num_train_timesteps", 1000) != 1000:
        raise ValueError(f"{where}: num_train_timesteps {d['num_train_timesteps']} is not supported (1000)")
    return SamplerHint(sampler="euler", schedule="flow_match", flow_shift=float(d.get("shift", 1.0)), note=note)


def mmdit_config_to_diffusers(cfg) -> dict:
    """MMDiTConfig -> diffusers SD3Transformer2DModel config (the inverse of mmdit.config_from_diffusers)."""
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"an MMDiT with mlp_ratio {cfg.mlp_ratio} has no SD3Transformer2DModel counterpart (4.0)")
    return {
        "_class_name": "SD3Transformer2DModel", "sample_size": cfg.sample_size, "patch_size": cfg.patch_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.in_channels, "num_layers": cfg.depth,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim, "caption_projection_dim": cfg.hidden_size,
        "pooled_projection_dim": cfg.vector_dim, "pos_embed_max_size": cfg.pos_embed_max_size,
        "qk_norm": "rms_norm" if cfg.qk_norm else None, "dual_attention_layers": [],
    }


def _read_sd3(folder: Path, index: dict, dtype: torch.dtype | None) -> SDModel:
    """A StableDiffusion3Pipeline folder: MMDiT transformer, 16-channel VAE, CLIP-L/G and T5 (if present)."""
    from latentdiff.models.mmdit import config_from_diffusers as mmdit_config_from_diffusers

    tr_d = _read_json(folder / "transformer" / "config.json")
    vae_cfg = vae_config_from_diffusers(_read_json(folder / "vae" / "config.json"), f"{folder}/vae/config.json")
    hint = flow_hint_from_diffusers(_read_json(folder / "scheduler" / "scheduler_config.json"),
                                    f"{folder}/scheduler/scheduler_config.json")
    spec = DenoiserSpec(network="mmdit", parameterization="flow", mmdit=mmdit_config_from_diffusers(tr_d))
    sample_size = spec.mmdit.sample_size * vae_cfg.factor
    text_cfg, text_state, tokenizers = _text_encoders(folder, index, tr_d, sample_size)
    notes = []
    if (index.get("text_encoder_3") or [None, None])[1] is None:
        notes.append("no text_encoder_3 (T5): its 256 tokens are zeros, as in diffusers' SD3 pipeline without it")
    denoiser, report = make_denoiser(spec, as_dtype(_component_weights(folder / "transformer"), dtype))
    vae, vae_report = build_autoencoder(vae_cfg, as_dtype(_component_weights(folder / "vae"), dtype))
    text, text_report = build_sd_text_encoder(text_cfg, as_dtype(text_state, dtype), tokenizers)
    family = "sd35" if spec.mmdit.qk_norm else "sd3"
    return SDModel(index=ModelIndex(family=family, sample_size=sample_size, scheduler=hint), autoencoder=vae,
                   denoiser=denoiser, spec=spec, text_encoder=text, reports=[report, vae_report, text_report],
                   notes=notes)
