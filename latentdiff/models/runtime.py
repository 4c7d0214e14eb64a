"""How networks run: precision (the one autocast) and memory layout (channels-last convolution weights).

Used by inference (``Pipeline.generate``, the autoencoder helpers in ``vae_inference``) and by the training
loops alike; nothing here knows about training.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import Tensor, nn

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOW_PRECISIONS = ("bf16", "fp16")
TRAINING_PRECISIONS = ("fp32", "bf16")  # fp16 needs loss scaling, which the training loops do not do


def check_precision(precision: str, training: bool = False) -> None:
    """Refuse a precision that ``autocast`` does not know (for training: one it does not train in)."""
    if training and precision not in TRAINING_PRECISIONS:
        raise ValueError(f"precision must be 'fp32' or 'bf16' for training (fp16 would need loss scaling), "
                         f"got {precision!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")


@contextmanager
def autocast(precision: str, device: torch.device | str, *modules: nn.Module, training: bool = False):
    """The one place mixed precision is switched on: "fp32" runs as it is; "bf16" / "fp16" under
    ``torch.autocast``, with the convolution weights of ``modules`` channels-last for the block on the CPU
    (``low_precision_layout``: the fast bf16 path there), restored on exit. ``training=True`` refuses fp16.

    ``with autocast("bf16", "cpu", ae): z = ae.encode(x)`` encodes in bf16; tiled calls work inside it too.
    """
    check_precision(precision, training)
    device = torch.device(device)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=PRECISIONS[precision]), low_precision_layout(precision, device, *modules):
        yield


def channels_last(module: nn.Module, enabled: bool, ctx=None) -> nn.Module:
    """Store 4-d (convolution) weights as NHWC, so oneDNN / cuDNN convolutions run in channels-last layout.

    The activations follow the weights' layout from the first convolution on, so inputs need no change, and
    the results are the same to float rounding. On the project's 2-core CPU it neither helps nor hurts
    (``benchmarks/channels_last.py``, BENCHMARKS.md); NHWC is the layout GPU tensor cores prefer for
    convolutions in bf16/fp16. Skipped under FSDP (``ctx``, a ``train.distributed.Context``), whose flat shards
    expect contiguous parameters.
    """
    if enabled and not (ctx is not None and ctx.distributed and ctx.strategy == "fsdp"):
        module.to(memory_format=torch.channels_last)
    return module


@contextmanager
def low_precision_layout(precision: str, device: torch.device, *modules: nn.Module):
    """Within the block, the modules' 4-d (convolution) weights are channels-last when ``precision`` is bf16 or
    fp16 on the CPU; restored to contiguous on exit. Anything else (fp32, GPUs) leaves the modules untouched.

    On a CPU without native bf16 (the project's AVX2 machine) bf16 convolutions run aten's fallback
    (``_slow_conv2d_forward``) in either layout, and its NCHW variant is 20-35x slower than its NHWC one
    (BENCHMARKS.md, "bf16 on a CPU without native bf16: channels-last"). With channels-last weights the
    activations follow from the first convolution on, so callers change nothing else; results agree with
    the NCHW ones to bf16 rounding. A module already channels-last stays so.
    Inference only: it swaps parameter storage, so not during training nor from two threads at once.
    """
    convert = [] if precision not in LOW_PRECISIONS or device.type != "cpu" else \
        [m for m in modules if not any(_stored_channels_last(p) for p in m.parameters())]
    for module in convert:
        channels_last(module, True)
    try:
        yield
    finally:
        for module in convert:
            module.to(memory_format=torch.contiguous_format)


def _stored_channels_last(p: Tensor) -> bool:
    """A 4-d tensor laid out NHWC and not also NCHW (1x1 kernels and single channels are both)."""
    return p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()


def feature_width(module: nn.Module) -> int:
    """The widest feature stream of a network, a rough measure of its activations per position: the most
    channels any normalization layer sees (GroupNorm, LayerNorm, RMSNorm), else the widest convolution or linear."""
    widths = []
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            widths.append(m.num_channels)
        elif isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) and m.normalized_shape:
            widths.append(m.normalized_shape[-1])
    if not widths:
        widths = [getattr(m, "out_channels", 0) or getattr(m, "out_features", 0) for m in module.modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear))]
    return max(widths, default=1)


def available_memory(device: torch.device | str) -> int:
    """Bytes a computation on ``device`` can still allocate: free GPU memory, or the memory the system (and the
    container's cgroup limit, where one is set) has available."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return 2**62  # unknown: do not refuse
    try:  # cgroup v2: a container's own limit
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), g.read().strip()
        if limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return free
