"""The training step both loops share: gradient accumulation over micro-batches, one reduced loss, a
guarded optimizer step; and around it pre-emption (SIGTERM), the dry run and the evaluation hook.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from latentdiff.train.common import NonFiniteSkipper
from latentdiff.train.distributed import Context, gradient_sync


def train_step(ctx: Context, wrapped: nn.Module, model: nn.Module, opt: torch.optim.Optimizer,
               skipper: NonFiniteSkipper, chunks: list[Tensor], loss_fn: Callable[[Tensor], Tensor],
               global_batch: int, step: int, grad_clip: float, stop: StopSignal | None = None
               ) -> tuple[float, float | None, bool]:
    """One optimizer step over this rank's micro-batches ``chunks`` (global-batch positions).

    ``loss_fn(positions)`` returns the per-sample losses of those positions. Each micro-batch is
    back-propagated with weight ``1 / per_rank_batch``, so after DDP's mean over ranks the gradient is
    that of the mean loss over the global batch, whatever the split. Returns (global mean loss,
    gradient norm or None if the step was skipped, whether any rank was asked to stop).
    """
    opt.zero_grad(set_to_none=True)
    per_rank = sum(len(c) for c in chunks)
    local = torch.zeros((), dtype=torch.float64)
    for i, chunk in enumerate(chunks):
        with gradient_sync(wrapped, sync=i == len(chunks) - 1):
            losses = wrapped(loss_fn, chunk)  # (b,)
            (losses.sum() / per_rank).backward()
        local += losses.detach().double().sum().cpu()
    # One small all-reduce: the summed loss (for the log and the non-finite check) and the stop flag.
    flags = ctx.all_reduce_sum(torch.stack([local, torch.tensor(float(stop.requested if stop else 0),
                                                                dtype=torch.float64)]))
    loss = float(flags[0]) / global_batch
    grad_norm = skipper.apply(loss, step, opt, model, grad_clip)
    return loss, grad_norm, bool(flags[1] > 0)


class StopSignal:
    """SIGTERM (a cluster's pre-emption notice) asks the loop to finish its step, checkpoint and exit.

    Used as a context manager around the loop; the previous handler is restored afterwards. Outside
    the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self):  # -> StopSignal
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def preempted_message(folder: Path, step: int) -> str:
    return f"\nSIGTERM at step {step}: checkpoint {folder} written; continue with --resume"


# ---------------------------------------------------------------------------------------------
# the evaluation hook


@dataclass
class Callback:
    """``fn(step, target)`` every ``every`` steps on rank 0; ``target`` is a Pipeline with the EMA weights
    (denoiser training) or the EMA autoencoder (autoencoder training)."""

    every: int
    fn: Callable[[int, Any], None]


def run_callbacks(callbacks: list[Callback], step: int, make_target: Callable[[], Any]) -> None:
    """Call each due callback with a target built once (lazily: nothing is built when none is due)."""
    due = [cb for cb in callbacks if cb.every > 0 and step % cb.every == 0]
    if due:
        target = make_target()
        for cb in due:
            cb.fn(step, target)


# ---------------------------------------------------------------------------------------------
# the dry run


class DryRun:
    """Times a few training steps at the configured batch size and reports step time, peak memory, ETA."""

    def __init__(self, device: torch.device, warmup: int = 1):
        self.device = device
        self.warmup = warmup  # first steps are slower (allocations, autotuning): not timed
        self.times: list[float] = []
        self._t = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - self._t)

    def report(self, total_steps: int, global_batch: int, world: int, out_of_memory: str | None = None) -> dict:
        """What fits and how long the configured run would take."""
        timed = self.times[self.warmup:] or self.times
        peak, capacity = peak_memory(self.device), memory_capacity(self.device)
        fits = out_of_memory is None and (capacity is None or peak < 0.9 * capacity)
        report = {
            "device": str(self.device), "processes": world, "batch_size": global_batch,
            "steps_timed": len(timed), "step_time_s": round(sum(timed) / len(timed), 4) if timed else None,
            "peak_memory_gib": round(peak / 2**30, 3), "memory_capacity_gib":
                round(capacity / 2**30, 3) if capacity else None, "fits": fits,
        }
        if timed:
            step_time = sum(timed) / len(timed)
            report["images_per_s"] = round(global_batch / step_time, 2)
            report["eta_hours"] = float(f"{step_time * total_steps / 3600:.3g}")  # 3 significant digits
        if out_of_memory is not None:
            report["error"] = out_of_memory
        if not fits:
            report["advice"] = ("does not fit: lower batch_size, raise grad_accum (same global batch, smaller "
                                "micro-batches), set gradient_checkpointing = true, or use bf16")
        return report


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated on the GPU, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_capacity(device: torch.device) -> int | None:
    """Bytes the device can hold: GPU memory, or the container's memory limit / the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
            if text.isdigit() and int(text) < 2**60:
                return int(text)
        except OSError:
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def print_dry_run(report: dict, ctx: Context) -> None:
    if ctx.is_main:
        print(json.dumps(report, indent=2), file=sys.stderr)
