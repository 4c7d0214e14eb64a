"""IP-Adapter weight files (Ye et al. 2023; tencent-ailab/IP-Adapter, the files diffusers' ``load_ip_adapter`` reads).

Layout: ``{"image_proj": {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}, "ip_adapter": {"1.to_k_ip.weight",
"1.to_v_ip.weight", "3.to_k_ip.weight", ...}}`` in a torch file (``ip-adapter_sd15.bin``), or the same with the two
names as key prefixes (``image_proj.proj.weight``, ``ip_adapter.1.to_k_ip.weight``) in a safetensors file. The
layers are numbered 1, 3, 5, ... over the cross-attentions in diffusers' ``attn_processors`` order (down path, up
path, middle; the even numbers were the self-attentions), which is ``UNet.cross_attentions``' order. We write the
safetensors layout (``save_ip_adapter``), and an adapter trained here (``latentdiff train-ip-adapter``) carries its
built-in image encoder in the same file: ``image_encoder.*`` tensors and its config in the metadata
(``latentdiff_image_encoder``), so it loads without ``image_encoder=``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from latentdiff.interop.files import SAFETENSORS, TORCH_FILES, read_safetensors
from latentdiff.io import load_state_strict, safe_torch_load, write_safetensors
from latentdiff.models.ip_adapter import IPAdapter, ShapesEncoderConfig, ShapesImageEncoder

PARTS = ("image_proj", "ip_adapter")
ENCODER = "image_encoder"  # our files: the built-in image encoder's tensors, and its metadata entry
ENCODER_METADATA = "latentdiff_image_encoder"


def read_ip_adapter_file(path: str | Path) -> dict[str, dict[str, Tensor]]:
    """The file's two parts, ``{"image_proj": {...}, "ip_adapter": {...}}``; an error naming what is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IP-Adapter file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS:
        flat = read_safetensors(path)
        parts = {p: {k[len(p) + 1:]: v for k, v in flat.items() if k.startswith(p + ".")} for p in (*PARTS, ENCODER)}
        other = sorted(k for k in flat if not k.startswith(tuple(p + "." for p in (*PARTS, ENCODER))))
        if other:
            raise ValueError(f"{path}: keys outside image_proj.* and ip_adapter.*: {other[:5]}; is it an IP-Adapter "
                             "file?")
    elif suffix in TORCH_FILES:
        try:
            obj = safe_torch_load(path)
        except ValueError as e:
            raise ValueError(f"{path} cannot be read without executing pickled code, which latentdiff refuses; "
                             "convert it to .safetensors with a tool you trust") from e
        parts = {p: obj.get(p) for p in PARTS} if isinstance(obj, dict) else {}
    else:
        raise ValueError(f"{path}: unknown weights format {suffix!r}; expected one of "
                         f"{', '.join(SAFETENSORS + TORCH_FILES)}")
    for p in PARTS:
        if not isinstance(parts.get(p), dict) or not parts[p]:
            raise ValueError(f"{path} has no {p!r} weights: an IP-Adapter file holds 'image_proj' and 'ip_adapter' "
                             "(the tencent-ailab / h94 layout diffusers' load_ip_adapter reads)")
    return parts


def builtin_image_encoder(path: str | Path) -> ShapesImageEncoder | None:
    """The built-in image encoder an adapter file of ours carries (``train-ip-adapter``), or None."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS:
        return None
    parts = read_ip_adapter_file(path)
    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get(ENCODER_METADATA)
    if not parts.get(ENCODER):
        return None
    if meta is None:
        raise ValueError(f"{path} holds image_encoder tensors but no {ENCODER_METADATA} metadata saying what they are")
    info = json.loads(meta)
    if info.get("type") != "shapes":
        raise ValueError(f"{path}: unknown built-in image encoder type {info.get('type')!r} (expected 'shapes')")
    encoder = ShapesImageEncoder(ShapesEncoderConfig(**info["config"]))
    load_state_strict(encoder, {k: v.float() for k, v in parts[ENCODER].items()}, f"image encoder of {path.name}")
    return encoder.eval()


def _image_proj_config(parts: dict, context_dim: int, path: Path) -> dict:
    """``IPAdapterConfig`` fields read off the projection's shapes: a plain IP-Adapter's Linear + LayerNorm, or an
    IP-Adapter plus Resampler (heads of 64 channels, as the original and diffusers assume); Full and FaceID files
    refused by name."""
    proj = parts["image_proj"]
    if "latents" in proj:
        return _resampler_config(proj, context_dim, path)
    if "proj.weight" not in proj or "proj.3.weight" in proj or "perceiver_resampler.proj_in.weight" in proj:
        raise ValueError(f"{path}: image_proj holds {sorted(proj)[:6]}, neither the plain IP-Adapter projection "
                         "(proj, norm) nor the plus Resampler (latents, proj_in, layers, proj_out, norm_out): a Full / "
                         "FaceID adapter is not supported")
    out, embed = proj["proj.weight"].shape
    if out % context_dim:
        raise ValueError(f"{path}: image_proj.proj.weight has shape {tuple(proj['proj.weight'].shape)}; its rows "
                         f"must be tokens x this model's context width {context_dim}: it was made for another model")
    return {"image_embed_dim": embed, "tokens": out // context_dim}


def _resampler_config(proj: dict, context_dim: int, path: Path) -> dict:
    need = ("latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight")
    missing = [k for k in need if k not in proj]
    if missing:
        raise ValueError(f"{path}: an IP-Adapter plus Resampler needs image_proj {missing}")
    _, tokens, hidden = proj["latents"].shape
    out = proj["proj_out.weight"].shape[0]
    if out != context_dim:
        raise ValueError(f"{path}: image_proj.proj_out.weight has shape {tuple(proj['proj_out.weight'].shape)}, this "
                         f"model's context is {context_dim} wide: it was made for another base model")
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    return {"image_embed_dim": proj["proj_in.weight"].shape[1], "tokens": tokens, "projection": "resampler",
            "hidden_dim": hidden, "depth": depth, "heads": max(1, proj["layers.0.0.to_q.weight"].shape[0] // 64),
            "ff_mult": proj["layers.0.1.1.weight"].shape[0] // hidden}


def ip_adapter_for_unet(path: str | Path, unet) -> IPAdapter:
    """An ``IPAdapter`` for our ``unet`` with the file's weights, strictly: a missing, unused or mis-shaped tensor is an
    error naming the key, its shape and what this model needs (before anything is returned)."""
    path = Path(path)
    parts = read_ip_adapter_file(path)
    layers = unet.cross_attentions() if hasattr(unet, "cross_attentions") else []
    if not layers:
        raise ValueError(f"{path}: an IP-Adapter needs a U-Net with cross-attention; this model's denoiser is "
                         f"{type(unet).__name__}")
    context_dim = unet.config.context_dim
    adapter = IPAdapter.for_unet(unet, **_image_proj_config(parts, context_dim, path))
    state = {f"image_proj.{k}": v for k, v in parts["image_proj"].items()}
    expected = {f"{2 * i + 1}.{which}.weight": (path_i, i) for i, (path_i, _) in enumerate(layers)
                for which in ("to_k_ip", "to_v_ip")}
    unused = sorted(set(parts["ip_adapter"]) - set(expected), key=_numbered)
    missing = sorted(set(expected) - set(parts["ip_adapter"]), key=_numbered)
    if unused or missing:
        raise ValueError(f"{path}: the ip_adapter layers do not fit this U-Net's {len(layers)} cross-attention layers "
                         f"(keys 1, 3, ..., {2 * len(layers) - 1}): missing {missing[:4]}, unused {unused[:4]}; it was "
                         "made for another base model")
    mine = adapter.state_dict()
    for key, (name, i) in expected.items():
        which = key.split(".")[1]
        ours = f"layers.{i}.{which}.weight"
        t = parts["ip_adapter"][key]
        if t.shape != mine[ours].shape:
            raise ValueError(f"{path}: ip_adapter key {key} has shape {tuple(t.shape)}, but {name} needs "
                             f"{tuple(mine[ours].shape)} (its width x the context width {context_dim}): it was made "
                             "for another base model")
        state[ours] = t
    for key, t in state.items():
        if key.startswith("image_proj.") and key in mine and t.shape != mine[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, this model needs {tuple(mine[key].shape)}")
    load_state_strict(adapter, {k: v.float() for k, v in state.items()}, f"IP-Adapter {path.name}")
    return adapter.eval()


def _numbered(key: str) -> tuple:
    head = key.split(".")[0]
    return (int(head) if head.isdigit() else 1 << 30, key)


def to_file_state(adapter: IPAdapter) -> dict[str, Tensor]:
    """The adapter's tensors under the file's (safetensors) names."""
    out = {f"image_proj.{k}": v for k, v in adapter.image_proj.state_dict().items()}
    for i, layer in enumerate(adapter.layers):
        for which in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * i + 1}.{which}.weight"] = getattr(layer, which).weight
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_ip_adapter(adapter: IPAdapter, path: str | Path, metadata: dict | None = None,
                    encoder: ShapesImageEncoder | None = None) -> Path:
    """Write the adapter as an IP-Adapter safetensors file (atomically), with its built-in image encoder if given."""
    path = Path(path)
    tensors, meta = to_file_state(adapter), {k: str(v) for k, v in (metadata or {}).items()}
    if encoder is not None:
        tensors.update({f"{ENCODER}.{k}": v.detach() for k, v in encoder.state_dict().items()})
        meta[ENCODER_METADATA] = json.dumps({"type": "shapes", "config": asdict(encoder.config)})
    write_safetensors(path, tensors, metadata=meta)
    return path
