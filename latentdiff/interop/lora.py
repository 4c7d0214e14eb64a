"""LoRA files onto our models: our own format, diffusers / PEFT (``lora_A`` / ``lora_B``), the older diffusers
layouts (``lora.down`` / ``lora.up``, attention ``processor`` keys, ``lora_linear_layer``) and kohya's sd-scripts
(``lora_unet_..._lora_down.weight``, ``lora_up``, ``.alpha``; ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``).

Our U-Net and MMDiT use diffusers' module names, so a diffusers key names our layer directly; kohya's names are
the same paths with ``_`` for ``.`` (SD 1.x: diffusers' U-Net; SDXL: the original ``input_blocks`` layout, mapped
through ``keymaps.unet_rules``). Text-encoder layers load onto our CLIP text encoders (``SDTextEncoder``), whatever
the transformers version calls them; any other text encoder refuses them by name.

Every key is accounted for: a key of a kind we do not read (LyCORIS, DoRA, biases), a layer that no model layer
matches, or an adapter whose shape does not fit its layer is an error listing them, raised before any weight
changes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from latentdiff.conditioning.clip import SDTextEncoder, canonical_clip_key
from latentdiff.interop.files import read_state_file
from latentdiff.interop.keymaps import unet_rules
from latentdiff.models.families import family_of
from latentdiff.models.lora import METADATA_KEY, LoRASet, listed, lora_from_pairs, read_lora_metadata
from latentdiff.models.unet import UNet

DENOISER = "denoiser"
AUTOENCODER = "autoencoder"  # our files' autoencoder (decoder) adapters, ``autoencoder.decoder....``
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # diffusers' names, encoder 0, 1, 2
_DIFFUSERS_PREFIXES = {"unet": DENOISER, "transformer": DENOISER, DENOISER: DENOISER, AUTOENCODER: AUTOENCODER,
                       **{t: t for t in TEXT_ENCODERS}}
_KOHYA_PREFIXES = {"lora_unet_": DENOISER, "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_UNSUPPORTED = {"hada_": "LoHa (LyCORIS)", "lokr_": "LoKr (LyCORIS)", "lora_mid": "LoCon with a mid weight (LyCORIS)",
                "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_B.bias": "LoRA biases (lora_bias)",
                ".diff": "full weight differences", "oft_": "OFT", "boft_": "BOFT"}
# diffusers' older attention-processor names -> our layer names (the U-Net's and CLIP's)
_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class Adapter:
    """One layer's adapter as a file holds it (names still the file's)."""

    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """A LoRA file's tensors and its metadata (our JSON under ``latentdiff_lora``, diffusers' under
    ``lora_adapter_metadata``; other files: {})."""
    path = Path(path)
    state = read_state_file(path)
    meta: dict = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        ours = read_lora_metadata(path)
        if ours is not None:
            meta[METADATA_KEY] = ours
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            meta["lora_adapter_metadata"] = json.loads(raw)
    return state, meta


def split_lora(state: dict[str, Tensor], meta: dict, source: str = "the LoRA file"
               ) -> tuple[str, dict[str, dict[str, Adapter]]]:
    """The file's format and its adapters: ``{component: {layer name as the file writes it: Adapter}}``, the
    component ``denoiser`` or a diffusers text-encoder name. Keys we cannot read are an error naming them."""
    unsupported = sorted(k for k in state if any(s in k for s in _UNSUPPORTED))
    if unsupported:
        kinds = sorted({v for s, v in _UNSUPPORTED.items() for k in unsupported if s in k})
        raise ValueError(f"{source} holds {', '.join(kinds)} weights, which latentdiff does not load (plain LoRA "
                         f"only): {listed(unsupported)}")
    if METADATA_KEY in meta:
        fmt, parts, rest = "latentdiff", *_split_diffusers(state)
    elif any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in state):
        fmt, parts, rest = "kohya", *_split_kohya(state)
    else:
        fmt, parts, rest = "diffusers", *_split_diffusers(state)
    if rest:
        raise ValueError(f"{source} ({fmt} format): {len(rest)} keys are not LoRA weights latentdiff can read: "
                         f"{listed(sorted(rest))}")
    incomplete = [f"{c}: {n}" for c, layers in parts.items() for n, a in layers.items() if a.down is None or a.up is None]
    if incomplete:
        raise ValueError(f"{source}: layers without both a down and an up weight: {listed(incomplete)}")
    _alphas_from_metadata(parts, meta.get("lora_adapter_metadata"), source)
    return fmt, parts


def _split_kohya(state: dict[str, Tensor]) -> tuple[dict, list[str]]:
    parts: dict[str, dict[str, Adapter]] = {}
    rest = []
    for key, t in state.items():
        name, _, suffix = key.partition(".")
        prefix = next((p for p in _KOHYA_PREFIXES if name.startswith(p)), None)
        if prefix is None or suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            rest.append(key)
            continue
        a = parts.setdefault(_KOHYA_PREFIXES[prefix], {}).setdefault(name[len(prefix):], Adapter())
        if suffix == "alpha":
            a.alpha = float(t)
        elif suffix == "lora_down.weight":
            a.down = t
        else:
            a.up = t
    return parts, rest


_DIFFUSERS_KEY = re.compile(
    r"^(?P<layer>.+?)\.(?:lora_(?P<ab>[AB])\.weight|lora\.(?P<du>down|up)\.weight|"
    r"lora_linear_layer\.(?P<ll>down|up)\.weight|(?P<alpha>alpha))$")
_PROCESSOR_KEY = re.compile(r"^(?P<parent>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora\."
                            r"(?P<du>down|up)\.weight$")


def _split_diffusers(state: dict[str, Tensor]) -> tuple[dict, list[str]]:
    parts: dict[str, dict[str, Adapter]] = {}
    rest = []
    for key, t in state.items():
        head, _, tail = key.partition(".")
        component = _DIFFUSERS_PREFIXES.get(head)
        body = tail if component else key  # older files name the U-Net's layers without a prefix
        component = component or DENOISER
        m = _PROCESSOR_KEY.match(body)
        if m:  # diffusers' attention-processor LoRAs: the projection named by the processor
            table = _TEXT_PROCESSOR if component != DENOISER else _PROCESSOR
            layer, which = f"{m['parent']}.{table[m['proj']]}", m["du"]
        else:
            m = _DIFFUSERS_KEY.match(body)
            if not m:
                rest.append(key)
                continue
            layer = m["layer"]
            which = "alpha" if m["alpha"] else {"A": "down", "B": "up"}.get(m["ab"]) or m["du"] or m["ll"]
        a = parts.setdefault(component, {}).setdefault(layer, Adapter())
        if which == "alpha":
            a.alpha = float(t)
        else:
            setattr(a, which, t)
    return parts, rest


def _alphas_from_metadata(parts: dict[str, dict[str, Adapter]], meta: dict | None, source: str) -> None:
    """diffusers' ``lora_adapter_metadata`` (PEFT's LoraConfig per component): ``lora_alpha`` and ``alpha_pattern``
    give the alphas the keys do not (without either, alpha = rank: a scale of 1, as diffusers does)."""
    if not meta:
        return
    for component, layers in parts.items():
        names = [c for c, ours in _DIFFUSERS_PREFIXES.items() if ours == component and f"{c}.lora_alpha" in meta]
        if not names:
            continue
        c = names[0]
        for flag, what in (("use_rslora", "rank-stabilized LoRA (alpha / sqrt(rank))"), ("use_dora", "DoRA")):
            if meta.get(f"{c}.{flag}"):
                raise ValueError(f"{source} is a {what}, which latentdiff does not load")
        patterns = meta.get(f"{c}.alpha_pattern") or {}
        for layer, a in layers.items():
            if a.alpha is None:
                hit = [v for p, v in patterns.items() if re.fullmatch(rf"(.*\.)?{p}", layer)]
                a.alpha = float(hit[0] if hit else meta[f"{c}.lora_alpha"])


# --- names in the file -> our layers ------------------------------------------------------------------------


def _layer_names(model: nn.Module, canonical=lambda n: n) -> dict[str, str]:
    """Names by which a file may call each adaptable layer (dotted, and kohya's underscored) -> its path."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            c = canonical(n)
            out[c] = out[c.replace(".", "_")] = n
    return out


def _denoiser_names(network: nn.Module) -> dict[str, str]:
    names = _layer_names(network)
    if isinstance(network, UNet):  # SDXL kohya files use the original (CompVis / sgm) layout
        for rule in unet_rules(network.config):
            if rule.original.endswith(".weight") and rule.transform == "copy":
                ours = rule.ours[0].removesuffix(".weight")
                if ours in names:
                    names.setdefault(rule.original.removesuffix(".weight").replace(".", "_"), ours)
    return names


def _text_names(text_encoder: nn.Module, index: int, source: str, n_layers: int) -> dict[str, str]:
    clip = text_encoder if isinstance(text_encoder, SDTextEncoder) else None
    if clip is None:
        raise ValueError(f"{source} holds {n_layers} text-encoder layers, but this model's text encoder is a "
                         f"{type(text_encoder).__name__}, not a CLIP text encoder: latentdiff loads text-encoder "
                         "LoRAs onto CLIP encoders only (load a LoRA trained for this model, or one without "
                         "text-encoder weights)")
    if index >= len(text_encoder.encoders):
        raise ValueError(f"{source} holds {n_layers} layers for text encoder {index + 1}, but this model has "
                         f"{len(text_encoder.encoders)}")
    kind = text_encoder.config.encoders[index].kind
    names = _layer_names(text_encoder.encoders[index], canonical_clip_key if kind == "clip" else (lambda n: n))
    return {k: f"encoders.{index}.{v}" for k, v in names.items()}


def lora_for_model(path: str | Path, network: nn.Module, text_encoder: nn.Module | None = None, *,
                   autoencoder: nn.Module | None = None, weight: float = 1.0, name: str | None = None) -> LoRASet:
    """Read a LoRA file and make its LoRAs for ``network`` (a denoiser's network), ``text_encoder`` and
    ``autoencoder`` (our files' decoder adapters), checked against them (names and shapes) but not yet attached:
    ``.attach()`` the result."""
    path = Path(path)
    source = str(path)
    state, meta = read_lora(path)
    fmt, parts = split_lora(state, meta, source)
    ours = meta.get(METADATA_KEY)
    if ours and ours.get("family") and family_of(network) and ours["family"] != family_of(network):
        raise ValueError(f"{source} is a LoRA for a {ours['family']} denoiser; this model's denoiser is a "
                         f"{family_of(network)}")
    name = name or path.stem
    loras, unmatched = [], []
    for component, adapters in parts.items():
        root, names = _component_root(component, adapters, network, text_encoder, autoencoder, source)
        pairs = {}
        for n, a in adapters.items():
            target = names.get(canonical_clip_key(n) if component in TEXT_ENCODERS and "." in n else n)
            if target is None:
                unmatched.append(f"{component}: {n}")
            else:
                pairs[target] = (a.down, a.up, a.alpha)
        if pairs:
            own = (ours.get(AUTOENCODER) or {}) if ours and component == AUTOENCODER else (ours or {})
            lora = lora_from_pairs(pairs, default_alpha=own.get("alpha"), targets=tuple(own.get("targets", ())),
                                   family=family_of(network) if component == DENOISER else None,
                                   name=f"{name}:{component}")
            loras.append((lora, root))
    if unmatched:
        raise ValueError(f"{source} ({fmt} format): {len(unmatched)} LoRA layers match no layer of this model "
                         f"(a LoRA for another model?): {listed(unmatched)}")
    for lora, root in loras:
        lora.check(root)  # shapes: a LoRA for another architecture fails here, before anything is attached
    return LoRASet([lora for lora, _ in loras], [root for _, root in loras], weight=weight, name=name,
                   format=fmt, metadata=ours)


def _component_root(component: str, adapters: dict, network: nn.Module, text_encoder: nn.Module | None,
                    autoencoder: nn.Module | None, source: str) -> tuple[nn.Module, dict[str, str]]:
    """The model part a file's component loads onto, and the names by which the file may call its layers."""
    if component == DENOISER:
        return network, _denoiser_names(network)
    if component == AUTOENCODER:
        if autoencoder is None:
            raise ValueError(f"{source} holds {len(adapters)} autoencoder (decoder) layers, and no autoencoder was "
                             "given to load them on")
        return autoencoder, _layer_names(autoencoder)
    if text_encoder is None:
        raise ValueError(f"{source} holds text-encoder layers, and no text encoder was given to load them on")
    return text_encoder, _text_names(text_encoder, TEXT_ENCODERS.index(component), source, len(adapters))
