"""Tiny Stable-Diffusion-family models built offline from diffusers' and transformers' own classes.

Shared by the interop tests and benchmarks: a CLIP tokenizer from a vocabulary written here (single
characters, no merges), tiny CLIP text models, U-Nets and autoencoders with random weights, and whole
diffusers pipelines saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# What the shapes of a tiny SD 1 file cannot tell (real SD files get these from the family).
SD1_OVERRIDES = {"unet": {"num_heads": 2, "norm_groups": 8}, "vae": {"norm_groups": 4},
                 "text_encoder_0": {"num_attention_heads": 4}}

def write_tokenizer(folder: Path, pad: str = "<|endoftext|>") -> Path:
    """A CLIP BPE tokenizer over single characters; the special tokens take the highest ids, as in CLIP."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + "!,.")
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=16)
    tok.save_pretrained(folder)
    return folder


def clip_config(vocab_size: int, hidden: int = 32, layers: int = 3, projection: int | None = None, act="quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=16, hidden_act=act,
                          projection_dim=projection or hidden, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def tiny_unet(kind: str = "sd1", **kw):
    """A tiny diffusers UNet2DConditionModel in the SD 1.x, 2.x or XL layout."""
    import diffusers

    args = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (16, 32), "layers_per_block": 1,
                "cross_attention_dim": 32, "norm_num_groups": 8}
    if kind == "sd1":
        args.update(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    elif kind == "sd2":
        args.update(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                    use_linear_projection=True)
    elif kind == "sdxl":
        args.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                    transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=64,
                    addition_embed_type="text_time", addition_time_embed_dim=4,
                    projection_class_embeddings_input_dim=32 + 6 * 4)
    args.update(kw)
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**args).eval()


def tiny_vae(**kw):
    import diffusers

    args = {"block_out_channels": (8, 16), "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
                "sample_size": 16}
    args.update(kw)
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(**args).eval()


def tiny_sd_pipeline(folder: Path, scheduler: str = "euler", prediction: str = "epsilon", kind: str = "sd1",
                     set_alpha_to_one: bool = True) -> Path:
    """A tiny StableDiffusionPipeline with random weights, saved with save_pretrained; returns the folder.

    ``kind="sd2"``: linear projections, fixed head width, an OpenCLIP-style (gelu) text encoder."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tok_dir = write_tokenizer(folder.parent / f"{folder.name}_tok")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(clip_config(len(tokenizer), act="gelu" if kind == "sd2" else "quick_gelu")).eval()
    cls = {"euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler,
           "pndm": diffusers.PNDMScheduler}[scheduler]
    extra = {"euler": {}, "ddim": {"clip_sample": False, "set_alpha_to_one": set_alpha_to_one},
             "pndm": {"skip_prk_steps": True, "set_alpha_to_one": set_alpha_to_one}}[scheduler]
    sched = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
                steps_offset=1, prediction_type=prediction, **extra)
    pipe = diffusers.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                             unet=tiny_unet(kind), scheduler=sched, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline(folder: Path) -> Path:
    """A tiny StableDiffusionXLPipeline (two CLIP encoders, pooled text + size conditioning)."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    tok1 = CLIPTokenizer.from_pretrained(write_tokenizer(folder.parent / f"{folder.name}_tok1"))
    tok2 = CLIPTokenizer.from_pretrained(write_tokenizer(folder.parent / f"{folder.name}_tok2", pad="!"))
    torch.manual_seed(3)
    te1 = CLIPTextModel(clip_config(len(tok1), hidden=32)).eval()
    te2 = CLIPTextModelWithProjection(clip_config(len(tok2), hidden=32, projection=32, act="gelu")).eval()
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                               tokenizer_2=tok2, unet=tiny_unet("sdxl"), scheduler=sched,
                                               force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    return folder


def sd15_pipeline(folder: Path, dtype: torch.dtype = torch.float16) -> Path:
    """A Stable-Diffusion-1.5-shaped pipeline (U-Net 860M, VAE 84M, CLIP-L 123M) with random weights.

    The tokenizer is the tiny character-level one (the real CLIP vocabulary is a download); the text
    model has CLIP-L's full 49408-token embedding.
    """
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder.parent / f"{folder.name}_tok"))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(dtype)  # SD 1.x defaults
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                                  sample_size=512).to(dtype)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768)).to(dtype)
    sched = diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    steps_offset=1, skip_prk_steps=True)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def one_thread():
    """Generator for a module fixture: tiny models run fastest on one thread (no thread hand-off per op)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


UPSCALER_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02}  # the x4 upscaler's


def x4_upscale_pipeline(folder: Path, full: bool = False) -> Path:
    """A StableDiffusionUpscalePipeline in the published x4 upscaler's layout, random weights, saved with
    save_pretrained: 7 input channels, level 0 without attention, the attention levels cross-only except the last
    (only_cross_attention), the noise level as a class embedding (1000), a factor-4 VAE scaled by 0.08333, an
    OpenCLIP-style (gelu) text encoder, DDIM v-prediction and a DDPM low_res_scheduler; max_noise_level 350.
    ``full``: the real sizes (U-Net (256, 512, 512, 1024), 23-layer 1024-wide text model); else tiny ones."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder.parent / f"{folder.name}_tok"))
    torch.manual_seed(2)
    text_config = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                                 projection_dim=512) if full else clip_config(len(tokenizer), act="gelu")
    text_encoder = CLIPTextModel(text_config).eval()
    levels = 4 if full else 3
    sizes = {"block_out_channels": (256, 512, 512, 1024), "layers_per_block": 2, "cross_attention_dim": 1024,
             "attention_head_dim": 8, "sample_size": 128} if full else \
        {"block_out_channels": (8, 16, 16), "layers_per_block": 1, "cross_attention_dim": 32,
         "attention_head_dim": 2, "sample_size": 8, "norm_num_groups": 8}
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        in_channels=7, out_channels=4, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",), use_linear_projection=True,
        only_cross_attention=(True,) * (levels - 1) + (False,), num_class_embeds=1000, **sizes).eval()
    vae = tiny_vae(block_out_channels=(128, 256, 512) if full else (8, 8, 16), layers_per_block=2 if full else 1,
                   norm_num_groups=32 if full else 4, down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333)
    scheduler = diffusers.DDIMScheduler(**UPSCALER_BETAS, prediction_type="v_prediction", set_alpha_to_one=False,
                                        steps_offset=1, clip_sample=False)
    pipe = diffusers.StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                    low_res_scheduler=diffusers.DDPMScheduler(**UPSCALER_BETAS),
                                                    scheduler=scheduler, max_noise_level=350)
    pipe.save_pretrained(folder)
    return folder


def sd_with_peft_lora(root: Path, targets: list[str], r: int = 4, alpha: int = 8, seed: int = 0):
    """A tiny SD pipeline folder (``tiny_sd_pipeline``) in ``root/pipe`` and a random PEFT LoRA (B not zero) for
    its U-Net, saved by diffusers' ``save_lora_weights`` in ``root/lora``; returns (the pipeline folder, the LoRA
    file, its U-Net state dict as PEFT names it)."""
    import diffusers
    import peft
    from peft.utils import get_peft_model_state_dict

    folder = tiny_sd_pipeline(Path(root) / "pipe")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    state = get_peft_model_state_dict(pipe.unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        Path(root) / "lora", unet_lora_layers=state,
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    return folder, Path(root) / "lora" / "pytorch_lora_weights.safetensors", state
