"""OpenVINO on CPUs: a torch module converted (``openvino.convert_model``) and compiled once per input shape.

A ``Compiled`` module keeps one compiled model per set of input shapes (static shapes: the fastest CPU kernels).
The converted model is kept on disk under ``cache_root()`` (``$LATENTDIFF_CACHE/openvino``, else
``~/.cache/latentdiff/openvino``) in a folder named by a hash of the weights, the input shapes, int8 and the OpenVINO
version, so changed weights, shapes or another OpenVINO never reuse a stale model; OpenVINO's own compiled blobs sit
inside, one folder per precision hint (``CACHE_DIR``, which OpenVINO keys by model, device and settings). ``OpenVINONetwork`` stands in for a denoiser network
(``network(x, c_noise, cond)``), ``OpenVINODecoder`` / ``OpenVINOEncoder`` for the autoencoder's halves.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff.io import atomic_folder, write_json
from latentdiff.models.layers import self_attention_perturbed
from latentdiff.types import Cond

MISSING = "the OpenVINO backend needs the openvino package: pip install 'latentdiff[openvino]'"
HINTS = {"fp32": "f32", "bf16": "bf16"}  # our precision names -> OpenVINO's INFERENCE_PRECISION_HINT
FORMAT = 1  # what a cache folder holds; bump when that changes
COND_FIELDS = ("context", "context_mask", "vector", "concat")  # the Cond fields a compiled network takes
CONVERSIONS = {"count": 0}  # how many torch -> OpenVINO conversions this process ran (tests read it)
# Parts of a denoiser's graph that a bf16 hint may keep in fp32 (``keep_fp32``): OpenVINO operation types, or pieces
# of the converted nodes' names (the torch module path). "time" is the sinusoidal embedding of the noise level
# (``_time_embedding_ops``): in bf16, c_noise * frequency (c_noise up to 1000) keeps 8 bits, and sin / cos of it drift;
# "time-mlp" adds the embedding's MLP and every resnet's projection of it (no better, and slower: BENCHMARKS.md).
KEEP_FP32 = {"time": {},
             "time-mlp": {"names": ("time_embedding", "time_emb_proj")},
             "norm": {"types": ("GroupNormalization", "MVN")},
             "attention": {"types": ("ScaledDotProductAttention", "Softmax")}}
DEFAULT_KEEP_FP32 = ("time",)  # what the bf16 hint keeps in fp32 unless told otherwise (BENCHMARKS.md)
# The rt_info entry that makes OpenVINO's CPU plugin leave a node in its original precision under a low-precision
# hint (``ov::disable_conversion``'s ``DisablePrecisionConversion``, from any type to any); the Python API cannot make
# one, so it is written into the model's XML.
_PRECISE = '<rt_info><attribute name="DisablePrecisionConversion" version="0" value="dynamic:dynamic" /></rt_info>'


def import_openvino():
    """The openvino module, or an ImportError that says how to install it."""
    try:
        with declined_telemetry():  # openvino's converter asks for telemetry consent on import
            import openvino
    except ImportError as e:
        raise ImportError(MISSING) from e
    return openvino


@contextlib.contextmanager
def declined_telemetry():
    """OpenVINO's usage telemetry declined for what runs inside (its import, ``convert_model``, which asks for
    consent again on every call). It sends each event from a process forked off a worker thread; offline, such a
    child can deadlock, and Python's exit then waits on it for ever (CI was left with 145 of them). The converter
    declines in CI, which it reads from the environment variable CI, so CI=true is set for the duration."""
    saved = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CI"]
        else:
            os.environ["CI"] = saved


def openvino_version() -> str:
    """The installed OpenVINO's version (part of every cache key: another version's cache is rebuilt)."""
    return import_openvino().get_version()


def cpu_precision(precision: str = "auto") -> str:
    """"fp32" or "bf16": ``"auto"`` is bf16 where the CPU computes in it natively (OpenVINO's
    ``OPTIMIZATION_CAPABILITIES`` lists BF16: AVX-512-BF16, AMX), else fp32."""
    if precision == "auto":
        caps = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return "bf16" if "BF16" in caps else "fp32"
    if precision not in HINTS:
        raise ValueError(f"OpenVINO precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return precision


def cache_root() -> Path:
    """Where converted models are kept: ``$LATENTDIFF_CACHE/openvino``, else ``~/.cache/latentdiff/openvino``."""
    base = os.environ.get("LATENTDIFF_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "latentdiff") / "openvino"


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's class, tensor names, dtypes, shapes and bytes."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Compiled:
    """A torch module taking only tensors, run by OpenVINO: converted and compiled once per set of input shapes,
    the converted model cached on disk. ``int8``: weights compressed to int8 (``nncf.compress_weights``,
    weight-only; activations stay in the precision hint's type). ``fallback``: a module OpenVINO cannot convert
    runs in torch (said once on stderr); otherwise that is an error naming the module. ``keep_fp32``: with the bf16
    hint, the parts of the graph (``KEEP_FP32``'s names) that run in fp32 all the same."""

    def __init__(self, module: nn.Module, name: str, precision: str = "auto", int8: bool = False,
                 fallback: bool = False, cache_dir: str | Path | None = None, keep_fp32: tuple[str, ...] = ()):
        self.ov = import_openvino()
        self.module, self.name, self.int8, self.fallback = module, name, int8, fallback
        unknown = sorted(set(keep_fp32) - set(KEEP_FP32))
        if unknown:
            raise ValueError(f"keep_fp32 takes {sorted(KEEP_FP32)}, got {unknown}")
        self.keep_fp32 = tuple(sorted(set(keep_fp32)))
        self.precision = cpu_precision(precision)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
        self.core = self.ov.Core()
        self._compiled: dict[tuple, object] = {}
        self._digest: str | None = None
        self.failed: str | None = None  # why conversion failed (with fallback: the module runs in torch)

    def __call__(self, *inputs: Tensor) -> Tensor:
        if self.failed is not None:
            return self.module(*inputs)
        key = tuple((tuple(t.shape), str(t.dtype)) for t in inputs)
        if key not in self._compiled:
            compiled = self._load(key, inputs)
            if compiled is None:
                return self.module(*inputs)
            self._compiled[key] = compiled
        result = self._compiled[key]([t.detach().cpu().numpy() for t in inputs])[0]
        return torch.from_numpy(result.copy()).to(inputs[0].device)

    def folder(self, key: tuple) -> Path:
        """The cache folder of one input signature: a hash of weights, shapes, int8 and versions (the converted model
        does not depend on the precision hint; the compiled blobs inside, one folder per hint, do)."""
        if self._digest is None:
            self._digest = weights_digest(self.module)
        what = {"weights": self._digest, "inputs": [list(map(str, k)) for k in key], "int8": self.int8,
                "openvino": openvino_version(), "format": FORMAT}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]
        return self.cache_dir / f"{self.name}-{digest}"

    def _load(self, key: tuple, inputs: tuple[Tensor, ...]):
        """The compiled model of one input signature: read from the cache, else converted, saved, then compiled."""
        folder = self.folder(key)
        xml, meta = folder / "model.xml", folder / "meta.json"
        trusted = xml.is_file() and meta.is_file() and \
            json.loads(meta.read_text()).get("openvino") == openvino_version()
        if trusted:
            model = self.core.read_model(str(xml))
        else:
            model = self._convert(inputs)
            if model is None:
                return None
            with atomic_folder(folder) as tmp:
                self.ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
                write_json(Path(tmp) / "meta.json", {"openvino": openvino_version(), "name": self.name,
                                                     "int8": self.int8,
                                                     "inputs": [list(map(str, k)) for k in key]})
        variant = self.precision
        if self.precision == "bf16" and self.keep_fp32:
            model = self._kept_fp32(model, folder)
            variant += "-fp32-" + "+".join(self.keep_fp32)
        config = {"INFERENCE_PRECISION_HINT": HINTS[self.precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads(), "CACHE_DIR": str(folder / f"compiled-{variant}")}
        return self.core.compile_model(model, "CPU", config)

    def _kept_fp32(self, model, folder: Path):
        """The cached model read again with ``keep_fp32``'s operations marked to stay in fp32."""
        xml = mark_fp32((folder / "model.xml").read_text(), fp32_nodes(model, self.keep_fp32))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.xml"
            path.write_text(xml)
            return self.core.read_model(str(path), str(folder / "model.bin"))

    def _convert(self, inputs: tuple[Tensor, ...]):
        """torch -> OpenVINO (traced with these inputs), int8 weights if asked; None when it failed and may fall back."""
        CONVERSIONS["count"] += 1
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # our shape checks, constant per shape
                with declined_telemetry():
                    model = self.ov.convert_model(self.module, example_input=tuple(t.detach().cpu() for t in inputs))
        except Exception as e:  # OpenVINO raises its own types (OpConversionFailure, ...) and torch's tracing errors
            self.failed = _why(e)
            what = f"OpenVINO could not convert the {self.name} ({_module_names(self.module)}): {self.failed}"
            if not self.fallback:
                raise RuntimeError(f"{what}. Run it in torch instead: backend 'openvino-or-torch' "
                                   "(--backend openvino-or-torch), or backend 'torch'") from e
            print(f"{what}; running it in torch", file=sys.stderr)
            return None
        if self.int8:
            import nncf

            nncf.set_log_level(logging.WARNING)  # not its table of bit widths on every conversion
            model = nncf.compress_weights(model)  # weight-only int8 (asymmetric, per output channel)
        return model


def fp32_nodes(model, parts: tuple[str, ...]) -> set[str]:
    """Names of the operations of ``parts`` (``KEEP_FP32``) in a converted denoiser (its second input: c_noise)."""
    types = {t for p in parts for t in KEEP_FP32[p].get("types", ())}
    names = tuple(n for p in parts for n in KEEP_FP32[p].get("names", ()))
    out = {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() != "Constant" and
           (op.get_type_name() in types or any(n in op.get_friendly_name() for n in names))}
    if {"time", "time-mlp"} & set(parts) and len(model.get_parameters()) > 1:
        out |= _time_embedding_ops(model.get_parameters()[1])
    return out


def _time_embedding_ops(c_noise) -> set[str]:
    """The operations from the noise-level input to the first matrix product: the sinusoidal embedding."""
    seen, todo = set(), [c_noise]
    while todo:
        for output in todo.pop().outputs():
            for target in output.get_target_inputs():
                node = target.get_node()
                if node.get_type_name() in ("MatMul", "Result") or node.get_friendly_name() in seen:
                    continue
                seen.add(node.get_friendly_name())
                todo.append(node)
    return seen


def mark_fp32(xml: str, names: set[str]) -> str:
    """The model XML with every layer named in ``names`` marked to keep its precision (``_PRECISE``)."""
    def mark(match: re.Match) -> str:
        name = html.unescape(match.group(1))
        return match.group(0) + _PRECISE if name in names else match.group(0)

    return re.sub(r'<layer id="\d+" name="([^"]*)"[^>]*>', mark, xml)


def _why(error: Exception) -> str:
    """The useful lines of a conversion error: OpenVINO's summary of the operations it has no rule for."""
    lines = [line.strip("- ").strip() for line in str(error).splitlines()]
    summary = [line for line in lines if line.startswith(("No conversion rule", "Conversion is failed"))]
    return "; ".join(summary) or f"{type(error).__name__}: {next((line for line in lines if line), '')}"


def _module_names(module: nn.Module) -> str:
    inner = getattr(module, "network", None) or getattr(module, "part", None)
    return type(inner).__name__ if isinstance(inner, nn.Module) else type(module).__name__


class _FlatNetwork(nn.Module):
    """A denoiser network with tensor-only inputs (what tracing needs): ``(x, c_noise, *fields)`` -> raw output."""

    def __init__(self, network: nn.Module, fields: tuple[str, ...]):
        super().__init__()
        self.network, self.fields = network, fields

    def forward(self, x: Tensor, c_noise: Tensor, *tensors: Tensor) -> Tensor:
        return self.network(x, c_noise, Cond(**dict(zip(self.fields, tensors))))


class OpenVINONetwork(nn.Module):
    """Stands in for a denoiser network: ``(x, c_noise, cond) -> raw`` through OpenVINO, one compiled model per
    set of shapes and Cond fields present. CFG's cond and uncond arrive as one batch (``guidance.cfg``). Under the
    bf16 hint the noise level's embedding stays in fp32 (``DEFAULT_KEEP_FP32``; option ``keep_fp32``).
    ``wrapped`` is the torch network (its config, family and parameters stay visible)."""

    def __init__(self, network: nn.Module, **options):
        super().__init__()
        self.wrapped = network
        self.options = {"keep_fp32": DEFAULT_KEEP_FP32, **options}  # precision, int8, fallback, cache_dir, keep_fp32
        self._runs: dict[tuple[str, ...], Compiled] = {}

    @property
    def config(self):
        return self.wrapped.config

    def compiled(self, fields: tuple[str, ...]) -> Compiled:
        if fields not in self._runs:
            self._runs[fields] = Compiled(_FlatNetwork(self.wrapped, fields), "+".join(("denoiser",) + fields),
                                          **self.options)
        return self._runs[fields]

    def forward(self, x: Tensor, c_noise: Tensor, cond: Cond | None = None) -> Tensor:
        cond = cond if cond is not None else Cond()
        if cond.control is not None:
            raise ValueError("ControlNet residuals (cond.control) need the torch backend")
        if self_attention_perturbed():
            raise ValueError("perturbed-attention guidance (pag_scale) needs the torch backend")
        fields = tuple(f for f in COND_FIELDS if getattr(cond, f) is not None)
        tensors = [getattr(cond, f) for f in fields]
        tensors = [t if t.dtype in (torch.bool, torch.long) else t.float() for t in tensors]
        return self.compiled(fields)(x.float(), c_noise.float().reshape(x.shape[0]), *tensors)


class _Part(nn.Module):
    """One call of an autoencoder half with a single tensor input."""

    def __init__(self, part: nn.Module):
        super().__init__()
        self.part = part

    def forward(self, x: Tensor) -> Tensor:
        return self.part(x)


class OpenVINOCoder(nn.Module):
    """Stands in for an autoencoder's ``encoder`` or ``decoder``: whole images through OpenVINO; a tiled call (a
    ``Part`` run in place of the full-resolution path) goes to the torch module."""

    def __init__(self, part: nn.Module, name: str, **options):
        super().__init__()
        self.wrapped = part
        self.run = Compiled(_Part(part), name, **options)

    def forward(self, x: Tensor, part=None) -> Tensor:
        if part is not None:
            return self.wrapped(x, part)
        return self.run(x.float()).to(x.dtype)


def with_child(module: nn.Module, name: str, child: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose child ``name`` is ``child``; the original (maybe shared) is unchanged."""
    import copy

    out = copy.copy(module)
    out._modules = dict(module._modules)  # its own table of children; parameters are shared
    out._modules[name] = child
    return out
