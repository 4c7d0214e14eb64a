"""The run engine every training loop stands on: the run folder, resume, EMA and post-hoc EMA tracks, the
optimizer and its learning-rate schedule, metrics and the progress line, sample grids and callbacks, the dry
run, SIGTERM and Ctrl-C, atomic checkpoints. A loop owns its data, its modules and its loss, and reads top
to bottom (setup -> build -> loop -> loss -> step -> EMA -> log -> save) on top of it:

    with processes(cfg) as ctx:                        # torchrun's process group, or a single process
        run = Run(cfg, ctx, callbacks)                 # the checkpoint to resume from, the batch split
        data = ...                                     # the loop's data (and pretrained parts)
        run.seed()                                     # the same initial weights on every rank
        model = ...                                    # the loop's trained modules
        run.build(model)                               # channels-last, EMA tracks, DDP / FSDP, AdamW, resume, log
        with run.guard():                              # SIGTERM, Ctrl-C, a dry run's out-of-memory
            for step in run.steps():                   # resumed step .. cfg.steps (a dry run: a few, timed)
                idx, chunks = run.batch(data, step)    # the global batch; this rank's micro-batches of it
                loss, grad_norm = run.step(step, chunks, loss_fn)  # lr, accumulate, clip, step, EMA tracks
                run.log(step, loss, grad_norm)         # every log_every steps
                run.samples(step, draw)                # every sample_every steps, and the callbacks
                run.save(step)                         # post-hoc EMA snapshots, checkpoints; SIGTERM exits here
                # (run.advance(step, chunks, loss_fn, draw) is these four in a row)
        if cfg.dry_run:
            return run.dry_run_report()
        ema = run.finish()                             # the last checkpoint; the EMA module, whole, on rank 0

Everything is a pure function of (seed, step) or lives in the checkpoint, so a resumed run is bitwise the
uninterrupted one on a CPU (``tests/test_resume.py``).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from latentdiff.config import COUNT, FRACTION, Bound, above, at_least, between, bounds, one_of, to_dict
from latentdiff.io import recover_swaps
from latentdiff.models.runtime import TRAINING_PRECISIONS, channels_last
from latentdiff.train.common import (
    EMA,
    MetricsLog,
    NonFiniteSkipper,
    check_finite_params,
    find_checkpoint,
    interrupt_message,
    load_training_checkpoint,
    lr_at,
    save_training_checkpoint,
)
from latentdiff.train.distributed import (
    Context,
    DistributedConfig,
    bucket_chunks,
    full_state,
    gathered,
    micro_batches,
    rank_positions,
    setup,
    shard_like,
    teardown,
    wrap,
)
from latentdiff.train.engine import (
    Callback,
    DryRun,
    StopSignal,
    is_out_of_memory,
    preempted_message,
    print_dry_run,
    run_callbacks,
    train_step,
)
from latentdiff.train.posthoc_ema import PowerEMA, gamma_to_sigma_rel, save_snapshot


@dataclass
class RunConfig:
    """What every training run sets: where it writes, how it steps, what it logs and keeps, how it spreads.

    Each loop's config inherits it, adds its own fields and re-declares a field whose default differs.
    """

    out: str = "runs/run"  # run folder: checkpoints/, metrics.jsonl, samples/, and the final result
    seed: int = 0  # seeds the weights, the data order and every random draw
    steps: int = 1500  # optimizer steps
    batch_size: int = 32  # samples per step, over all processes
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear warm-up
    lr_schedule: str = "cosine"  # "constant" or "cosine" (to 10% of lr)
    grad_clip: float = 1.0  # max gradient norm
    ema_decay: float = 0.999  # EMA of weights: the weights saved at the end
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; slower where the CPU lacks native bf16, see BENCHMARKS.md)
    log_every: int = 25  # steps between metrics lines
    sample_every: int = 500  # steps between sample grids (0 = never)
    save_every: int = 500  # steps between checkpoints
    keep_last: int = 2  # checkpoints kept
    resume: bool = False  # continue from the run folder's latest checkpoint
    quiet: bool = False  # no progress line
    channels_last: bool = False  # NHWC convolution weights (models/runtime.channels_last); no gain on the 2-core CPU
    grad_accum: int = 1  # micro-batches per step and process: batch_size = processes * grad_accum * micro-batch
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # under torchrun: DDP or FSDP2
    posthoc_sigma_rels: tuple[float, ...] = (0.05, 0.10)  # post-hoc EMA tracks (EDM2 power EMAs), by relative std
    posthoc_every: int = 0  # steps between post-hoc EMA snapshots (0 = no tracks); `latentdiff posthoc-ema`
    tensorboard: bool = True  # also log to run/tensorboard when tensorboard is installed
    dry_run: bool = False  # time dry_run_steps steps, report step time, peak memory and ETA; write nothing
    dry_run_steps: int = 4  # steps the dry run takes (the first is not timed)

    # What each value may be (config.Bound), checked with the types before any work; loops add their own.
    BOUNDS = bounds({"steps": COUNT, "batch_size": COUNT, "lr": above(0), "weight_decay": at_least(0),
                     "warmup_steps": at_least(0), "lr_schedule": one_of("constant", "cosine"), "grad_clip": above(0),
                     "ema_decay": FRACTION, "precision": one_of(*TRAINING_PRECISIONS), "log_every": COUNT,
                     "sample_every": at_least(0), "save_every": COUNT, "keep_last": COUNT, "grad_accum": COUNT,
                     "posthoc_sigma_rels": Bound(0, gamma_to_sigma_rel(0.0), lo_open=True, hi_open=True),
                     "posthoc_every": at_least(0), "dry_run_steps": between(2, 1000)})


@contextmanager
def processes(cfg: RunConfig) -> Iterator[Context]:
    """Join torchrun's process group for the run (a single-process context without torchrun); leave it after."""
    ctx = setup(cfg.distributed)
    try:
        yield ctx
    finally:
        teardown(ctx)


class Run:
    """One training run's shared machinery. Under torchrun every rank makes the same calls; rank 0 logs,
    samples and writes. Nothing is written in a dry run."""

    def __init__(self, cfg: RunConfig, ctx: Context, callbacks: list[Callback] | None = None):
        self.cfg, self.ctx, self.callbacks = cfg, ctx, list(callbacks or [])
        self.folder = Path(cfg.out)
        self.writes = ctx.is_main and not cfg.dry_run
        if self.writes:  # a run killed while writing: its half-written files go, a half-replaced folder comes back
            for line in [*recover_swaps(self.folder), *recover_swaps(self.folder / "checkpoints"),
                         *recover_swaps(self.folder / "posthoc_ema")]:
                print(line, file=sys.stderr)
        ctx.barrier()
        self.checkpoint = find_checkpoint(self.folder) if cfg.resume else None  # fails before any work
        self.chunks = micro_batches(rank_positions(cfg.batch_size, ctx), cfg.grad_accum)  # this rank's micro-batches
        self.seeded = False
        self.start = self.current = 0  # the step the run starts at (after a resume, not 0); the step it is at
        self.stop: StopSignal | None = None
        self.stop_now = False  # some rank got SIGTERM: checkpoint and exit at the end of this step
        self.out_of_memory: str | None = None  # a dry run's out-of-memory error
        self.metrics: MetricsLog | None = None  # rank 0's metrics.jsonl, opened by build
        self.dry: DryRun | None = None  # the dry run's timer, made by build

    def seed(self) -> None:
        """Seed the global stream right before the trained modules are made (after loading pretrained parts, which
        draw initial weights of their own), so every rank starts from the same weights."""
        torch.manual_seed(self.cfg.seed)
        self.seeded = True

    def build(self, model: nn.Module, params: list[nn.Parameter] | list[dict] | None = None,
              extra: dict[str, nn.Module | torch.optim.Optimizer] | None = None) -> int:
        """Make ``model`` trainable: channels-last, EMA and post-hoc EMA tracks, DDP / FSDP, AdamW over ``params``
        (default: all of ``model``'s; or AdamW's parameter groups, each may have an "lr_scale" on the schedule's
        learning rate), then resume from the checkpoint and open the run folder's metrics log.

        ``extra`` names further modules and optimizers the checkpoints keep (a discriminator and its optimizer);
        their modules' weights are checked for NaN and inf before every checkpoint, as the model's are.
        Returns the step the loop starts at.
        """
        cfg, ctx = self.cfg, self.ctx
        if not self.seeded:
            raise RuntimeError("call run.seed() before making the modules that run.build trains")
        if self.writes:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.model = channels_last(model, cfg.channels_last, ctx)
        self.ema = EMA(model, cfg.ema_decay)
        self.posthoc = [PowerEMA(model, s) for s in cfg.posthoc_sigma_rels] if cfg.posthoc_every else []
        fsdp = ctx.distributed and cfg.distributed.strategy == "fsdp"
        self.plain = copy.deepcopy(self.ema.module) if ctx.is_main and fsdp else None  # rank 0's whole EMA copy
        self.wrapped = wrap(model, ctx)  # DDP / FSDP2 under torchrun
        for m in [self.ema.module, *(p.module for p in self.posthoc)]:
            shard_like(m.to(ctx.device), ctx)
        self.opt = torch.optim.AdamW(model.parameters() if params is None else params, lr=cfg.lr, betas=(0.9, 0.99),
                                     weight_decay=cfg.weight_decay)
        if ctx.rank:
            torch.manual_seed(cfg.seed + ctx.rank)  # the global stream (dropout) differs between ranks
        self.checked = [m for m in (extra or {}).values() if isinstance(m, nn.Module)]
        self.extra = {**{f"posthoc_{i}": p.module for i, p in enumerate(self.posthoc)}, **(extra or {})}
        if self.checkpoint is not None:
            self.start = self.current = load_training_checkpoint(self.checkpoint, model, self.ema, self.opt, None,
                                                                 ctx=ctx, extra=self.extra)
            if ctx.is_main:
                print(f"resumed from {self.checkpoint} at step {self.start}", file=sys.stderr)
        self.metrics = MetricsLog(self.folder / "metrics.jsonl", cfg.steps, self.start, quiet=cfg.quiet,
                                  batch_size=cfg.batch_size,
                                  tensorboard_dir=self.folder / "tensorboard" if cfg.tensorboard else None
                                  ) if self.writes else None
        self.skipper = NonFiniteSkipper(verbose=ctx.is_main)
        self.dry = DryRun(ctx.device) if cfg.dry_run else None
        return self.start

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Around the loop: SIGTERM asks for a checkpoint and an exit (in ``save``); Ctrl-C exits naming the last
        intact checkpoint; a dry run that runs out of memory ends and reports it (``dry_run_report``)."""
        try:
            with StopSignal() as self.stop:
                yield
        except KeyboardInterrupt:
            self._close_log()
            raise SystemExit(interrupt_message(self.folder, self.current)) from None
        except (RuntimeError, MemoryError) as e:
            if self.dry is None or not is_out_of_memory(e):
                raise
            self.out_of_memory = str(e).split("\n")[0]

    def steps(self) -> Iterator[int]:
        """The steps to train, from the resumed one to ``cfg.steps``; a dry run times its first ``dry_run_steps``."""
        for step in range(self.start, self.cfg.steps):
            self.current = step
            self.model.train()
            if self.dry:
                self.dry.start()
            yield step
            if self.dry:
                self.dry.stop()
                if step + 1 - self.start >= self.cfg.dry_run_steps:
                    return

    def batch(self, data, step: int) -> tuple[Tensor, list[Tensor]]:
        """The global batch of ``step`` (``data.batch_indices``: a pure function of seed and step) and this rank's
        micro-batches of it (positions); a bucket's short batches are split as evenly as they go."""
        idx = data.batch_indices(step, self.cfg.batch_size, self.cfg.seed)
        return idx, bucket_chunks(len(idx), self.ctx, self.cfg.grad_accum) if data.bucketed else self.chunks

    def step(self, step: int, chunks: list[Tensor], loss_fn: Callable[[Tensor], Tensor]) -> tuple[float, float | None]:
        """One optimizer step at the scheduled learning rate over this rank's micro-batches ``chunks`` (global-batch
        positions; ``loss_fn(positions)`` gives their per-sample losses), then the EMA and post-hoc EMA updates.
        Returns the global mean loss and the gradient norm (None: a non-finite step, skipped)."""
        cfg = self.cfg
        for group in self.opt.param_groups:  # a group's "lr_scale" (build's params as groups) scales the schedule
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule) * group.get("lr_scale", 1)
        loss, grad_norm, self.stop_now = train_step(self.ctx, self.wrapped, self.model, self.opt, self.skipper, chunks,
                                                    loss_fn, cfg.batch_size, step, cfg.grad_clip, self.stop)
        if grad_norm is not None:
            self.ema.update(self.model)
            for p in self.posthoc:
                p.update(self.model, step + 1)
        return loss, grad_norm

    def log(self, step: int, loss: float, grad_norm: float | None, **metrics: Tensor | float) -> None:
        """Every ``log_every`` steps and at the last: a metrics.jsonl line (loss, the loop's ``metrics``, gradient
        norm, lr, speed) and the progress line."""
        n = step + 1
        if self.metrics is None or (n % self.cfg.log_every and n != self.cfg.steps):
            return
        self.metrics.log(step, loss=loss, **{k: float(v.detach() if isinstance(v, Tensor) else v)
                                             for k, v in metrics.items()},
                         grad_norm=grad_norm if grad_norm is not None else float("nan"),
                         lr=self.opt.param_groups[0]["lr"])

    def samples(self, step: int, draw: Callable[[Any, int], None], target: Callable[[nn.Module], Any] | None = None
                ) -> None:
        """Every ``sample_every`` steps ``draw(subject, step + 1)`` (a sample grid into ``folder/samples``), and the
        due callbacks with ``subject``: ``target(ema)`` (default: the EMA module itself), built once, on rank 0."""
        n = step + 1
        sample_due = self.cfg.sample_every and n % self.cfg.sample_every == 0
        hook_due = any(cb.every > 0 and n % cb.every == 0 for cb in self.callbacks)
        if self.dry or not (sample_due or hook_due):
            return
        ema = gathered(self.ema.module, self.plain)  # a collective under FSDP: every rank calls it
        if not self.ctx.is_main:
            return
        subject = target(ema) if target is not None else ema
        if sample_due:
            draw(subject, n)
        if hook_due:
            run_callbacks(self.callbacks, n, lambda: subject)

    def save(self, step: int) -> None:
        """Post-hoc EMA snapshots every ``posthoc_every`` steps; a training checkpoint every ``save_every`` steps
        (the last is ``finish``'s), and when a rank got SIGTERM a checkpoint and an exit."""
        n = step + 1
        if self.dry:
            return
        if self.cfg.posthoc_every and n % self.cfg.posthoc_every == 0:
            for p in self.posthoc:
                state = full_state(p.module)  # a collective under FSDP
                if self.ctx.is_main:
                    save_snapshot(self.folder, p, n, state)
        if self.stop_now or (n % self.cfg.save_every == 0 and n < self.cfg.steps):
            folder = self._checkpoint(n)
            if self.stop_now:
                self._close_log()
                raise SystemExit(preempted_message(folder, n))

    def advance(self, step: int, chunks: list[Tensor], loss_fn: Callable[[Tensor], Tensor],
                draw: Callable[[Any, int], None] | None = None, target: Callable[[nn.Module], Any] | None = None
                ) -> tuple[float, float | None]:
        """``step``, ``log``, ``samples`` (when ``draw`` is given) and ``save`` in a row: a loop with nothing of its
        own between them. Returns ``step``'s (loss, grad_norm)."""
        loss, grad_norm = self.step(step, chunks, loss_fn)
        self.log(step, loss, grad_norm)
        if draw is not None:
            self.samples(step, draw, target)
        self.save(step)
        return loss, grad_norm

    def sample_path(self, n: int, suffix: str = ".png") -> Path:
        """Where the sample grid of step ``n`` goes: ``folder/samples/step_{n:07d}`` + suffix."""
        return self.folder / "samples" / f"step_{n:07d}{suffix}"

    def dry_run_report(self) -> dict:
        """What the dry run measured (or the out-of-memory error it met), printed as JSON on rank 0."""
        report = self.dry.report(self.cfg.steps, self.cfg.batch_size, self.ctx.world, out_of_memory=self.out_of_memory)
        print_dry_run(report, self.ctx)
        return report

    def finish(self) -> nn.Module | None:
        """After the loop: close the log, write the last training checkpoint, and return the EMA module, whole
        (under FSDP gathered into rank 0's copy, and None on the other ranks). A collective."""
        self._close_log()
        self._checkpoint(self.cfg.steps)
        return gathered(self.ema.module, self.plain)

    def _checkpoint(self, step: int) -> Path:
        if self.ctx.is_main:
            for module in [self.model, *self.checked]:
                check_finite_params(module)
        return save_training_checkpoint(self.folder, step, self.model, self.ema, self.opt, None, to_dict(self.cfg),
                                        self.cfg.keep_last, ctx=self.ctx, extra=self.extra)

    def _close_log(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
