"""CLIP text encoders as the Stable Diffusion families use them (through transformers, from local files).

- SD 1.x: CLIP ViT-L/14, last hidden state after the final LayerNorm, 77 tokens padded with the pad token.
- SD 2.x: OpenCLIP ViT-H/14 with its last layer removed (the original conditions on the penultimate
  layer and then applies the final LayerNorm; dropping the layer and taking the normed last state is
  the same thing, and is how diffusers stores it).
- SD3: CLIP-L and CLIP-G, both penultimate hidden states and projected pooled outputs, the context
  zero-padded to the MMDiT's joint width (4096) and followed by the T5-XXL encoder's last hidden states
  (256 tokens; zeros without T5, as diffusers does). T5 is an encoder of ``kind="t5"``: transformers'
  ``T5EncoderModel``, its tokens appended along the sequence rather than the features.
- SDXL: CLIP ViT-L (penultimate hidden state, no final norm) and OpenCLIP bigG (penultimate hidden
  state; its projected pooled output is the pooled vector), contexts concatenated on the feature axis
  (768 + 1280 = 2048), and the pooled vector followed by the Fourier-embedded micro-conditioning
  (original size, crop top-left, target size), as in Podell et al. 2023.

Prompts are padded to ``max_length`` and every token, padding included, is attended to (no mask),
which is what these models were trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoadReport,
    load_state_strict,
    read_component_config,
    read_weights,
    reading,
    write_json,
    write_safetensors,
)
from latentdiff.types import Cond

LAYERS = ("last", "penultimate")


@dataclass
class CLIPEncoderSpec:
    """One CLIP text model of an SD text encoder."""

    hf_config: dict = field(default_factory=dict)  # transformers CLIPTextConfig as a dict
    layer: str = "last"  # "last" (final-normed last hidden state) or "penultimate" (hidden_states[-2])
    projection: bool = False  # CLIPTextModelWithProjection: its text_embeds are the pooled vector
    kind: str = "clip"  # "clip" (features concatenated) or "t5" (T5EncoderModel: tokens appended to the sequence)
    max_length: int = 0  # tokens for this encoder (0: SDTextConfig.max_length); SD3's T5: 256


@dataclass
class SDTextConfig:
    """The text side of an SD-family model."""

    encoders: list = field(default_factory=list)  # CLIPEncoderSpec per encoder (dicts in config.json)
    max_length: int = 77  # tokens per prompt, padded
    time_embed_dim: int = 0  # SDXL: 256; > 0 appends Fourier(size, crop, target size) to the pooled vector
    image_size: tuple[int, int] = (1024, 1024)  # SDXL micro-conditioning: original = target size (h, w)
    zero_empty_prompt: bool = False  # SDXL: the empty prompt's context and pooled text are zeros, not encoded
    context_width: int = 0  # SD3: zero-pad the context's features to this width (the MMDiT's joint width)
    zero_tokens: int = 0  # SD3 without T5: this many all-zero tokens follow the CLIP tokens (diffusers' stand-in)


KINDS = ("clip", "t5")
T5_TIED = "encoder.embed_tokens.weight"  # T5EncoderModel's input embedding is shared.weight (files keep one)


def _clip_model(spec: CLIPEncoderSpec) -> nn.Module:
    """An (uninitialized on the current device) transformers CLIP text model (or T5 encoder) for a spec."""
    if spec.kind == "t5":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(**spec.hf_config))
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if spec.projection else CLIPTextModel
    return cls(CLIPTextConfig(**spec.hf_config))


def canonical_clip_key(key: str) -> str:
    """A CLIP text-model key in the file convention, ``text_model.*`` (transformers 5's CLIPTextModel drops
    the prefix in its own state dict, while files written by transformers 4 and original checkpoints keep it)."""
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def _native(model: nn.Module, key: str) -> str:
    """A canonical key as this transformers version's model names it."""
    return key if hasattr(model, "text_model") else key.removeprefix("text_model.")


def _fix_buffers(model: nn.Module) -> None:
    """Recreate the non-persistent position_ids buffer, which a meta-device build leaves unset."""
    emb = (model.text_model if hasattr(model, "text_model") else model).embeddings
    n = emb.position_embedding.weight.shape[0]
    emb.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
    for name, b in model.named_buffers():
        if b.is_meta:
            raise ValueError(f"text encoder buffer {name} was left unset by the load")


class SDTextEncoder(nn.Module):
    """One or two frozen CLIP text models with their tokenizers; ``prompts -> Cond``."""

    def __init__(self, config: SDTextConfig, models: list[nn.Module], tokenizers: list):
        super().__init__()
        specs = [s if isinstance(s, CLIPEncoderSpec) else CLIPEncoderSpec(**s) for s in config.encoders]
        if not specs or len(specs) != len(models) or len(models) != len(tokenizers):
            raise ValueError(f"need one model and one tokenizer per encoder spec, got {len(specs)} specs, "
                             f"{len(models)} models, {len(tokenizers)} tokenizers")
        for s in specs:
            if s.layer not in LAYERS:
                raise ValueError(f"CLIP layer must be one of {LAYERS}, got {s.layer!r}")
            if s.kind not in KINDS or (s.kind == "t5" and s.projection):
                raise ValueError(f"encoder kind must be one of {KINDS} (a T5 has no projection), got {s.kind!r}")
        self.config = dataclasses.replace(config, encoders=specs, image_size=tuple(config.image_size))
        self.encoders = nn.ModuleList(models).eval().requires_grad_(False)
        self.tokenizers = list(tokenizers)

    @property
    def dim(self) -> int:
        """Width of cond.context."""
        clip = sum(m.config.hidden_size for m, s in zip(self.encoders, self.config.encoders) if s.kind == "clip")
        return max(clip, self.config.context_width)

    @property
    def pooled_dim(self) -> int:
        """Width of cond.vector (0 when no encoder is pooled)."""
        pooled = sum(m.config.projection_dim for m, s in zip(self.encoders, self.config.encoders) if s.projection)
        return pooled + (6 * self.config.time_embed_dim if self.config.time_embed_dim else 0)

    def tokenize(self, tokenizer, prompts: list[str], max_length: int = 0) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length or self.config.max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids  # (B, max_length)

    @torch.no_grad()
    def forward(self, prompts: list[str], image_size: tuple[int, int] | None = None) -> Cond:
        """``image_size``: the (height, width) SDXL's micro-conditioning announces (None: ``config.image_size``)."""
        contexts, pooled, tokens = [], [], []
        for model, tok, spec in zip(self.encoders, self.tokenizers, self.config.encoders):
            ids = self.tokenize(tok, prompts, spec.max_length).to(model.device)
            if spec.kind == "t5":  # SD3: the last hidden state, no mask, appended after the CLIP tokens
                tokens.append(model(ids).last_hidden_state.float())  # (B, L_t5, D_t5)
                continue
            out = model(ids, output_hidden_states=spec.layer == "penultimate")
            h = out.hidden_states[-2] if spec.layer == "penultimate" else out.last_hidden_state  # (B, L, D)
            contexts.append(h.float())
            if spec.projection:
                pooled.append(out.text_embeds.float())  # (B, P)
        context = torch.cat(contexts, dim=-1)  # (B, L, sum D)
        vector = torch.cat(pooled, dim=-1) if pooled else None
        if self.config.zero_empty_prompt:  # diffusers' force_zeros_for_empty_prompt, sgm's zero txt uncond
            empty = torch.tensor([p == "" for p in prompts], device=context.device)
            context = context.masked_fill(empty[:, None, None], 0.0)
            vector = vector.masked_fill(empty[:, None], 0.0) if vector is not None else None
        if self.config.time_embed_dim:
            vector = torch.cat([vector, self.micro_conditioning(len(prompts), vector.device, image_size)], dim=-1)
        if self.config.context_width > context.shape[-1]:  # SD3: (B, 77, 2048) -> (B, 77, 4096)
            context = torch.nn.functional.pad(context, (0, self.config.context_width - context.shape[-1]))
        if tokens:  # SD3: (B, 77 + 256, 4096)
            context = torch.cat([context, *tokens], dim=1)
        elif self.config.zero_tokens:  # SD3 without T5: the same shape, zeros in T5's place
            zeros = context.new_zeros(context.shape[0], self.config.zero_tokens, context.shape[-1])
            context = torch.cat([context, zeros], dim=1)
        return Cond(context=context, vector=vector)

    @property
    def takes_image_size(self) -> bool:
        """Whether the pooled vector announces an image size (SDXL), so a caller should pass ``image_size``."""
        return bool(self.config.time_embed_dim)

    def micro_conditioning(self, batch: int, device, image_size: tuple[int, int] | None = None) -> Tensor:
        """SDXL's (original h, w, crop top, left, target h, w) ids, Fourier-embedded: (B, 6 * time_embed_dim);
        original = target = ``image_size`` (None: ``config.image_size``)."""
        from latentdiff.conditioning.sizes import size_embedding, size_ids

        ids = size_ids(1, *(image_size or self.config.image_size)).to(device)  # (1, 6)
        return size_embedding(ids, self.config.time_embed_dim).expand(batch, -1)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """The weights as ``encoders.{i}.text_model.*`` whatever the transformers version (a T5's under its
        own names, without the tied copy of ``shared.weight``)."""
        out = {}
        for k, v in self.state_dict().items():
            i, rest = k.removeprefix("encoders.").split(".", 1)
            if self.config.encoders[int(i)].kind == "t5":
                if rest != T5_TIED:
                    out[f"encoders.{i}.{rest}"] = v
            else:
                out[f"encoders.{i}.{canonical_clip_key(rest)}"] = v
        return out

    def save(self, folder: str | Path) -> None:
        """Write config.json, model.safetensors and one tokenizer folder per encoder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / WEIGHTS_NAME, self.canonical_state_dict())
        for i, tok in enumerate(self.tokenizers):
            tok.save_pretrained(folder / f"tokenizer_{i}")
        write_json(folder / CONFIG_NAME, {"type": "SDTextEncoder", "config": dataclasses.asdict(self.config)})


def build_sd_text_encoder(config: SDTextConfig, state: dict[str, Tensor], tokenizers: list,
                          name: str = "text_encoder") -> tuple[SDTextEncoder, LoadReport]:
    """Build the CLIP models on the meta device and assign ``state`` (keys ``encoders.{i}.*``) strictly."""
    specs = [s if isinstance(s, CLIPEncoderSpec) else CLIPEncoderSpec(**s) for s in config.encoders]
    with torch.device("meta"):
        models = [_clip_model(s) for s in specs]
    encoder = SDTextEncoder(dataclasses.replace(config, encoders=specs), models, tokenizers)
    native = {}
    for k, v in state.items():  # canonical (or native) names -> this transformers version's names
        head, i, rest = k.split(".", 2) if k.startswith("encoders.") else ("", "", k)
        if head and specs[int(i)].kind == "t5":
            native[k] = v
            if rest == "shared.weight":  # the tied input embedding: the same tensor under its second name
                native.setdefault(f"encoders.{i}.{T5_TIED}", v)
        else:
            native[f"{head}.{i}.{_native(models[int(i)], canonical_clip_key(rest))}" if head else k] = v
    report = load_state_strict(encoder, native, name, assign=True)
    for m, spec in zip(encoder.encoders, specs):
        if spec.kind == "clip":
            _fix_buffers(m)  # raises if any buffer is still on the meta device
    if any(p.is_meta for p in encoder.parameters()):
        raise ValueError(f"{name}: a parameter was left unset by the load")
    return encoder.eval(), report


def load_tokenizer(folder: str | Path, kind: str = "clip"):
    """A CLIP tokenizer from a local folder (tokenizer.json, or vocab.json + merges.txt), with a clear error;
    ``kind="t5"``: the T5 tokenizer (tokenizer.json or spiece.model) through AutoTokenizer."""
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = Path(folder)
    if kind == "t5":
        if not ((folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()):
            raise FileNotFoundError(f"no T5 tokenizer in {folder} (expected tokenizer.json or spiece.model)")
        return AutoTokenizer.from_pretrained(folder)
    has_json = (folder / "tokenizer.json").is_file()
    if not has_json and not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise FileNotFoundError(f"no CLIP tokenizer in {folder} (expected tokenizer.json, or vocab.json and "
                                "merges.txt)")
    return CLIPTokenizer.from_pretrained(folder)


def load_sd_text_encoder(folder: str | Path, verbose: bool = False) -> SDTextEncoder:
    """Open a text_encoder/ folder written by :meth:`SDTextEncoder.save`."""
    folder = Path(folder)
    cfg = read_component_config(folder, "SDTextEncoder", "an SD text encoder")
    with reading(folder / CONFIG_NAME):
        config = SDTextConfig(**cfg)
        specs = [s if isinstance(s, CLIPEncoderSpec) else CLIPEncoderSpec(**s) for s in config.encoders]
    tokenizers = [load_tokenizer(folder / f"tokenizer_{i}", s.kind) for i, s in enumerate(specs)]
    encoder, report = build_sd_text_encoder(config, read_weights(folder), tokenizers)
    if verbose:
        print(report)
    return encoder
