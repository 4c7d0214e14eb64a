"""Pieces both training loops share: EMA, learning-rate warm-up, logging, training checkpoints.

A training checkpoint is a folder ``checkpoints/step_XXXXXXX`` holding ``model.safetensors``
(the live weights), ``ema.safetensors``, ``optimizer.safetensors`` + ``optimizer.json`` and
``state.json`` (step, RNG states, the config it ran with). It is written under a temporary name and
renamed into place, and ``checkpoints/latest`` names the newest one, so a crash or Ctrl-C at any
moment leaves the last good checkpoint whole.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from latentdiff.io import (
    atomic_folder,
    atomic_path,
    end_progress,
    load_state_strict,
    progress_line,
    read_json,
    reading,
    write_json,
    write_safetensors,
)
from latentdiff.train.distributed import (
    Context,
    decode_rng,
    encode_rng,
    full_optimizer_state,
    full_state,
    is_sharded,
    load_full_optimizer_state,
    load_full_state,
    rng_state,
    set_rng_state,
)


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
        lerp_weights(self.module, module, 1.0 - decay)


@torch.no_grad()
def lerp_weights(average: nn.Module, module: nn.Module, weight: float) -> None:
    """``average += weight * (module - average)`` for each floating-point tensor of the state (the step of every
    moving average of weights); other tensors (counters) are copied."""
    ema = list(average.state_dict().values())
    live = list(module.state_dict().values())
    floats = [(e, p) for e, p in zip(ema, live) if e.dtype.is_floating_point]
    torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], weight)
    for e, p in zip(ema, live):
        if not e.dtype.is_floating_point:
            e.copy_(p)


class Trainable(nn.Module):
    """The modules the optimizer updates: the network, and the text encoder when it is trained jointly."""

    def __init__(self, network: nn.Module, text_encoder: nn.Module | None):
        super().__init__()
        self.network = network
        self.text_encoder = text_encoder


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
    """Appends one JSON object a line to ``metrics.jsonl``, draws a one-line progress report (loss, speed,
    ETA) and mirrors the numbers to TensorBoard when it is installed (``tensorboard_dir``)."""

    def __init__(self, path: Path, total_steps: int, start_step: int = 0, quiet: bool = False,
                 batch_size: int | None = None, tensorboard_dir: Path | None = None):
        if start_step > 0:
            truncate_log(path, start_step)  # a resumed run: the rows of the steps it rolled back go
        self.file = open(path, "a")  # noqa: SIM115 (open for the whole run; closed by close())
        self.total = total_steps
        self.start = start_step  # the step this process began at (after a resume, not 0)
        self.quiet = quiet
        self.batch_size = batch_size  # global images per step, for images/s
        self.t0 = time.time()
        self.tb = _tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None else None

    def log(self, step: int, **values) -> None:
        elapsed = time.time() - self.t0
        done = step + 1 - self.start
        rate = done / max(elapsed, 1e-9)
        record = {"step": step + 1, **values, "steps_per_s": round(rate, 3), "time_s": round(elapsed, 1)}
        if self.batch_size:
            record["images_per_s"] = round(rate * self.batch_size, 2)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step + 1)
        if not self.quiet:
            eta = (self.total - step - 1) / max(rate, 1e-9)
            shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            speed = f"{rate:.2f} it/s" + (f" ({rate * self.batch_size:.1f} img/s)" if self.batch_size else "")
            progress_line(f"step {step + 1}/{self.total}  {shown}  {speed}  eta {eta / 60:.1f} min")

    def close(self) -> None:
        if not self.quiet:
            end_progress()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of a JSONL log up to ``step`` (the step a run resumes at); drop later ones and a torn last line."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # half a line: the process was killed while writing it
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept))


def _tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter, or None (silently) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _optimizer_tensors(sd: dict) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's state dict into tensors (for safetensors) and the JSON-able rest."""
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


def save_training_checkpoint(run_dir: Path, step: int, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                             generator: torch.Generator | None, config: dict, keep_last: int = 3, *,
                             ctx: Context | None = None,
                             extra: dict[str, nn.Module | torch.optim.Optimizer] | None = None) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically, point ``latest`` at it, keep the last N.

    Under torchrun every rank calls this (the weights of a sharded model and every rank's RNG state are
    gathered); only rank 0 writes, and all ranks wait until the checkpoint is complete. ``extra`` names
    further modules (post-hoc EMA tracks, a discriminator) and optimizers to keep, as ``NAME.safetensors``.
    """
    ctx = ctx or Context()
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    extra = extra or {}
    modules = {"model": model, "ema": ema.module, **{k: m for k, m in extra.items() if isinstance(m, nn.Module)}}
    states = {name: full_state(m) for name, m in modules.items()}
    optimizers = {"optimizer": full_optimizer_state(model, opt),  # extra optimizers: of unsharded modules
                  **{k: o.state_dict() for k, o in extra.items() if isinstance(o, torch.optim.Optimizer)}}
    rngs = ctx.gather(rng_state(ctx.device))
    root = run_dir / "checkpoints"
    folder = root / f"step_{step:07d}"
    if ctx.is_main:
        for stale in root.glob(".step_*.tmp"):  # left by a run killed while writing a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_folder(folder) as tmp:
            for name, state in states.items():
                write_safetensors(tmp / f"{name}.safetensors", state)
            for name, opt_state in optimizers.items():
                tensors, meta = _optimizer_tensors(opt_state)
                write_safetensors(tmp / f"{name}.safetensors", tensors)
                write_json(tmp / f"{name}.json", meta)
            write_json(tmp / "state.json", {
                "step": step, "ema_updates": ema.updates, "config": config, "world_size": ctx.world,
                "generator": encode_rng(generator.get_state()) if generator is not None else None,
                "torch_rng": rngs[0]["cpu"], "rng_per_rank": rngs, "extra": sorted(extra),
            })
        with atomic_path(root / "latest") as tmp:
            tmp.write_text(folder.name)
        for old in sorted(root.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old)
    ctx.barrier()
    return folder


def find_checkpoint(path: Path) -> Path:
    """Resolve a run folder or a checkpoint folder to a checkpoint folder, with a clear error if none.

    A run folder's checkpoint is the one ``checkpoints/latest`` names; where that one is missing or incomplete (a
    run killed while replacing it, before ``io.recover_swaps`` put it back), the newest intact one."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    root = path / "checkpoints"
    latest = root / "latest"
    named = root / latest.read_text().strip() if latest.is_file() else None
    if named is not None and (named / "state.json").is_file():
        return named
    intact = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file()) if root.is_dir() else []
    if intact:
        if named is not None:
            print(f"{latest} names {named.name}, which is missing or incomplete; using the newest intact "
                  f"checkpoint, {intact[-1].name}", file=sys.stderr)
        return intact[-1]
    raise FileNotFoundError(
        f"no training checkpoint in {path}: expected {path}/checkpoints/latest (a run folder) "
        "or a step_XXXXXXX folder holding state.json"
    )


def load_training_checkpoint(folder: Path, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                             generator: torch.Generator | None, *, ctx: Context | None = None,
                             extra: dict[str, nn.Module | torch.optim.Optimizer] | None = None) -> int:
    """Restore a checkpoint into the live objects (on every rank); return the step to continue from.

    A checkpoint of another model configuration is refused with the names of the mismatched tensors.
    """
    ctx = ctx or Context()
    state = read_json(folder / "state.json", "the checkpoint is incomplete")
    with reading(folder / "state.json", "resume from another checkpoint"):
        step, ema_updates = int(state["step"]), int(state["ema_updates"])
    extra = extra or {}
    modules = {"model": model, "ema": ema.module, **{k: m for k, m in extra.items() if isinstance(m, nn.Module)}}
    for name, module in modules.items():
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint was written by a run without {name!r}")
        tensors = load_file(str(path))
        if is_sharded(module):
            # DTensors report their global shapes, so the names and shapes are checked before any gather.
            load_state_strict(_ShapeOnly(module.state_dict()), tensors, f"checkpoint {name}")
            load_full_state(module, tensors)
        else:
            load_state_strict(module, tensors, f"checkpoint {name}")
    meta = json.loads((folder / "optimizer.json").read_text())
    opt_state = _optimizer_state(load_file(str(folder / "optimizer.safetensors")), meta)
    if is_sharded(model):
        load_full_optimizer_state(model, opt, opt_state)
    else:
        opt.load_state_dict(opt_state)
    for name, other in extra.items():
        if isinstance(other, torch.optim.Optimizer):
            if not (folder / f"{name}.safetensors").is_file():
                raise FileNotFoundError(f"checkpoint {folder} has no {name}: it was written by a run configured "
                                        "differently; resume with the same settings")
            meta = json.loads((folder / f"{name}.json").read_text())
            other.load_state_dict(_optimizer_state(load_file(str(folder / f"{name}.safetensors")), meta))
    ema.updates = ema_updates
    if generator is not None and state.get("generator"):
        generator.set_state(decode_rng(state["generator"]))
    rngs = state.get("rng_per_rank") or [{"cpu": state["torch_rng"]}]
    if ctx.rank < len(rngs):
        set_rng_state(rngs[ctx.rank], ctx.device)
    else:  # more processes than the run had: a fresh, rank-dependent stream (only dropout draws from it)
        torch.manual_seed(step * 1_000_003 + ctx.rank)
    return step


class _ShapeOnly(nn.Module):
    """A stand-in module whose state dict is ``state``, so ``load_state_strict`` can compare names and shapes."""

    def __init__(self, state: dict[str, Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):
        return self._state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return None


class NonFiniteSkipper:
    """Skips optimizer steps whose loss or gradient is NaN or inf, reports each, and stops the run after ``limit``."""

    def __init__(self, limit: int = 10, verbose: bool = True):
        self.limit = limit
        self.count = 0
        self.verbose = verbose  # False on every rank but 0

    def step(self, loss: Tensor, step: int, opt: torch.optim.Optimizer, model: nn.Module,
             grad_clip: float) -> float | None:
        """Backward, clip and step; return the gradient norm, or None when the step was skipped."""
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return self._skip(step, opt)
        loss.backward()
        return self.apply(float(loss.detach()), step, opt, model, grad_clip)

    def apply(self, loss: float, step: int, opt: torch.optim.Optimizer, model: nn.Module,
              grad_clip: float) -> float | None:
        """Clip the gradients already accumulated and step, unless loss or gradient norm is non-finite."""
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
            return self._skip(step, opt)
        opt.step()
        return float(grad_norm)

    def _skip(self, step: int, opt: torch.optim.Optimizer) -> None:  # returns None: the step was skipped
        opt.zero_grad(set_to_none=True)
        self.count += 1
        if self.verbose:
            print(f"\nstep {step + 1}: non-finite loss, step skipped ({self.count} so far)", file=sys.stderr)
        if self.count >= self.limit:
            raise RuntimeError(f"loss was non-finite for {self.limit} steps: lower lr or use fp32; "
                               "the last checkpoint is untouched")


def refuse_fsdp(cfg, trained: str) -> None:
    """Adapter-style runs (LoRA, IP-Adapter, LCM-LoRA) train small modules inside a frozen network: DDP only."""
    if cfg.distributed.strategy == "fsdp":
        raise ValueError(f"{trained} trains small modules inside a frozen network: use distributed.strategy = 'ddp', "
                         "not 'fsdp'")


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


def captioned_latents_loss(cfg, data, denoiser, text_encoder: nn.Module, sigma_sampler, device: torch.device):
    """The loss of a loop on in-memory latents with captions (``data.latents``, ``data.captions``: train-video's
    clips, train-audio's tones): ``loss_for(step, idx)`` is the step's ``loss_fn(positions)``, the per-sample losses of
    those positions of the global batch ``idx``, each sample's caption dropout, sigma and noise drawn in that order
    from its own generator (``distributed.sample_generators``)."""
    from latentdiff.diffusion.losses import denoising_loss
    from latentdiff.models.runtime import autocast
    from latentdiff.train.distributed import per_sample, sample_generators

    def loss_for(step: int, idx: Tensor):
        def loss_fn(positions: Tensor) -> Tensor:
            gens = sample_generators(cfg.seed, step, positions)
            rows = idx[positions]
            x0 = data.latents[rows].to(device)  # (b, C, [F,] h, w)
            drop = per_sample(gens, lambda g: torch.rand(1, generator=g)) < cfg.caption_dropout
            captions = ["" if d else data.captions[i] for i, d in zip(rows.tolist(), drop.tolist())]
            sigma = per_sample(gens, lambda g: sigma_sampler(1, generator=g))
            noise = per_sample(gens, lambda g: torch.randn(1, *x0.shape[1:], generator=g))
            with autocast(cfg.precision, device):
                return denoising_loss(denoiser, x0, sigma, text_encoder(captions), noise=noise.to(device))

        return loss_fn

    return loss_for
