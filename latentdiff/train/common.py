"""Pieces both training loops share: EMA, precision, learning-rate warm-up, logging, training checkpoints.

A training checkpoint is a folder ``checkpoints/step_XXXXXXX`` holding ``model.safetensors``
(the live weights), ``ema.safetensors``, ``optimizer.safetensors`` + ``optimizer.json`` and
``state.json`` (step, RNG states, the config it ran with). It is written under a temporary name and
renamed into place, and ``checkpoints/latest`` names the newest one, so a crash or Ctrl-C at any
moment leaves the last good checkpoint whole.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from latentdiff.io import atomic_folder, load_state_strict, write_json, write_safetensors


class EMA:
    """Exponential moving average of a module's weights (a frozen copy updated after each step)."""

    def __init__(self, module: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup  # ramp the decay as (1 + n) / (10 + n) early on, as in many LDM codebases
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        ema = list(self.module.state_dict().values())
        live = list(module.state_dict().values())
        floats = [(e, p) for e, p in zip(ema, live) if e.dtype.is_floating_point]
        torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - decay)
        for e, p in zip(ema, live):
            if not e.dtype.is_floating_point:
                e.copy_(p)


def autocast(precision: str, device: torch.device):
    """The one place mixed precision is switched on: "fp32" (none) or "bf16" (autocast)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning rate at ``step``: linear warm-up, then constant or cosine decay to 10%."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}")


class MetricsLog:
    """Appends one JSON object a line to ``metrics.jsonl`` and draws a one-line progress report."""

    def __init__(self, path: Path, total_steps: int, start_step: int = 0, quiet: bool = False):
        self.file = open(path, "a")  # noqa: SIM115 (open for the whole run; closed by close())
        self.total = total_steps
        self.start = start_step  # the step this process began at (after a resume, not 0)
        self.quiet = quiet
        self.t0 = time.time()

    def log(self, step: int, **values) -> None:
        elapsed = time.time() - self.t0
        done = step + 1 - self.start
        rate = done / max(elapsed, 1e-9)
        record = {"step": step + 1, **values, "steps_per_s": round(rate, 3), "time_s": round(elapsed, 1)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if not self.quiet:
            eta = (self.total - step - 1) / max(rate, 1e-9)
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            print(f"\rstep {step + 1}/{self.total}  {shown}  {rate:.2f} it/s  eta {eta / 60:.1f} min",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.quiet:
            print(file=sys.stderr)
        self.file.close()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's state into tensors (for safetensors) and the JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _encode_rng(state: Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_rng(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def save_training_checkpoint(run_dir: Path, step: int, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                             generator: torch.Generator, config: dict, keep_last: int = 3,
                             extras: dict[str, nn.Module | torch.optim.Optimizer] | None = None) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically, point ``latest`` at it, keep the last N.

    ``extras`` are further modules or optimizers saved under their names (e.g. a discriminator and its optimizer).
    """
    root = run_dir / "checkpoints"
    folder = root / f"step_{step:07d}"
    with atomic_folder(folder) as tmp:
        write_safetensors(tmp / "model.safetensors", model.state_dict())
        write_safetensors(tmp / "ema.safetensors", ema.module.state_dict())
        for name, obj in {"optimizer": opt, **(extras or {})}.items():
            if isinstance(obj, torch.optim.Optimizer):
                tensors, meta = _optimizer_tensors(obj)
                write_safetensors(tmp / f"{name}.safetensors", tensors)
                write_json(tmp / f"{name}.json", meta)
            else:
                write_safetensors(tmp / f"{name}.safetensors", obj.state_dict())
        write_json(tmp / "state.json", {
            "step": step, "ema_updates": ema.updates, "config": config,
            "generator": _encode_rng(generator.get_state()), "torch_rng": _encode_rng(torch.get_rng_state()),
        })
    (root / "latest.tmp").write_text(folder.name)
    (root / "latest.tmp").replace(root / "latest")
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)
    return folder


def find_checkpoint(path: Path) -> Path:
    """Resolve a run folder or a checkpoint folder to a checkpoint folder, with a clear error if none."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.is_file() and (path / "checkpoints" / latest.read_text().strip() / "state.json").is_file():
        return path / "checkpoints" / latest.read_text().strip()
    raise FileNotFoundError(
        f"no training checkpoint in {path}: expected {path}/checkpoints/latest (a run folder) "
        "or a step_XXXXXXX folder holding state.json"
    )


def load_training_checkpoint(folder: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                             generator: torch.Generator,
                             extras: dict[str, nn.Module | torch.optim.Optimizer] | None = None) -> int:
    """Restore a checkpoint into the live objects (and ``extras``, as saved); return the step to continue from."""
    state = json.loads((folder / "state.json").read_text())
    load_state_strict(model, load_file(str(folder / "model.safetensors")), "model")
    load_state_strict(ema.module, load_file(str(folder / "ema.safetensors")), "ema")
    for name, obj in {"optimizer": opt, **(extras or {})}.items():
        if not (folder / f"{name}.safetensors").is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {name}: it was written by a run configured "
                                    "differently; resume with the same settings")
        tensors = load_file(str(folder / f"{name}.safetensors"))
        if isinstance(obj, torch.optim.Optimizer):
            obj.load_state_dict(_optimizer_state(tensors, json.loads((folder / f"{name}.json").read_text())))
        else:
            load_state_strict(obj, tensors, name)
    ema.updates = state["ema_updates"]
    generator.set_state(_decode_rng(state["generator"]))
    torch.set_rng_state(_decode_rng(state["torch_rng"]))
    return state["step"]


class NonFiniteSkipper:
    """Skips optimizer steps whose loss is NaN or inf, reports each, and stops the run after ``limit``."""

    def __init__(self, limit: int = 10):
        self.limit = limit
        self.count = 0

    def step(self, loss: Tensor, step: int, opt: torch.optim.Optimizer, model: nn.Module,
             grad_clip: float) -> float | None:
        """Backward, clip and step; return the gradient norm, or None when the step was skipped."""
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.count += 1
            print(f"\nstep {step + 1}: non-finite loss, step skipped ({self.count} so far)", file=sys.stderr)
            if self.count >= self.limit:
                raise RuntimeError(f"loss was non-finite for {self.limit} steps: lower lr or use fp32; "
                                   "the last checkpoint is untouched")
            return None
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        return float(grad_norm)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> Tensor:
    """The data indices of ``step``: each epoch is a fresh seeded permutation, so a resumed run
    reads exactly what an uninterrupted one would."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // n, positions % n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out


def check_finite_params(model: nn.Module) -> None:
    """Refuse to save weights holding NaN or inf."""
    bad = [name for name, p in model.state_dict().items() if p.dtype.is_floating_point and not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"weights became non-finite ({', '.join(bad[:3])}...): not saving; "
                           "the last checkpoint is untouched. Lower the learning rate or use fp32.")


def interrupt_message(run_dir: Path, step: int) -> str:
    """What Ctrl-C prints: where the last intact checkpoint is and how to continue."""
    try:
        last = find_checkpoint(run_dir)
        where = f"the last checkpoint {last} is intact; continue with --resume"
    except FileNotFoundError:
        where = "no checkpoint had been written yet"
    return f"\ninterrupted at step {step + 1}: {where}"
