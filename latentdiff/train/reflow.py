"""Reflow (rectified-flow straightening; Liu et al. 2022, "Flow Straight and Fast"; InstaFlow, Liu et al. 2023):
a few-step student of a flow teacher, trained by ``latentdiff distill --method reflow``.

The teacher's ODE couples noise and data: for a cache item's prompt draw z ~ N(0, I) and solve the teacher's
classifier-free-guided ODE from it with one of our deterministic samplers, x0 = ODE(z, prompt). The student starts
as the teacher and learns the ordinary flow-matching loss on the straight line between the pair,

    t ~ U(t_min, 1),  sigma = t / (1 - t),  x = x0 + sigma z      (flow: (1 - t) x0 + t z = x / (1 + sigma))
    loss = |F_theta(x, t) - (z - x0)|^2                              (``losses.denoising_loss`` with noise = z)

so its velocity field is straighter than the teacher's and Euler in 1-4 steps lands near the teacher's many-step
sample. The pairs are CFG samples, so the student runs with guidance 1 (one network call per step).

The pairs are made once, before training, in chunks of ``reflow_chunk`` (``RUN/reflow_pairs/chunk_NNNNN.safetensors``,
each written atomically with the settings that made it): an interrupted run makes only the chunks it lacks, and
a resumed run reads exactly the pairs an uninterrupted one would; a chunk made with other settings is refused.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from latentdiff.data.buckets import batch_indices
from latentdiff.diffusion.guidance import cfg as cfg_guidance
from latentdiff.diffusion.losses import denoising_loss
from latentdiff.diffusion.parameterization import Flow
from latentdiff.diffusion.sampling import get_sampler, init_x
from latentdiff.diffusion.schedules import make_sigmas
from latentdiff.io import write_safetensors
from latentdiff.models.runtime import autocast

PAIRS_FOLDER = "reflow_pairs"
DETERMINISTIC = ("euler", "heun", "ddim", "dpmpp_2m", "unipc", "plms")  # ODE samplers: no noise after the start
FLOW_GRIDS = ("flow", "flow_match")  # the grids a flow shift applies to


def check_reflow_teacher(teacher, cfg, name: str) -> None:
    """Refuse, before any work, a teacher or settings reflow cannot take, saying which and why."""
    param = teacher.denoiser.parameterization
    if param.name != Flow.name:
        raise ValueError(f"{name} is a {param.name}-prediction model, not a flow (rectified-flow) model: reflow "
                         "straightens a flow ODE's noise-to-data map and trains the student on straight lines "
                         "between them, which only a flow model's velocity matches; use --method lcm, ct or add")
    lo, hi = cfg.guidance_range
    if cfg.guidance_embed_dim or lo != hi or cfg.init != "teacher":
        raise ValueError("reflow bakes one guidance scale into a student that starts as the teacher: set "
                         "guidance_embed_dim = 0, guidance_range = [w, w] and init = 'teacher'")
    if cfg.guidance is not None and cfg.guidance != lo:
        raise ValueError(f"guidance {cfg.guidance} differs from the pairs' guidance_range {list(cfg.guidance_range)}")
    if cfg.lora_rank:
        raise ValueError("reflow trains the whole student: set lora_rank = 0")
    fn_name = get_sampler(cfg.reflow_sampler)[0].__name__.removeprefix("sample_")
    if fn_name not in DETERMINISTIC:
        raise ValueError(f"reflow_sampler {cfg.reflow_sampler!r} is stochastic: the pairs must be the teacher's ODE "
                         f"map; use one of {', '.join(DETERMINISTIC)}")
    if cfg.reflow_pairs < cfg.batch_size:
        raise ValueError(f"reflow_pairs {cfg.reflow_pairs} must be at least batch_size {cfg.batch_size}")


def pair_sigmas(teacher, sampler: str, steps: int) -> Tensor:
    """The teacher's sigma grid for ``sampler`` at ``steps``, as ``Pipeline.generate`` lays it out (its flow shift)."""
    param = teacher.denoiser.parameterization
    grid = param.sampling_grid(get_sampler(sampler)[1])
    shift = teacher.index.scheduler.flow_shift
    kw = {"shift": shift} if shift != 1.0 and grid in FLOW_GRIDS else {}
    return make_sigmas(grid, steps, param, **kw)


def teacher_samples(teacher, sampler: str, sigmas: Tensor, noise: Tensor, cond, uncond, w: float) -> Tensor:
    """The teacher's CFG ODE solution from unit noise (B, C, h, w): ``sampler`` on ``sigmas``, CFG scale w."""
    fn = get_sampler(sampler)[0]
    return fn(cfg_guidance(teacher, w, uncond), init_x(noise, sigmas), sigmas, cond)


class ReflowPairs:
    """The run's (noise, teacher sample, cache index) triples, made or read chunk by chunk; a data source for
    ``Run.batch`` (``batch_indices``: a pure function of seed and step over the pairs)."""

    bucketed = False

    def __init__(self, noise: Tensor, x0: Tensor, index: Tensor):
        self.noise, self.x0, self.index = noise, x0, index

    def __len__(self) -> int:
        return len(self.index)

    def batch_indices(self, step: int, batch_size: int, seed: int) -> Tensor:
        return batch_indices(step, batch_size, len(self), seed)

    def loss(self, student, pairs: Tensor, gens: list[torch.Generator], conditions, cache, device) -> Tensor:
        """Per-sample flow-matching loss on the straight line between each pair, t ~ U(t_min, 1) from its own
        generator (``pairs``: positions into the pairs)."""
        param = student.parameterization
        t_min = param.sigma_min / (1 + param.sigma_min)
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
        t = t_min + (1 - t_min) * u
        idx = self.index[pairs]
        cond, _ = conditions(idx, [cache.captions[i] for i in idx.tolist()])
        return denoising_loss(student, self.x0[pairs].to(device), (t / (1 - t)).to(device), cond,
                              noise=self.noise[pairs].to(device))


def settings_of(cfg, teacher) -> dict:
    """What makes the pairs; a chunk made with other settings is refused."""
    return {"teacher": str(cfg.teacher), "cache": str(cfg.cache), "sampler": cfg.reflow_sampler,
            "steps": str(cfg.reflow_steps), "guidance": repr(float(cfg.guidance_range[0])),
            "pairs": str(cfg.reflow_pairs), "chunk": str(cfg.reflow_chunk), "seed": str(cfg.seed),
            "precision": str(cfg.precision), "parameterization": teacher.denoiser.parameterization.name}


def pair_items(cfg, n_cache: int) -> Tensor:
    """The cache items the pairs take their prompts from: the first ``reflow_pairs`` of a seeded permutation
    (repeating the cache when it is smaller)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17)
    reps = -(-cfg.reflow_pairs // n_cache)
    return torch.cat([torch.randperm(n_cache, generator=g) for _ in range(reps)])[:cfg.reflow_pairs]


def pair_noise(seed: int, first: int, count: int, shape) -> Tensor:
    """Unit noise of pairs first .. first + count - 1, each from its own CPU generator (chunking changes nothing)."""
    return torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + 10**9 + i))
                      for i in range(first, first + count)])


def make_pairs(cfg, run_folder: Path, teacher, cache, conditions, device, main: bool, barrier) -> ReflowPairs:
    """Read the run's pair chunks, making (on the main process) the ones it lacks; every process then reads them.
    A dry run makes its first chunk only, in memory, and writes nothing."""
    folder = Path(run_folder) / PAIRS_FOLDER
    want, items = settings_of(cfg, teacher), pair_items(cfg, len(cache))
    starts = list(range(0, len(items), cfg.reflow_chunk))
    if cfg.dry_run:
        chunk = _make_chunk(cfg, teacher, cache, conditions, device, items[:cfg.reflow_chunk], 0)
        return ReflowPairs(chunk["noise"], chunk["x0"], chunk["index"])
    cpu = time.process_time()
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        for k, first in enumerate(starts):
            path = folder / f"chunk_{k:05d}.safetensors"
            if path.exists():
                _check_chunk(path, want)
                continue
            idx = items[first:first + cfg.reflow_chunk]
            write_safetensors(path, _make_chunk(cfg, teacher, cache, conditions, device, idx, first), want)
            if not cfg.quiet:
                print(f"reflow pairs: {first + len(idx)}/{len(items)} ({cfg.reflow_sampler}, {cfg.reflow_steps} "
                      f"steps, CFG {cfg.guidance_range[0]:g}), {time.process_time() - cpu:.0f} CPU-s", file=sys.stderr)
    barrier()
    parts = [_read_chunk(folder / f"chunk_{k:05d}.safetensors", want) for k in range(len(starts))]
    return ReflowPairs(*(torch.cat([p[key] for p in parts]) for key in ("noise", "x0", "index")))


def _make_chunk(cfg, teacher, cache, conditions, device, idx: Tensor, first: int) -> dict[str, Tensor]:
    """Pairs first .. first + len(idx) - 1: their noise, the teacher's CFG samples from it, the cache items."""
    sigmas = pair_sigmas(teacher, cfg.reflow_sampler, cfg.reflow_steps)
    noise = pair_noise(cfg.seed, first, len(idx), cache.bucket_shapes[0])
    with autocast(cfg.precision, device), torch.no_grad():
        cond, uncond = conditions(idx, [cache.captions[i] for i in idx.tolist()])
        x0 = teacher_samples(teacher.denoiser, cfg.reflow_sampler, sigmas, noise.to(device), cond, uncond,
                             float(cfg.guidance_range[0])).float()
    if not torch.isfinite(x0).all():
        raise ValueError(f"the teacher's samples of reflow pairs {first}.. are not finite: check the teacher")
    return {"noise": noise, "x0": x0.cpu(), "index": idx}


def _check_chunk(path: Path, want: dict) -> None:
    with safe_open(str(path), "pt") as f:
        have = f.metadata() or {}
    if have != want:
        diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
        raise ValueError(f"{path} was made with other settings (had, asked: {json.dumps(diff)}): resume with the "
                         "settings of the run, or use a new --out")


def _read_chunk(path: Path, want: dict) -> dict[str, Tensor]:
    if not path.exists():
        raise ValueError(f"{path} is missing: the main process did not make the reflow pairs")
    _check_chunk(path, want)
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
