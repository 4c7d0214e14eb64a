"""Low-rank adapters (LoRA, Hu et al. 2021) for the Linear and Conv2d layers of any network: the one LoRA
implementation that fine-tuning, loaded LoRA files and distillation (LCM-LoRA) share.

A :class:`LoRA` is a module of its own: one :class:`LoRALayer` (``down``: rank x in, ``up``: out x rank, zero at
the start of training) per targeted layer, named by the layer's module path in the model it was made for. It
changes a model only once attached: ``lora.attach(model)`` puts a host (:class:`LoRALinear` / :class:`LoRAConv2d`,
subclasses of ``nn.Linear`` / ``nn.Conv2d`` that share the original weight and bias tensors) in place of each
targeted layer; the host computes ``W x + b + sum_i scale_i * up_i(down_i(x))`` over the LoRAs attached to it,
with ``scale = alpha / rank * weight`` (``weight``: the per-LoRA strength). The model's own ``state_dict`` is
unchanged by an attached LoRA (the adapters belong to the LoRA module, not to the hosts), so model folders,
checkpoints and strict loads work as before. ``detach`` puts the original layers back.

``merge`` adds ``scale * up @ down`` into the weights (no extra work per call); ``unmerge`` restores the weights
the layer had before its first merge, kept as a copy while anything is merged, so the round trip is exact,
bit for bit. Changing ``weight`` or ``enabled`` of a merged LoRA re-merges from that copy.

Several LoRAs may be attached to one model, each with its own ``weight``, and switched with ``enabled``.
Attaching, merging and changing weights mutate the model: do it before a model is shared between threads.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from latentdiff.io import write_safetensors

FORMAT = "latentdiff-lora"  # the ``format`` of our files' metadata
VERSION = 2  # 2: files may hold autoencoder adapters too (written as version 1 when they do not)
METADATA_KEY = "latentdiff_lora"  # safetensors metadata entry holding our JSON

# Module-name patterns (matched against a module's path: whole dotted components from the end, or a glob).
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
CONVOLUTIONS = ("resnets.*.conv1", "resnets.*.conv2", "resnets.*.conv_shortcut", "downsamplers.0.conv",
                "upsamplers.0.conv")
# An autoencoder's decoder convolutions (paths from the autoencoder: a LoRA that teaches the decoder new colours).
DECODER = ("decoder.conv_in", "decoder.conv_out", "decoder.*.conv1", "decoder.*.conv2", "decoder.*.conv_shortcut",
           "decoder.*.conv")
TARGET_GROUPS = {"attention": ATTENTION, "conv": CONVOLUTIONS,
                 "ff": ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"), "decoder": DECODER}


def expand_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Patterns with the group names (``attention``, ``conv``, ``ff``) replaced by their patterns."""
    out: list[str] = []
    for t in targets:
        out.extend(TARGET_GROUPS.get(t, (t,)))
    return tuple(dict.fromkeys(out))


def matches(name: str, pattern: str) -> bool:
    """A module path matches a pattern equal to it, to its last dotted components, or as a glob."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern) or \
        fnmatch.fnmatchcase(name, "*." + pattern)


def find_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The paths of ``model``'s Linear and Conv2d layers that match any pattern (model order); an error if none
    does, or if a pattern names a layer of another kind."""
    patterns = expand_targets(targets)
    names, unsupported = [], []
    for name, module in model.named_modules():
        if not name or not any(matches(name, p) for p in patterns):
            continue
        if _base_type(module) is None:
            if not any(_base_type(m) for m in module.children()):
                unsupported.append(f"{name} ({type(module).__name__})")
            continue
        names.append(name)
    if unsupported and not names:
        raise ValueError(f"LoRA targets {list(patterns)} name layers that are not Linear or Conv2d: {unsupported[:5]}")
    if not names:
        raise ValueError(f"no layer of this {type(model).__name__} matches the LoRA targets {list(patterns)}: name "
                         "module paths or their last parts, e.g. to_q, attn2.to_k, 'resnets.*.conv1', or the groups "
                         f"{sorted(TARGET_GROUPS)}")
    return names


def _base_type(module: nn.Module) -> type | None:
    """nn.Linear or nn.Conv2d for a layer a LoRA can adapt (hosts included), else None."""
    for cls in (nn.Linear, nn.Conv2d):
        if type(module) is cls or type(module) is _HOSTS.get(cls):
            return cls
    return None


class LoRALayer(nn.Module):
    """The low-rank update of one layer: ``delta W = up @ down`` (times the LoRA's scale)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 kernel: tuple[int, int] | None = None, conv: dict | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank, self.alpha = rank, float(alpha)
        self.conv = conv  # Conv2d: stride, padding, dilation of the adapted layer (down uses them, up is 1x1)
        tail = tuple(kernel) if kernel is not None else ()
        self.down = nn.Parameter(torch.empty(rank, in_features, *tail))
        self.up = nn.Parameter(torch.zeros(out_features, rank, *((1, 1) if kernel is not None else ())))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as nn.Linear's weight; up = 0: starts as the identity

    @classmethod
    def like(cls, layer: nn.Module, rank: int, alpha: float) -> LoRALayer:
        """A fresh adapter for a Linear or Conv2d layer."""
        if _base_type(layer) is nn.Linear:
            return cls(layer.out_features, layer.in_features, rank, alpha)
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError("LoRA adapts Conv2d layers with groups=1 and zero padding only")
        return cls(layer.out_channels, layer.in_channels, rank, alpha, kernel=layer.kernel_size,
                   conv={"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation})

    @property
    def ratio(self) -> float:
        """alpha / rank: the scale at weight 1."""
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        """up(down(x)), without the scale."""
        if self.conv is None:
            return F.linear(F.linear(x, self.down), self.up)
        return F.conv2d(F.conv2d(x, self.down, **self.conv), self.up)

    def delta(self) -> Tensor:
        """up @ down in the adapted layer's weight shape."""
        d = self.up.flatten(1) @ self.down.flatten(1)  # (out, in * kh * kw)
        return d.reshape(self.up.shape[0], *self.down.shape[1:])


class _Host:
    """What LoRALinear and LoRAConv2d add to their base class: the attached adapters, and the weight as it was
    before the first merge."""

    adapters: list[tuple[LoRA, LoRALayer]]
    original: Tensor | None

    def _lora_out(self, x: Tensor, y: Tensor) -> Tensor:
        for lora, layer in self.adapters:
            if lora.enabled and not lora.merged and lora.weight != 0:
                y = y + layer(x) * (layer.ratio * lora.weight)
        return y

    @torch.no_grad()
    def refresh(self) -> None:
        """Set the weight to the original plus the deltas of the merged, enabled LoRAs (in attach order); with
        none merged, the original itself (and forget the copy)."""
        merged = [(lora, layer) for lora, layer in self.adapters if lora.merged]
        if not merged:
            if self.original is not None:
                self.weight.copy_(self.original)
                self.original = None
            return
        if self.original is None:
            self.original = self.weight.detach().clone()
        w = self.original.clone()
        for lora, layer in merged:
            if lora.enabled and lora.weight != 0:
                w += (layer.delta() * (layer.ratio * lora.weight)).to(w.dtype)
        self.weight.copy_(w)


class LoRALinear(_Host, nn.Linear):
    """nn.Linear with LoRA adapters attached (sharing the original weight and bias)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._lora_out(x, F.linear(x, self.weight, self.bias))


class LoRAConv2d(_Host, nn.Conv2d):
    """nn.Conv2d with LoRA adapters attached (sharing the original weight and bias)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._lora_out(x, self._conv_forward(x, self.weight, self.bias))


_HOSTS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def _retype(module: nn.Module, cls: type) -> nn.Module:
    """A module of class ``cls`` holding the same parameters, buffers, children and settings as ``module``."""
    new = cls.__new__(cls)
    state = {k: v for k, v in vars(module).items() if k not in ("adapters", "original")}
    for k in ("_parameters", "_buffers", "_modules"):
        state[k] = dict(state[k])
    new.__dict__.update(state)
    if cls in _HOSTS.values():
        new.adapters, new.original = [], None
    return new


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class LoRA(nn.Module):
    """A set of low-rank adapters for named Linear / Conv2d layers of one model, with a strength (``weight``)."""

    def __init__(self, layers: dict[str, LoRALayer], *, rank: int, alpha: float, targets: tuple[str, ...] = (),
                 family: str | None = None, name: str = "lora", weight: float = 1.0):
        super().__init__()
        if not layers:
            raise ValueError("a LoRA needs at least one layer")
        self.names = list(layers)  # module paths in the model, in model order
        self.layers = nn.ModuleList(layers.values())
        self.rank, self.alpha = rank, float(alpha)  # the defaults the layers were made with (layers may differ)
        self.targets = tuple(targets)  # the patterns that chose the layers (recorded in saved files)
        self.family = family  # the network family it was made for (unet / dit / mmdit / ...), if known
        self.name = name
        self._weight, self._enabled, self.merged = float(weight), True, False
        self._bind(None)  # the model it is attached to

    def __getstate__(self) -> dict:
        """A copy (an EMA, a pickle) is not attached to the model and holds no merge."""
        return {**self.__dict__, "_model": None, "merged": False}

    @classmethod
    def create(cls, model: nn.Module, rank: int = 8, alpha: float | None = None,
               targets: Iterable[str] = ("attention",), family: str | None = None, name: str = "lora") -> LoRA:
        """A fresh LoRA (``up`` = 0: the model is unchanged until trained) for ``model``'s layers matching ``targets``
        (patterns or group names; ``alpha`` defaults to ``rank``, a scale of 1). Not yet attached."""
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha}")
        modules = dict(model.named_modules())
        ref = next(iter(model.parameters()), None)
        layers = {n: LoRALayer.like(modules[n], rank, alpha) for n in find_targets(model, targets)}
        lora = cls(layers, rank=rank, alpha=alpha, targets=expand_targets(targets), family=family, name=name)
        return lora.to(ref.device) if ref is not None else lora

    # --- strength and switching -------------------------------------------------------------------------------

    @property
    def weight(self) -> float:
        """The strength: scale = alpha / rank * weight (0: no effect)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"LoRA weight must be a finite number, got {value}")
        self._weight = value
        self._refresh()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self._refresh()

    # --- attaching ----------------------------------------------------------------------------------------------

    def check(self, model: nn.Module) -> None:
        """Every layer exists in ``model``, is a Linear / Conv2d and has the adapter's shape; else one error that
        lists what does not fit (nothing is changed)."""
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules or _base_type(modules[n]) is None]
        if missing:
            raise ValueError(f"LoRA {self.name!r}: {len(missing)} of {len(self.names)} layers are not Linear / Conv2d "
                             f"layers of this {type(model).__name__}: {listed(missing)}")
        wrong = []
        for n, layer in zip(self.names, self.layers):
            want = modules[n].weight.shape
            if (layer.up.shape[0], *layer.down.shape[1:]) != tuple(want) or \
                    (layer.conv is None) != (_base_type(modules[n]) is nn.Linear):
                wrong.append(f"{n}: adapter {tuple(layer.up.shape[:1]) + tuple(layer.down.shape[1:])}, "
                             f"layer {tuple(want)}")
        if wrong:
            raise ValueError(f"LoRA {self.name!r} was made for another architecture: {len(wrong)} layers differ in "
                             f"shape ({listed(wrong)})")

    def attach(self, model: nn.Module) -> LoRA:
        """Add the adapters to ``model``'s layers (checked first: nothing changes on an error); the LoRA moves to
        the model's device and dtype."""
        if self._model is not None:
            raise RuntimeError(f"LoRA {self.name!r} is already attached to a model: detach it first")
        self.check(model)
        fit_convs(self, model)
        weight = dict(model.named_modules())[self.names[0]].weight
        self.to(device=weight.device, dtype=weight.dtype if weight.dtype.is_floating_point else None)
        for n, layer in zip(self.names, self.layers):
            host = model.get_submodule(n)
            if type(host) not in _HOSTS.values():
                host = _retype(host, _HOSTS[_base_type(host)])
                _set_child(model, n, host)
            host.adapters.append((self, layer))
        self._bind(model)
        self._refresh()
        return self

    def detach(self) -> LoRA:
        """Take the adapters off again (unmerged first); a layer left with no adapter gets its original class."""
        model = self._require_attached()
        if self.merged:
            self.unmerge()
        for n in self.names:
            host = model.get_submodule(n)
            host.adapters = [(lora, layer) for lora, layer in host.adapters if lora is not self]
            if not host.adapters:
                _set_child(model, n, _retype(host, _base_type(host)))
        self._bind(None)
        return self

    def _bind(self, model: nn.Module | None) -> None:
        """Remember the model attached to, as a plain attribute: not a submodule, so the LoRA's ``state_dict`` and
        ``parameters`` (checkpoints, the optimizer, the EMA) stay its adapters' alone."""
        object.__setattr__(self, "_model", model)

    @property
    def attached(self) -> bool:
        return self._model is not None

    def merge(self) -> LoRA:
        """Add this LoRA's deltas into the layers' weights (exactly undone by ``unmerge``)."""
        self._require_attached()
        self.merged = True
        self._refresh()
        return self

    def unmerge(self) -> LoRA:
        """Take the deltas out again: the weights are the ones before the first merge (plus other merged LoRAs)."""
        self._require_attached()
        self.merged = False
        self._refresh(force=True)
        return self

    def _require_attached(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError(f"LoRA {self.name!r} is not attached to a model: lora.attach(model) first")
        return self._model

    def _refresh(self, force: bool = False) -> None:
        if self._model is not None and (self.merged or force):
            for host in self.hosts():
                host.refresh()

    def hosts(self) -> Iterator[nn.Module]:
        """The model's layers this LoRA is attached to."""
        model = self._require_attached()
        for n in self.names:
            yield model.get_submodule(n)

    # --- files --------------------------------------------------------------------------------------------------

    def to_state(self, prefix: str = "") -> dict[str, Tensor]:
        """The tensors as written to a file: ``{prefix}{module}.lora_A.weight`` (down) / ``.lora_B.weight`` (up),
        and ``.alpha`` for a layer whose alpha differs from the LoRA's."""
        out = {}
        for n, layer in zip(self.names, self.layers):
            out[f"{prefix}{n}.lora_A.weight"] = layer.down.detach().contiguous()
            out[f"{prefix}{n}.lora_B.weight"] = layer.up.detach().contiguous()
            if layer.alpha != self.alpha:
                out[f"{prefix}{n}.alpha"] = torch.tensor(layer.alpha)
        return out

    def metadata(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "rank": self.rank, "alpha": self.alpha,
                "targets": list(self.targets), "family": self.family, "name": self.name}


def listed(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


PREFIX = "denoiser."  # our files name the denoiser network's layers under this prefix
AUTOENCODER_PREFIX = "autoencoder."  # ... and the autoencoder's (its decoder's) under this one


def save_lora(path: str | Path, lora: LoRA, extra: dict | None = None, *, autoencoder: LoRA | None = None) -> Path:
    """Write ``lora`` as safetensors (atomically): its tensors under ``denoiser.``, our JSON in the metadata
    (format, version, rank, alpha, targets, family, name, and ``extra``, e.g. the base model). ``autoencoder``: a
    LoRA of the model's autoencoder (its decoder) in the same file, under ``autoencoder.``, its rank, alpha and
    targets in the metadata's ``autoencoder`` entry (version 2; files without one stay version 1)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are safetensors: {path} must end in .safetensors")
    meta = {**lora.metadata(), **(extra or {})}
    state = lora.to_state(PREFIX)
    if autoencoder is not None:
        ae = autoencoder.metadata()
        meta.update(version=2, autoencoder={k: ae[k] for k in ("rank", "alpha", "targets")})
        state.update(autoencoder.to_state(AUTOENCODER_PREFIX))
    else:
        meta["version"] = 1
    write_safetensors(path, {k: v.float().cpu() for k, v in state.items()},
                      metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def read_lora_metadata(path: str | Path) -> dict | None:
    """Our JSON from a LoRA file's metadata (None for other files)."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        return None
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata {METADATA_KEY} is not a {FORMAT} description")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{path} is a LoRA file of version {meta['version']}; this latentdiff reads up to {VERSION}: "
                         "upgrade latentdiff")
    return meta


def lora_from_pairs(pairs: dict[str, tuple[Tensor, Tensor, float | None]], *, default_alpha: float | None = None,
                    targets: tuple[str, ...] = (), family: str | None = None, name: str = "lora") -> LoRA:
    """A LoRA from ``{module path: (down, up, alpha or None)}`` as read from a file (alpha None: ``default_alpha``,
    else the layer's rank, a scale of 1). Shapes are checked against each other here, against a model in attach."""
    layers, bad = {}, []
    for n, (down, up, alpha) in pairs.items():
        rank = down.shape[0]
        conv = down.ndim == 4
        if up.ndim != down.ndim or up.shape[1] != rank or (conv and tuple(up.shape[2:]) != (1, 1)) or \
                down.ndim not in (2, 4):
            bad.append(f"{n}: down {tuple(down.shape)}, up {tuple(up.shape)}")
            continue
        a = alpha if alpha is not None else (default_alpha if default_alpha is not None else rank)
        layer = LoRALayer(up.shape[0], down.shape[1], rank, a, kernel=tuple(down.shape[2:]) if conv else None,
                          conv={"stride": 1, "padding": 0, "dilation": 1} if conv else None)
        with torch.no_grad():
            layer.down.copy_(down.float())
            layer.up.copy_(up.float())
        layers[n] = layer
    if bad:
        raise ValueError(f"LoRA {name!r}: down and up weights that do not form a low-rank pair: {listed(bad)}")
    ranks = [layer.rank for layer in layers.values()]
    rank = max(set(ranks), key=ranks.count)
    alpha = default_alpha if default_alpha is not None else float(rank)
    return LoRA(layers, rank=rank, alpha=alpha, targets=targets, family=family, name=name)


def fit_convs(lora: LoRA, model: nn.Module) -> None:
    """Give each Conv2d adapter the stride / padding / dilation of the layer it adapts (files do not hold them)."""
    modules = dict(model.named_modules())
    for n, layer in zip(lora.names, lora.layers):
        m = modules.get(n)
        if layer.conv is not None and m is not None and _base_type(m) is nn.Conv2d:
            layer.conv = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation}



class LoRASet:
    """The LoRAs one file makes for the parts of a model (the denoiser's network, the text encoder), used as one:
    one weight, one switch."""

    def __init__(self, loras: list[LoRA], roots: list[nn.Module], *, weight: float = 1.0, name: str = "lora",
                 format: str = "latentdiff", metadata: dict | None = None):
        if len(loras) != len(roots) or not loras:
            raise ValueError("a LoRA set needs one model part per LoRA, and at least one LoRA")
        self.loras, self.roots, self.name, self.format = list(loras), list(roots), name, format
        self.metadata = dict(metadata or {})  # our file's JSON (an LCM-LoRA's: its student settings); {} for others
        self.weight = weight

    @property
    def weight(self) -> float:
        return self.loras[0].weight

    @weight.setter
    def weight(self, value: float) -> None:
        for lora in self.loras:
            lora.weight = value

    @property
    def enabled(self) -> bool:
        return self.loras[0].enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for lora in self.loras:
            lora.enabled = value

    def attach(self) -> LoRASet:
        for lora, root in zip(self.loras, self.roots):
            lora.check(root)
        for lora, root in zip(self.loras, self.roots):
            lora.attach(root)
        return self

    def detach(self) -> LoRASet:
        return self._each("detach")

    def merge(self) -> LoRASet:
        return self._each("merge")

    def unmerge(self) -> LoRASet:
        return self._each("unmerge")

    def _each(self, method: str) -> LoRASet:
        for lora in self.loras:
            getattr(lora, method)()
        return self

    def __repr__(self) -> str:
        layers = sum(len(lora.names) for lora in self.loras)
        return f"LoRASet({self.name!r}, {self.format}, {layers} layers, weight {self.weight})"
