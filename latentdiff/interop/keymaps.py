"""Explicit key-map tables between original (CompVis/LDM, Stability "sgm", OpenCLIP) checkpoints and ours.

Our U-Net and autoencoder use diffusers' parameter names, and text encoders are transformers' CLIP
models, so "ours" means "diffusers'" throughout. A table is a list of :class:`Rule`; each rule takes
one original tensor to one or more of ours, with a named transform:

- ``copy``: the same tensor under another name;
- ``conv1x1``: a 1x1 conv weight (C, C, 1, 1) in the original, a Linear weight (C, C) in ours
  (the VAE's mid-block attention q/k/v/proj_out);
- ``transpose``: a matrix stored transposed (OpenCLIP's ``text_projection``, applied as ``x @ P``);
- ``split3``: a fused (3C, ...) tensor in the original, three (C, ...) tensors in ours (OpenCLIP's
  ``in_proj_weight`` -> q/k/v, SD3's ``attn.qkv``);
- ``swap_halves``: the two halves of the first dim exchanged (SD3's final adaLN linear gives
  (shift, scale), diffusers' AdaLayerNormContinuous and ours read (scale, shift)); its own inverse.

Tables are generated from a model config (the number of blocks depends on it) by one function per
model family: ``unet_rules``, ``vae_rules``, ``clip_rules``, ``openclip_rules``. A new family (SD3's
MMDiT) is one more such function. :class:`KeyMap` applies a table in both directions, and names every
tensor it could not place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from latentdiff.models.autoencoder import AutoencoderConfig
from latentdiff.models.mmdit import MMDiTConfig
from latentdiff.models.unet import UNetConfig

TRANSFORMS = ("copy", "conv1x1", "transpose", "split3", "swap_halves")


@dataclass(frozen=True)
class Rule:
    """One original tensor <-> one (or, for ``split3``, three) of ours."""

    original: str
    ours: tuple[str, ...]
    transform: str = "copy"


@dataclass
class KeyMap:
    """A table of rules with a prefix on each side; converts state dicts both ways."""

    rules: list[Rule]
    original_prefix: str = ""  # e.g. "model.diffusion_model."
    ours_prefix: str = ""  # e.g. "" (a component's own state dict)
    ignored: dict[str, str] = field(default_factory=dict)  # original key (no prefix) -> why it is dropped

    def __post_init__(self):
        for r in self.rules:
            if r.transform not in TRANSFORMS:
                raise ValueError(f"unknown transform {r.transform!r} in rule for {r.original}")
            if (r.transform == "split3") != (len(r.ours) == 3):
                raise ValueError(f"rule for {r.original}: split3 takes three targets, other transforms one")
        originals = [r.original for r in self.rules]
        ours = [k for r in self.rules for k in r.ours]
        if len(set(originals)) != len(originals) or len(set(ours)) != len(ours):
            raise ValueError("a key-map table names a tensor twice")

    def original_keys(self) -> set[str]:
        return {self.original_prefix + r.original for r in self.rules}

    def to_ours(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
        """Original tensors -> ours. Returns (converted, original keys the table wants but are absent,
        keys explicitly dropped). Keys outside the prefix are not looked at."""
        out, absent = {}, []
        for r in self.rules:
            key = self.original_prefix + r.original
            if key not in state:
                absent.append(key)
                continue
            t = state[key]
            if r.transform == "copy":
                out[self.ours_prefix + r.ours[0]] = t
            elif r.transform == "conv1x1":
                out[self.ours_prefix + r.ours[0]] = t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t
            elif r.transform == "transpose":
                out[self.ours_prefix + r.ours[0]] = t.T.contiguous()
            elif r.transform == "swap_halves":
                out[self.ours_prefix + r.ours[0]] = _swap_halves(t, key)
            else:  # split3
                if t.shape[0] % 3:
                    raise ValueError(f"{key} has shape {tuple(t.shape)}: a fused q/k/v needs a first dim divisible by 3")
                for name, part in zip(r.ours, t.chunk(3, dim=0)):
                    out[self.ours_prefix + name] = part.contiguous()
        dropped = [self.original_prefix + k for k in self.ignored if self.original_prefix + k in state]
        return out, absent, dropped

    def to_original(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Our tensors -> original names and layouts. Returns (converted, our keys the table wants but are absent)."""
        out, absent = {}, []
        for r in self.rules:
            keys = [self.ours_prefix + k for k in r.ours]
            missing = [k for k in keys if k not in state]
            if missing:
                absent.extend(missing)
                continue
            key = self.original_prefix + r.original
            t = state[keys[0]]
            if r.transform == "copy":
                out[key] = t
            elif r.transform == "conv1x1":
                out[key] = t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t
            elif r.transform == "transpose":
                out[key] = t.T.contiguous()
            elif r.transform == "swap_halves":
                out[key] = _swap_halves(t, keys[0])
            else:  # split3
                out[key] = torch.cat([state[k] for k in keys], dim=0)
        return out, absent


def _swap_halves(t: Tensor, key: str) -> Tensor:
    """(a, b) halves of the first dim -> (b, a)."""
    if t.shape[0] % 2:
        raise ValueError(f"{key} has shape {tuple(t.shape)}: swapping halves needs an even first dim")
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _params(original: str, ours: str, names=("weight", "bias"), transform: str = "copy") -> list[Rule]:
    """Rules for a module's parameters: original.{weight,bias} <-> ours.{weight,bias}."""
    return [Rule(f"{original}.{n}", (f"{ours}.{n}",), transform) for n in names]


# ---------------------------------------------------------------------------------------------
# U-Net: openaimodel.py (CompVis / Stability "sgm") <-> diffusers UNet2DConditionModel


def _unet_resnet(original: str, ours: str, has_shortcut: bool) -> list[Rule]:
    rules = (
        _params(f"{original}.in_layers.0", f"{ours}.norm1")
        + _params(f"{original}.in_layers.2", f"{ours}.conv1")
        + _params(f"{original}.emb_layers.1", f"{ours}.time_emb_proj")
        + _params(f"{original}.out_layers.0", f"{ours}.norm2")
        + _params(f"{original}.out_layers.3", f"{ours}.conv2")
    )
    if has_shortcut:
        rules += _params(f"{original}.skip_connection", f"{ours}.conv_shortcut")
    return rules


def _unet_transformer(original: str, ours: str, depth: int, cross: bool) -> list[Rule]:
    """SpatialTransformer <-> Transformer2DModel: identical names inside, only the prefix moves."""
    rules = _params(f"{original}.norm", f"{ours}.norm") + _params(f"{original}.proj_in", f"{ours}.proj_in")
    rules += _params(f"{original}.proj_out", f"{ours}.proj_out")
    for k in range(depth):
        o, d = f"{original}.transformer_blocks.{k}", f"{ours}.transformer_blocks.{k}"
        for attn in ("attn1", "attn2") if cross else ("attn1",):
            for proj in ("to_q", "to_k", "to_v"):
                rules += _params(f"{o}.{attn}.{proj}", f"{d}.{attn}.{proj}", names=("weight",))
            rules += _params(f"{o}.{attn}.to_out.0", f"{d}.{attn}.to_out.0")
        norms = ("norm1", "norm2", "norm3") if cross else ("norm1", "norm3")
        for norm in norms:
            rules += _params(f"{o}.{norm}", f"{d}.{norm}")
        rules += _params(f"{o}.ff.net.0.proj", f"{d}.ff.net.0.proj") + _params(f"{o}.ff.net.2", f"{d}.ff.net.2")
    return rules


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    """The SD 1.x / 2.x / XL U-Net table for a config (original names without ``model.diffusion_model.``)."""
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    levels, nrb = len(chans), cfg.num_res_blocks
    cross = cfg.context_dim is not None
    rules = _params("time_embed.0", "time_embedding.linear_1") + _params("time_embed.2", "time_embedding.linear_2")
    if cfg.num_classes is not None:
        rules.append(Rule("label_emb.weight", ("class_embedding.weight",)))
    if cfg.vector_dim is not None:
        rules += _params("label_emb.0.0", "add_embedding.linear_1") + _params("label_emb.0.2", "add_embedding.linear_2")
    rules += _params("input_blocks.0.0", "conv_in")

    # Down: input_blocks 1.. hold, per level, nrb (resnet[, transformer]) then one downsampler.
    idx, c_in = 1, chans[0]
    for i, c in enumerate(chans):
        for j in range(nrb):
            rules += _unet_resnet(f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{j}", c_in != c)
            if i in cfg.attention_levels:
                rules += _unet_transformer(f"input_blocks.{idx}.1", f"down_blocks.{i}.attentions.{j}",
                                           cfg.depth_at(i), cross)
            c_in, idx = c, idx + 1
        if i < levels - 1:
            rules += _params(f"input_blocks.{idx}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
            idx += 1

    # Middle: resnet, (transformer), resnet.
    rules += _unet_resnet("middle_block.0", "mid_block.resnets.0", False)
    if cfg.mid_attention:
        rules += _unet_transformer("middle_block.1", "mid_block.attentions.0", cfg.depth_at(levels - 1), cross)
    rules += _unet_resnet(f"middle_block.{2 if cfg.mid_attention else 1}", "mid_block.resnets.1", False)

    # Up: output_blocks hold, lowest level first, nrb + 1 (resnet[, transformer][, upsampler]); every
    # resnet takes a skip, so each has a shortcut conv.
    idx = 0
    for u, i in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            rules += _unet_resnet(f"output_blocks.{idx}.0", f"up_blocks.{u}.resnets.{j}", True)
            sub = 1
            if i in cfg.attention_levels:
                rules += _unet_transformer(f"output_blocks.{idx}.1", f"up_blocks.{u}.attentions.{j}",
                                           cfg.depth_at(i), cross)
                sub = 2
            if j == nrb and i > 0:
                rules += _params(f"output_blocks.{idx}.{sub}.conv", f"up_blocks.{u}.upsamplers.0.conv")
            idx += 1

    rules += _params("out.0", "conv_norm_out") + _params("out.2", "conv_out")
    return rules


def controlnet_rules(cfg: UNetConfig, embedding_convs: int) -> list[Rule]:
    """The original ControlNet table (lllyasviel's ``cldm.py``, names without ``control_model.``): the U-Net's encoder
    rows, ``input_hint_block`` (convolutions at even indices, SiLUs between: conv_in, ``embedding_convs`` blocks,
    conv_out), ``zero_convs.N.0`` and ``middle_block_out.0``."""
    decoder = ("up_blocks.", "conv_norm_out.", "conv_out.")
    rules = [r for r in unet_rules(cfg) if not r.ours[0].startswith(decoder)]
    rules += _params("input_hint_block.0", "controlnet_cond_embedding.conv_in")
    for k in range(embedding_convs):
        rules += _params(f"input_hint_block.{2 * (k + 1)}", f"controlnet_cond_embedding.blocks.{k}")
    rules += _params(f"input_hint_block.{2 * (embedding_convs + 1)}", "controlnet_cond_embedding.conv_out")
    skips = 1 + len(cfg.channel_mult) * (cfg.num_res_blocks + 1) - 1  # conv_in, the resnets, the downsamplers
    for n in range(skips):
        rules += _params(f"zero_convs.{n}.0", f"controlnet_down_blocks.{n}")
    return rules + _params("middle_block_out.0", "controlnet_mid_block")


# ---------------------------------------------------------------------------------------------
# Autoencoder: ldm/modules/diffusionmodules/model.py <-> diffusers AutoencoderKL


def _vae_resnet(original: str, ours: str, has_shortcut: bool) -> list[Rule]:
    rules = []
    for name in ("norm1", "conv1", "norm2", "conv2"):
        rules += _params(f"{original}.{name}", f"{ours}.{name}")
    if has_shortcut:
        rules += _params(f"{original}.nin_shortcut", f"{ours}.conv_shortcut")
    return rules


def _vae_mid(side: str, cfg: AutoencoderConfig, channels: int) -> list[Rule]:
    rules = _vae_resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", False)
    if cfg.mid_attention:
        o, d = f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0"
        rules += _params(f"{o}.norm", f"{d}.group_norm")
        for orig, ours in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            rules.append(Rule(f"{o}.{orig}.weight", (f"{d}.{ours}.weight",), "conv1x1"))
            rules.append(Rule(f"{o}.{orig}.bias", (f"{d}.{ours}.bias",)))
    rules += _vae_resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", False)
    return rules


def vae_rules(cfg: AutoencoderConfig) -> list[Rule]:
    """The KL autoencoder table (original names without ``first_stage_model.``)."""
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    levels = len(chans)
    rules = _params("encoder.conv_in", "encoder.conv_in")
    c_in = chans[0]
    for i, c in enumerate(chans):
        for j in range(cfg.num_res_blocks):
            rules += _vae_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                                 (c_in if j == 0 else c) != c)
        if i < levels - 1:
            rules += _params(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        c_in = c
    rules += _vae_mid("encoder", cfg, chans[-1])
    rules += _params("encoder.norm_out", "encoder.conv_norm_out") + _params("encoder.conv_out", "encoder.conv_out")

    # The decoder's original `up` list is indexed by resolution level (up.0 = full resolution) while
    # diffusers' up_blocks run lowest resolution first.
    rules += _params("decoder.conv_in", "decoder.conv_in")
    rules += _vae_mid("decoder", cfg, chans[-1])
    c_in = chans[-1]
    for u, i in enumerate(reversed(range(levels))):
        c = chans[i]
        for j in range(cfg.num_res_blocks + 1):
            rules += _vae_resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}",
                                 (c_in if j == 0 else c) != c)
        if i > 0:
            rules += _params(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv")
        c_in = c
    rules += _params("decoder.norm_out", "decoder.conv_norm_out") + _params("decoder.conv_out", "decoder.conv_out")
    if cfg.use_quant_conv:
        rules += _params("quant_conv", "quant_conv") + _params("post_quant_conv", "post_quant_conv")
    return rules


# ---------------------------------------------------------------------------------------------
# Text encoders: transformers CLIPTextModel (SD 1.x, SDXL's first) and OpenCLIP (SD 2.x, SDXL's second)


def clip_rules(num_layers: int, projection: bool = False) -> list[Rule]:
    """transformers' CLIP text model under another prefix: names identical (``text_model.*``)."""
    names = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(num_layers):
        p = f"text_model.encoder.layers.{i}"
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"{p}.{m}.weight", f"{p}.{m}.bias"]
    names += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    if projection:
        names.append("text_projection.weight")
    return [Rule(n, (n,)) for n in names]


def t5_rules(num_layers: int, gated: bool) -> list[Rule]:
    """transformers' T5EncoderModel under another prefix (SD3's ``text_encoders.t5xxl.transformer.``): names
    identical. ``encoder.embed_tokens.weight`` is tied to ``shared.weight`` and is not in the table."""
    names = ["shared.weight", "encoder.final_layer_norm.weight",
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    ff = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
    for i in range(num_layers):
        b = f"encoder.block.{i}.layer"
        names += [f"{b}.0.SelfAttention.{m}.weight" for m in "qkvo"] + [f"{b}.0.layer_norm.weight"]
        names += [f"{b}.1.DenseReluDense.{m}.weight" for m in ff] + [f"{b}.1.layer_norm.weight"]
    return [Rule(n, (n,)) for n in names]


def openclip_rules(num_layers: int, projection: bool) -> list[Rule]:
    """OpenCLIP's text tower (``transformer.resblocks.*``, fused in_proj) <-> transformers' CLIP text model."""
    rules = [
        Rule("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
        Rule("positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
    ]
    for i in range(num_layers):
        o, d = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        for n in ("weight", "bias"):
            rules.append(Rule(f"{o}.attn.in_proj_{n}", tuple(f"{d}.self_attn.{p}_proj.{n}" for p in "qkv"), "split3"))
        rules += _params(f"{o}.attn.out_proj", f"{d}.self_attn.out_proj") + _params(f"{o}.ln_1", f"{d}.layer_norm1")
        rules += _params(f"{o}.ln_2", f"{d}.layer_norm2") + _params(f"{o}.mlp.c_fc", f"{d}.mlp.fc1")
        rules += _params(f"{o}.mlp.c_proj", f"{d}.mlp.fc2")
    rules += _params("ln_final", "text_model.final_layer_norm")
    if projection:
        rules.append(Rule("text_projection", ("text_projection.weight",), "transpose"))
    return rules


def openclip_ignored(num_layers: int, total_layers: int, projection: bool) -> dict[str, str]:
    """OpenCLIP tensors a model deliberately leaves out, each with the reason (reported, never silent)."""
    why = "SD 2.x conditions on the penultimate layer, so the last layer is never run"
    ignored = {}
    for i in range(num_layers, total_layers):
        o = f"transformer.resblocks.{i}"
        for n in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                  "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias"):
            ignored[f"{o}.{n}"] = why
    if not projection:
        ignored["text_projection"] = "the pooled projection is not used for conditioning in this family"
    ignored["logit_scale"] = "CLIP's contrastive temperature, not used for conditioning"
    return ignored


# ---------------------------------------------------------------------------------------------
# MMDiT: Stability's SD3 reference (sd3_impls / mmdit.py) <-> diffusers SD3Transformer2DModel


def _mmdit_stream(original: str, ours: dict[str, str], context_pre_only: bool, qk_norm: bool) -> list[Rule]:
    """One stream of a joint block: ``x_block`` (image) or ``context_block`` (text).

    ``ours`` names this stream's modules: attn q/k/v (three names), the attention output, its norms,
    the adaLN linear and the MLP. A context-pre-only block keeps only q/k/v and a two-way adaLN.
    """
    rules = [Rule(f"{original}.attn.qkv.{n}", tuple(f"{q}.{n}" for q in ours["qkv"]), "split3")
             for n in ("weight", "bias")]
    if qk_norm:
        rules += [Rule(f"{original}.attn.ln_q.weight", (f"{ours['norm_q']}.weight",)),
                  Rule(f"{original}.attn.ln_k.weight", (f"{ours['norm_k']}.weight",))]
    # The pre-only text stream's adaLN is AdaLayerNormContinuous-like: (shift, scale) -> (scale, shift).
    rules += _params(f"{original}.adaLN_modulation.1", ours["ada"], transform="swap_halves" if context_pre_only
                     else "copy")
    if not context_pre_only:
        rules += _params(f"{original}.attn.proj", ours["out"])
        rules += _params(f"{original}.mlp.fc1", f"{ours['ff']}.net.0.proj") + _params(f"{original}.mlp.fc2",
                                                                                    f"{ours['ff']}.net.2")
    return rules


def mmdit_rules(cfg: MMDiTConfig) -> list[Rule]:
    """The SD3 / SD3.5 MMDiT table (original names without ``model.diffusion_model.``).

    The original fuses each stream's q/k/v into one ``attn.qkv`` (split3), calls the image stream
    ``x_block`` and the text stream ``context_block``, and orders its final adaLN outputs (shift,
    scale) where ours are (scale, shift) (swap_halves).
    """
    rules = [Rule("pos_embed", ("pos_embed.pos_embed",))]
    rules += _params("x_embedder.proj", "pos_embed.proj")
    rules += _params("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    rules += _params("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    rules += _params("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    rules += _params("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    rules += _params("context_embedder", "context_embedder")
    for i in range(cfg.depth):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == cfg.depth - 1
        rules += _mmdit_stream(f"{o}.x_block", {
            "qkv": (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), "norm_q": f"{d}.attn.norm_q",
            "norm_k": f"{d}.attn.norm_k", "ada": f"{d}.norm1.linear", "out": f"{d}.attn.to_out.0", "ff": f"{d}.ff",
        }, False, cfg.qk_norm)
        rules += _mmdit_stream(f"{o}.context_block", {
            "qkv": (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"),
            "norm_q": f"{d}.attn.norm_added_q", "norm_k": f"{d}.attn.norm_added_k",
            "ada": f"{d}.norm1_context.linear", "out": f"{d}.attn.to_add_out", "ff": f"{d}.ff_context",
        }, last, cfg.qk_norm)
    rules += _params("final_layer.linear", "proj_out")
    rules += _params("final_layer.adaLN_modulation.1", "norm_out.linear", transform="swap_halves")
    return rules
