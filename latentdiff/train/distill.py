"""Few-step students on the run engine (``train.run``): latent consistency distillation (LCD, Luo et al. 2023,
"Latent Consistency Models") from any of our teachers, and consistency training (CT, Song et al. 2023) on the
same loss.

In sigma coordinates (x = x0 + sigma * eps; DESIGN.md), on the teacher's own grid of N points
sigma_0 = boundary < sigma_1 < ... < sigma_{N} (its default grid, e.g. trailing timesteps 19, 39, ..., 999 of
a 1000-step model or flow times 1/N, ..., 1, with the final 0 replaced by the teacher's sigma_min, the boundary):

    x0 from the cache, eps ~ N(0, I), n ~ U{0, ..., N - k}, w ~ U(w_lo, w_hi) per sample
    x      = x0 + sigma_{n+k} eps                               (the unit noise itself at sigma = inf)
    x_next = D_w + sigma_n / sigma_{n+k} (x - D_w)              LCD: one DDIM step of the teacher's CFG estimate
             D_w = D_u + w (D_c - D_u)                          (= Euler in sigma = Euler in flow time t)
    x_next = x0 + sigma_n eps                                   CT: the same noise at the lower level
    loss   = d(f_theta(x, sigma_{n+k}, w), f_target(x_next, sigma_n, w))   target: EMA of theta, no gradient

f is the consistency function with LCM's boundary scalings (``parameterization.Consistency``: f = x at the
boundary exactly), d pseudo-Huber sqrt(|a - b|^2 + c^2) - c per element or L2. The student is the teacher's
network (same weights) with a guidance-scale embedding added to its pooled vector (``conditioning.guidance_scale``,
new weights at zero); the target network is the run engine's EMA (``ema_decay``, LCM: 0.95), and it is what the
model folder keeps. The folder's index says how to call it: the 'lcm' sampler and grid, 4 steps, guidance 1,
the w its embedding is given, and the step range it was distilled for (``model_index.Distilled``).

LCM-LoRA (``lora_rank`` > 0; Luo et al. 2023, "LCM-LoRA"): the same loss trained into a LoRA (``models/lora.py``)
on the frozen teacher's network. The student is the network with the LoRA, the target the network with the
engine's EMA of the LoRA instead, the teacher the network with neither (one network, adapters switched, no copy);
no w embedding (it would change a weight's shape), so one w. It writes ``RUN/lora.safetensors``, whose metadata
holds the student's index entries (``distilled``, ``generation``: sampler 'lcm', steps, guidance 1), its boundary
scalings and the teacher's parameterization; ``Pipeline.load_lora`` of that file makes the pipeline the student.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from latentdiff.components import (
    ConsistencyScalings,
    ModelFolder,
    build_denoiser,
    read_model_folder,
    write_model_folder,
)
from latentdiff.conditioning.guidance_scale import for_guidance_embedding, with_guidance_scale
from latentdiff.conditioning.text import TextEncoderConfig
from latentdiff.config import COUNT, FINITE, above, at_least, between, bounds, one_of
from latentdiff.data.cache import LatentCache
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import Consistency
from latentdiff.diffusion.schedules import make_sigmas
from latentdiff.model_index import DEFAULT_GENERATION, MAX_STEPS, Distilled, GenerationSettings
from latentdiff.models.families import family_of, spatial_factor
from latentdiff.models.lora import LoRA, save_lora
from latentdiff.models.runtime import autocast
from latentdiff.train.add import (
    WEIGHTINGS,
    Discriminator,
    DiscriminatorHeads,
    check_add_teacher,
    draw_level,
    level_probabilities,
    student_levels,
)
from latentdiff.train.add import student_loss as add_loss
from latentdiff.train.common import Trainable, check_finite_params, refuse_fsdp
from latentdiff.train.denoiser import ema_parts, sample_grid
from latentdiff.train.distributed import per_sample, sample_generators
from latentdiff.train.reflow import check_reflow_teacher, make_pairs
from latentdiff.train.run import Run, RunConfig, processes
from latentdiff.types import Cond

METHODS = ("lcm", "ct", "add", "reflow")


@dataclass
class DistillConfig(RunConfig):
    """``latentdiff distill``: a few-step consistency student of a teacher model folder, on its latent cache."""

    out: str = "runs/distill"  # run folder: checkpoints/, metrics.jsonl, samples/, and the student's model/
    teacher: str = ""  # the teacher's model folder (ours; "default": the bundled model)
    method: str = "lcm"  # "lcm": consistency distillation of the teacher's ODE; "ct": consistency training (no ODE);
    # "add": adversarial diffusion distillation (train/add.py); "reflow": rectified-flow straightening of a flow
    # teacher on its own CFG samples (train/reflow.py)
    init: str = "teacher"  # the student's first weights: the teacher's, or "random" (ct from scratch)
    cache: str = ""  # the latent cache the teacher was trained on (`latentdiff cache`)
    grid_steps: int = 50  # N: points of the teacher's own grid the student learns (LCM: 50 DDIM timesteps)
    skip: int = 1  # k: the teacher's solver step spans k grid points (sigma_{n+k} -> sigma_n)
    guidance_range: tuple[float, float] = (2.0, 6.0)  # w ~ U(lo, hi) per sample: the teacher's CFG scale
    guidance: float | None = None  # the w the student is given at generation; None: the teacher's own, clamped in
    guidance_embed_dim: int = 64  # features of w in the student's pooled vector; 0: no embedding (one w)
    loss: str = "huber"  # "huber" (pseudo-Huber, LCM) or "l2"
    huber_c: float = 0.001  # c of the pseudo-Huber loss
    sigma_data: float = 0.5  # of the boundary scalings c_skip / c_out (LCM: 0.5)
    timestep_scaling: float = 10.0  # of the boundary scalings (LCM: 10)
    steps_range: tuple[int, int] = (1, 8)  # sampler steps the student is meant for (the index says; others warn)
    sample_steps: int = 4  # the steps the index recommends, and the sample grids'
    sample_guidance: float = 1.0  # CFG on top of the student in the sample grids (its w is embedded)
    sample_schedule: str | None = None  # sigma grid of the sample grids; None: the student's index's ('lcm'; reflow:
    # the flow grid)
    sample_prompts: tuple[str, ...] = ("a large red circle on the left", "a small blue square at the top",
                                       "a large green triangle on the right", "a small yellow circle at the bottom")
    cached_text: bool = True  # read a frozen pretrained text encoder's embeddings from the cache when it has them
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # latents per step
    lr: float = 1e-4  # peak AdamW learning rate
    warmup_steps: int = 50  # linear warm-up
    lr_schedule: str = "constant"  # LCM: constant
    ema_decay: float = 0.95  # the target network's EMA (LCM: 0.95); its weights are the student saved
    sample_every: int = 500  # steps between sample grids (0 = never)
    lora_rank: int = 0  # > 0: LCM-LoRA, the student a LoRA of this rank on the frozen teacher (RUN/lora.safetensors)
    lora_alpha: float = 0.0  # the LoRA's alpha (scale alpha / rank); 0: alpha = rank
    lora_targets: tuple[str, ...] = ("attention", "conv", "ff")  # layer patterns or groups (LCM-LoRA's: attention,
    # proj_in / proj_out and feed-forward ("ff"), the ResNet and resampling convolutions ("conv"))
    adv_weight: float = 1.0  # ADD: weight of the adversarial term of the student's loss
    distill_weight: float = 2.5  # ADD: weight of the distillation term (ADD: 2.5)
    distill_weighting: str = "alpha"  # ADD: c(t) of the distillation term, "alpha" (1 / sqrt(1 + t^2)) or "uniform"
    disc_lr: float = 0.0  # ADD: the discriminator heads' AdamW learning rate (0: lr)
    disc_hidden: int = 64  # ADD: width of the discriminator heads
    disc_sigma_max: float | None = None  # ADD: the highest noise level the discriminator sees (None: every finite one)
    level_weights: tuple[float, ...] = ()  # ADD: how often each student level is drawn, highest first (one weight per
    # sample_steps level; empty: uniform). More weight on the first level trains the 1-step student harder.
    reflow_pairs: int = 4096  # reflow: (noise, teacher sample) pairs made before training, from the cache's prompts
    reflow_sampler: str = "dpmpp_2m"  # reflow: the teacher's deterministic sampler that makes the pairs
    reflow_steps: int = 10  # reflow: its steps (CFG: the guidance_range's one w)
    reflow_chunk: int = 256  # reflow: pairs made (and written) at a time; an interrupted run keeps whole chunks

    BOUNDS = bounds({"lora_rank": between(0, 4096), "lora_alpha": at_least(0), "method": one_of(*METHODS), "init": one_of("teacher", "random"), "grid_steps": between(2, 1000), "skip": COUNT,
                     "guidance_range": FINITE, "guidance": FINITE, "guidance_embed_dim": between(0, 4096),
                     "loss": one_of("huber", "l2"), "huber_c": above(0), "sigma_data": above(0),
                     "timestep_scaling": above(0), "steps_range": between(1, MAX_STEPS),
                     "sample_steps": between(1, MAX_STEPS), "sample_guidance": at_least(0),
                     "adv_weight": at_least(0), "distill_weight": at_least(0), "distill_weighting": one_of(*WEIGHTINGS),
                     "disc_lr": at_least(0), "disc_hidden": between(1, 4096),
                     "disc_sigma_max": above(0), "level_weights": at_least(0), "reflow_pairs": COUNT,
                     "reflow_steps": between(1, MAX_STEPS), "reflow_chunk": COUNT})


DISTILL_PRESETS: dict[str, dict] = {
    # The bundled default model (a flow U-Net on shapes) to 1-4 steps, on the cache it was trained on
    # (`latentdiff cache --preset shapes-default`); BENCHMARKS.md, "Few-step students".
    "shapes-lcm": {"teacher": "default", "steps": 1000, "batch_size": 32, "lr": 2e-4, "warmup_steps": 50,
                   "guidance_range": (2.0, 6.0), "guidance": 4.0, "sample_every": 500, "save_every": 250,
                   "keep_last": 2},
    "shapes-lcm-test": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "sample_every": 2,
                        "save_every": 2, "grid_steps": 10, "quiet": True},
    # LCM-LoRA of the bundled model: one w (no embedding), rank 16 on attention, feed-forward and convolutions;
    # 400 steps, 2.7 CPU-minutes (BENCHMARKS.md, "Few-step students").
    "shapes-lcm-lora": {"teacher": "default", "steps": 400, "batch_size": 32, "lr": 1e-3, "warmup_steps": 20,
                        "guidance_range": (4.0, 4.0), "guidance_embed_dim": 0, "ema_decay": 0.95, "lora_rank": 16,
                        "sample_every": 200, "save_every": 200, "keep_last": 2},
    # Adversarial diffusion distillation of the bundled model (train/add.py): the whole student from the teacher, one
    # w = 4, 4 levels (flow t = 1, 0.76, 0.5, 0.26); 1500 steps, about 10.6 CPU-minutes; the discriminator at every
    # finite level (2396 steps with disc_sigma_max 1 scored lower at 1 step). BENCHMARKS.md, "Few-step students: ADD".
    "shapes-add": {"teacher": "default", "method": "add", "steps": 1500, "batch_size": 32, "lr": 1e-4,
                   "disc_lr": 1e-3, "warmup_steps": 20, "guidance_range": (4.0, 4.0),
                   "guidance": 4.0, "guidance_embed_dim": 0, "steps_range": (1, 4), "sample_steps": 4, "ema_decay": 0.99,
                   "sample_every": 500, "save_every": 250, "keep_last": 2},
    # Reflow of the bundled model (train/reflow.py): pairs from the teacher's DPM++ 2M with CFG 4, the student (the
    # teacher's weights, no consistency scalings) on Euler's flow grid; BENCHMARKS.md, "Few-step students: reflow
    # against consistency training".
    "shapes-reflow": {"teacher": "default", "method": "reflow", "steps": 2000, "batch_size": 32, "lr": 1e-4,
                      "warmup_steps": 20, "guidance_range": (4.0, 4.0), "guidance": 4.0, "guidance_embed_dim": 0,
                      "steps_range": (1, 4), "sample_steps": 2, "ema_decay": 0.99, "reflow_pairs": 3072,
                      "reflow_sampler": "dpmpp_2m", "reflow_steps": 12, "reflow_chunk": 256, "sample_every": 500,
                      "save_every": 250, "keep_last": 2},
    "shapes-reflow-test": {"method": "reflow", "steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1,
                           "sample_every": 2, "save_every": 2, "guidance_range": (3.0, 3.0), "guidance_embed_dim": 0,
                           "steps_range": (1, 4), "sample_steps": 2, "reflow_pairs": 8, "reflow_chunk": 4,
                           "reflow_steps": 3, "quiet": True},
    # Consistency training (Song et al. 2023) of the bundled model's architecture, starting from its weights: no
    # teacher ODE, so no guidance (w = 1); the 'lcm' grid. BENCHMARKS.md, "Few-step students: reflow against
    # consistency training".
    "shapes-ct": {"teacher": "default", "method": "ct", "init": "teacher", "steps": 2200, "batch_size": 32,
                  "lr": 1e-4, "warmup_steps": 20, "guidance_range": (1.0, 1.0), "guidance_embed_dim": 0,
                  "steps_range": (1, 4), "sample_steps": 4, "ema_decay": 0.95, "sample_every": 500, "save_every": 200,
                  "keep_last": 2},
    "shapes-add-test": {"method": "add", "steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1,
                        "sample_every": 2, "save_every": 2, "grid_steps": 10, "guidance_range": (3.0, 3.0),
                        "guidance_embed_dim": 0, "steps_range": (1, 4), "quiet": True},
}


def teacher_grid(parameterization, n: int) -> Tensor:
    """The teacher's own grid of ``n`` steps, ascending: the boundary (its sigma_min), then every point above it,
    float64 (flow: up to sigma = inf)."""
    sigmas = make_sigmas("default", n, parameterization)[:-1].flip(0)  # drop the final 0, ascending
    sigmas = sigmas[sigmas > parameterization.sigma_min]
    return torch.cat([torch.tensor([parameterization.sigma_min], dtype=torch.float64), sigmas])


def _column(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)


def noised(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x = x0 + sigma * noise, per sample; the noise itself where sigma = inf (the pure-noise convention)."""
    inf = _column(torch.isinf(sigma), x0).bool()
    return torch.where(inf, noise, x0 + _column(sigma.nan_to_num(posinf=0.0), x0) * noise)


def solver_step(denoised: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """DDIM (eta 0) from sigma to sigma_next given the estimate D: D + sigma_next / sigma * (x - D), per sample.

    In sigma coordinates this is also Euler's step (``sample_euler``) and, for a flow model, Euler's in flow time;
    from sigma = inf (x the unit noise) it is the exact D + sigma_next * x (``sampling._start_from_noise``).
    """
    inf = torch.isinf(sigma)
    ratio = torch.where(inf, sigma_next, sigma_next / sigma.where(~inf, torch.ones_like(sigma)))
    eps = torch.where(_column(inf, x).bool(), x, x - denoised)  # x - D is sigma * eps_hat; at inf x is eps itself
    return denoised + _column(ratio, x) * eps


def guided(teacher: Denoiser, x: Tensor, sigma: Tensor, cond: Cond, uncond: Cond | None, w: Tensor) -> Tensor:
    """The teacher's classifier-free-guided estimate D_u + w (D_c - D_u), one w per sample, cond and uncond in one
    batch (uncond None: the conditional estimate alone)."""
    if uncond is None:
        return teacher(x, sigma, cond)
    both = teacher(torch.cat([x, x]), torch.cat([sigma, sigma]), cond.cat(uncond))
    d_cond, d_uncond = both.chunk(2)
    return d_uncond + _column(w, x) * (d_cond - d_uncond)


def distance(a: Tensor, b: Tensor, kind: str = "huber", c: float = 0.001) -> Tensor:
    """Per-sample mean of pseudo-Huber sqrt((a - b)^2 + c^2) - c (LCM) or of (a - b)^2."""
    d = (a.float() - b.float()) ** 2
    if kind == "huber":
        d = (d + c * c).sqrt() - c
    return d.flatten(1).mean(1)


def consistency_loss(student: Denoiser, target: Denoiser, x: Tensor, sigma: Tensor, x_next: Tensor,
                     sigma_next: Tensor, cond: Cond, kind: str = "huber", c: float = 0.001) -> Tensor:
    """d(f_student(x, sigma), f_target(x_next, sigma_next)) per sample, the target without gradient: the loss of
    both LCD (x_next from the teacher's solver step) and CT (x_next from the same noise)."""
    with torch.no_grad():
        want = target(x_next, sigma_next, cond)
    return distance(student(x, sigma, cond), want, kind, c)


def widen_from(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy the teacher's weights into the student; a student tensor with more input columns (the pooled-vector
    projection that also reads the guidance-scale features) gets the teacher's columns first, zeros after.
    Returns the names of the widened tensors."""
    want, have = student.state_dict(), teacher.state_dict()
    if want.keys() != have.keys():
        raise ValueError(f"student and teacher differ in tensors: {sorted(set(want) ^ set(have))[:5]}")
    widened = []
    for name, t in have.items():
        s = want[name]
        if s.shape != t.shape:
            if s.ndim != 2 or s.shape[0] != t.shape[0] or s.shape[1] < t.shape[1]:
                raise ValueError(f"{name}: the student's {tuple(s.shape)} cannot take the teacher's {tuple(t.shape)}")
            t = torch.cat([t, t.new_zeros(t.shape[0], s.shape[1] - t.shape[1])], dim=1)
            widened.append(name)
        want[name] = t.clone()
    student.load_state_dict(want, strict=True)
    return widened


def check_teacher(teacher: ModelFolder, cfg: DistillConfig, cache: LatentCache) -> None:
    """Refuse, before any work, a teacher (or settings) the method cannot take, saying which and why."""
    name, net = f"teacher {cfg.teacher}", getattr(teacher.spec, teacher.spec.network)
    lo, hi = cfg.guidance_range
    if teacher.spec.consistency is not None or teacher.index.distilled is not None:
        raise ValueError(f"{name} is already a consistency student: distill from the model it was distilled from")
    if teacher.index.class_names:
        raise ValueError(f"{name} is class-conditional: distill reads the cache's captions and conditions on text; "
                         "class-conditional teachers are not supported")
    if teacher.index.size_conditioning.embed_dim:
        raise ValueError(f"{name} takes SDXL size conditioning, which distill does not pass: not supported")
    if getattr(net, "concat_channels", 0):
        raise ValueError(f"{name} takes {net.concat_channels} concat channels (inpainting / low-res input), which "
                         "the latent cache does not hold: not supported")
    if not lo <= hi:
        raise ValueError(f"guidance_range {cfg.guidance_range} must be (lo, hi) with lo <= hi")
    if cfg.method == "ct" and ((lo, hi) != (1.0, 1.0) or cfg.guidance_embed_dim):
        raise ValueError("consistency training has no teacher ODE to take guidance from: set guidance_range = [1, 1] "
                         "and guidance_embed_dim = 0")
    if cfg.method == "reflow":
        check_reflow_teacher(teacher, cfg, name)
        if len(cache.bucket_shapes) != 1:
            raise ValueError(f"the cache {cfg.cache} has {len(cache.bucket_shapes)} buckets: reflow makes its pairs at "
                             "one latent size; use a cache of one size")
    if cfg.method == "add":
        check_add_teacher(teacher.denoiser.network, name)
        if cfg.guidance_embed_dim or cfg.init != "teacher":
            raise ValueError("ADD distils one guidance scale into a student that starts as the teacher: set "
                             "guidance_embed_dim = 0, guidance_range = [w, w] and init = 'teacher'")
        if cfg.level_weights and (len(cfg.level_weights) != cfg.sample_steps or not sum(cfg.level_weights) > 0):
            raise ValueError(f"level_weights {list(cfg.level_weights)} must give one weight per student level "
                             f"(sample_steps = {cfg.sample_steps}), highest level first, not all zero")
        if cfg.steps_range[1] > cfg.sample_steps:
            raise ValueError(f"an ADD student learns the 'lcm' grid's {cfg.sample_steps} levels (sample_steps): "
                             f"steps_range {list(cfg.steps_range)} must stay within [1, {cfg.sample_steps}]")
    text = getattr(net, "context_dim", None) is not None or getattr(net, "vector_dim", None) is not None
    if (lo, hi) != (1.0, 1.0) and not text:
        raise ValueError(f"{name} has no text conditioning (no context_dim or vector_dim), so it has no "
                         f"classifier-free guidance to distill: set guidance_range = [1, 1]")
    if cfg.lora_rank and (cfg.guidance_embed_dim or cfg.init != "teacher"):
        raise ValueError("an LCM-LoRA (lora_rank > 0) adapts the teacher's own weights: it takes no guidance-scale "
                         "embedding (set guidance_embed_dim = 0 and one w, guidance_range = [w, w]) and starts from "
                         "the teacher (init = 'teacher')")
    if cfg.lora_rank:
        refuse_fsdp(cfg, "an LCM-LoRA (lora_rank > 0)")
    if cfg.guidance_embed_dim and getattr(net, "vector_dim", None) is None:
        raise ValueError(f"{name}'s network has no pooled-vector input to take the guidance-scale embedding: set "
                         "guidance_embed_dim = 0 and one guidance scale (guidance_range = [w, w])")
    if not cfg.guidance_embed_dim and lo != hi:
        raise ValueError("without a guidance-scale embedding (guidance_embed_dim = 0) the student learns one w: set "
                         f"guidance_range = [w, w], not {list(cfg.guidance_range)}")
    if cfg.guidance is not None and not lo <= cfg.guidance <= hi:
        raise ValueError(f"guidance {cfg.guidance} lies outside the distilled guidance_range {list(cfg.guidance_range)}")
    if cfg.skip >= cfg.grid_steps:
        raise ValueError(f"skip {cfg.skip} must be smaller than grid_steps {cfg.grid_steps}")
    lo_steps, hi_steps = cfg.steps_range
    if not lo_steps <= cfg.sample_steps <= hi_steps or hi_steps > cfg.grid_steps:
        raise ValueError(f"steps_range {list(cfg.steps_range)} must hold sample_steps {cfg.sample_steps} and stay "
                         f"within grid_steps {cfg.grid_steps}")
    channels = cache.bucket_shapes[0][0]
    if channels != net.in_channels:
        raise ValueError(f"the cache {cfg.cache} holds {channels}-channel latents but {name} takes {net.in_channels}: "
                         "use the cache the teacher was trained on")
    cache.check_divisible(spatial_factor(teacher.spec.network, net))


def student_of(teacher: ModelFolder, cfg: DistillConfig) -> tuple[Denoiser, object]:
    """The student (the teacher's network, widened for the w embedding, with the boundary scalings) and its spec."""
    scalings = None if cfg.method == "reflow" else ConsistencyScalings(cfg.sigma_data, cfg.timestep_scaling)
    spec = dataclasses.replace(teacher.spec, consistency=scalings)  # reflow: a plain flow model
    if cfg.guidance_embed_dim:
        family = spec.network
        spec = dataclasses.replace(spec, **{family: for_guidance_embedding(getattr(spec, family),
                                                                             cfg.guidance_embed_dim)})
    student = build_denoiser(spec)
    if cfg.init == "random":  # consistency training from scratch: only the teacher's architecture and encoders
        return student, spec
    widened = widen_from(student.network, teacher.denoiser.network)
    if len(widened) != (1 if cfg.guidance_embed_dim else 0):
        raise ValueError(f"expected one widened pooled-vector projection, got {widened}")
    return student, spec


class LoRAStudent:
    """LCM-LoRA's three networks in one: the frozen teacher network with the trained LoRA (the student), with the
    engine's EMA of it instead (the target), or with neither (the teacher). ``using`` switches them."""

    def __init__(self, teacher: ModelFolder, cfg: DistillConfig, run: Run, extra: dict | None = None):
        network = teacher.denoiser.network
        self.param = Consistency(teacher.denoiser.parameterization, cfg.sigma_data, cfg.timestep_scaling)
        self.lora = LoRA.create(network, cfg.lora_rank, cfg.lora_alpha or None, cfg.lora_targets,
                                family=family_of(network), name=Path(cfg.out).name)
        run.build(self.lora, extra=extra)
        self.lora.attach(network)
        self.ema = run.ema.module
        self.ema.enabled = False
        self.ema.attach(network)
        self.student = Denoiser(network, self.param)

    @contextmanager
    def using(self, which: LoRA | None):
        """Within the block only ``which`` is on (None: the teacher's own network); after it the trained LoRA."""
        for lora in (self.lora, self.ema):
            lora.enabled = lora is which
        try:
            yield
        finally:
            self.lora.enabled, self.ema.enabled = True, False

    def target(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """f_target: the student's function with the EMA adapters."""
        with self.using(self.ema):
            return self.student(x, sigma, cond)

    def metadata(self, teacher: ModelFolder, cfg: DistillConfig, index) -> dict:
        """What the LoRA file says besides its adapters: the student's index entries, scalings and base model."""
        return {"base_model": str(cfg.teacher), "steps": cfg.steps, "cache": str(cfg.cache),
                "parameterization": teacher.denoiser.parameterization.name,
                "distilled": dataclasses.asdict(index.distilled), "generation": dataclasses.asdict(index.generation),
                "consistency": dataclasses.asdict(ConsistencyScalings(cfg.sigma_data, cfg.timestep_scaling))}


def student_index(teacher: ModelFolder, cfg: DistillConfig):
    """The student's model index: the teacher's, with the LCM sampler (reflow: Euler), its steps, guidance 1 and
    ``Distilled``."""
    lo, hi = cfg.guidance_range
    w = cfg.guidance
    if w is None:
        w = min(max(teacher.index.generation.guidance or DEFAULT_GENERATION.guidance, lo), hi)
    sampler, schedule = ("euler", None) if cfg.method == "reflow" else ("lcm", "lcm")  # reflow: Euler, flow grid
    generation = GenerationSettings(sampler=sampler, steps=cfg.sample_steps, guidance=1.0, schedule=schedule,
                                    guidance_method="cfg", pag_scale=0.0)
    return dataclasses.replace(teacher.index, generation=generation, distilled=Distilled(
        method=cfg.method, teacher=str(cfg.teacher), guidance_embed_dim=cfg.guidance_embed_dim,
        embedded_guidance=float(w), guidance_range=(float(lo), float(hi)), steps_range=tuple(cfg.steps_range),
        grid_steps=cfg.grid_steps))


def load_teacher(path: str) -> ModelFolder:
    """The teacher's model folder ("default": the bundled model, checked against its manifest)."""
    if not path:
        raise ValueError("distill needs a teacher: --teacher MODEL_FOLDER (or 'default', the bundled model)")
    if path == "default":
        from latentdiff.default import verify

        path = str(verify())
    folder = read_model_folder(path)
    for p in folder.denoiser.parameters():
        p.requires_grad_(False)
    folder.text_encoder.requires_grad_(False)
    return folder


def distill(cfg: DistillConfig) -> Path | dict:
    """Distill ``cfg.teacher`` into a few-step student; write ``cfg.out/model`` (a model folder; with
    ``cfg.lora_rank``, ``cfg.out/lora.safetensors``) and return it. With ``cfg.dry_run`` it returns the dry-run
    report instead and writes nothing."""
    with processes(cfg) as ctx:
        # Setup: the teacher, checked with the cache before any work.
        if cfg.method == "add" and ctx.distributed:
            raise ValueError("ADD's discriminator heads are not synchronized between processes: run distill --method "
                             "add in one process (without torchrun)")
        run = Run(cfg, ctx)
        teacher, cache = load_teacher(cfg.teacher), LatentCache(cfg.cache)
        check_teacher(teacher, cfg, cache)
        device, main = ctx.device, ctx.is_main
        grid = teacher_grid(teacher.denoiser.parameterization, cfg.grid_steps)  # (M,), ascending from the boundary
        te_cfg = getattr(teacher.text_encoder, "config", None)
        cached_text = cfg.cached_text and isinstance(te_cfg, TextEncoderConfig) and cache.uses_text(te_cfg)
        ae, t_den = teacher.autoencoder, teacher.denoiser.to(device)
        lo, hi = cfg.guidance_range
        reflow = cfg.method == "reflow"  # the student learns the pairs' conditional velocity: no uncond
        conditions = Conditions(cache, teacher.text_encoder.to(device), cached_text,
                                (lo, hi) != (1.0, 1.0) and not reflow, device)
        index = student_index(teacher, cfg)

        # Build: the student from the teacher (or a LoRA on it); the engine's EMA of it is the target network.
        # ADD: the discriminator's heads and optimizer, kept in the checkpoints with the student.
        run.seed()
        disc = _discriminator(teacher, cfg, main, device) if cfg.method == "add" else None
        extra = disc.checkpointed() if disc else None
        lora = LoRAStudent(teacher, cfg, run, extra) if cfg.lora_rank else None
        if lora is None:
            student, spec = student_of(teacher, cfg)
            run.build(Trainable(student.network, None), extra=extra)
        else:
            student, spec = lora.student, None
        teacher_mode = (lambda: lora.using(None)) if lora else nullcontext  # the network as the teacher's alone
        if disc:
            disc.frozen = teacher_mode
            levels = student_levels(teacher.denoiser.parameterization, cfg.sample_steps, cfg.grid_steps)
            level_p = level_probabilities(cfg.level_weights, len(levels))
        param = student.parameterization
        pairs = make_pairs(cfg, run.folder, teacher, cache, Conditions(cache, conditions.text_encoder, cached_text, True,
                                                                       device), device, main, ctx.barrier) if reflow else None
        if main and not cfg.quiet:
            what = f"LoRA rank {cfg.lora_rank} on {len(lora.lora.names)} layers of " if lora else ""
            print(f"distill ({cfg.method}) {what}{cfg.teacher}: {teacher.spec.network} ({param.name}), {len(grid)} "
                  f"grid points, skip {cfg.skip}, w in [{lo:g}, {hi:g}]; {len(cache)} cached latents", file=sys.stderr)
        parts: dict = {}  # ADD's loss terms of this step, for the log

        # Loop.
        with run.guard():
            for step in run.steps():
                idx, chunks = run.batch(cache if pairs is None else pairs, step)

                def loss_fn(positions: Tensor, step: int = step, idx: Tensor = idx) -> Tensor:
                    """Per-sample losses of these global-batch positions, each from its own generator."""
                    gens = sample_generators(cfg.seed, step, positions)
                    if pairs is not None:  # reflow: flow matching on the straight line of each pair (train/reflow.py)
                        with autocast(cfg.precision, device):
                            return pairs.loss(student, idx[positions], gens, conditions, cache, device)
                    drawn = [cache.sample(idx[p:p + 1], g) for p, g in zip(positions.tolist(), gens)]
                    x0 = ae.normalize(torch.cat([raw for raw, _ in drawn])).to(device)
                    noise = per_sample(gens, lambda g: torch.randn(1, *x0.shape[1:], generator=g)).to(device)
                    with autocast(cfg.precision, device), torch.no_grad():
                        cond, uncond = conditions(idx[positions], [c[0] for _, c in drawn])
                    if disc:  # ADD: the student's level, then its loss (train/add.py)
                        s = levels[per_sample(gens, lambda g: draw_level(level_p, g))].to(device)
                        w = torch.full((len(positions),), lo, dtype=torch.float64, device=device)

                        def teach(x: Tensor, t: Tensor) -> Tensor:
                            with teacher_mode():
                                return guided(t_den, x, t, cond, uncond, w)

                        with autocast(cfg.precision, device):
                            loss, terms = add_loss(student, teach, disc, x0, noised(x0, noise, s), s, gens, cond, grid,
                                                   adv_weight=cfg.adv_weight, distill_weight=cfg.distill_weight,
                                                   weighting=cfg.distill_weighting,
                                                   disc_sigma_max=cfg.disc_sigma_max)
                        parts.update(terms)
                        return loss
                    n = per_sample(gens, lambda g: torch.randint(cfg.skip, len(grid), (1,), generator=g))
                    w = per_sample(gens, lambda g: lo + (hi - lo) * torch.rand(1, generator=g, dtype=torch.float64))
                    sigma, sigma_next, w = grid[n].to(device), grid[n - cfg.skip].to(device), w.to(device)
                    x = noised(x0, noise, sigma)
                    with autocast(cfg.precision, device):
                        if cfg.method == "ct":
                            x_next = noised(x0, noise, sigma_next)
                        else:
                            with torch.no_grad(), teacher_mode():
                                x_next = solver_step(guided(t_den, x, sigma, cond, uncond, w), x, sigma, sigma_next)
                        s_cond = with_guidance_scale(cond, w, cfg.guidance_embed_dim) if cfg.guidance_embed_dim \
                            else cond
                        target = lora.target if lora else Denoiser(run.ema.module.network, param)
                        return consistency_loss(student, target, x, sigma, x_next, sigma_next, s_cond, cfg.loss,
                                                cfg.huber_c)

                def draw(pipe, k: int) -> None:
                    with lora.using(lora.ema) if lora else nullcontext():  # the grids show what will be saved
                        sample_grid(pipe, cfg, run.sample_path(k))

                loss, grad_norm = run.step(step, chunks, loss_fn)
                if disc and (d_loss := disc.step(step, grad_norm is not None)) is not None:
                    parts["d_loss"] = d_loss
                run.log(step, loss, grad_norm, **parts)
                run.samples(step, draw, lambda ema: _pipeline(student.network if lora else ema.network, param,
                                                              teacher, index))
                run.save(step)
        if cfg.dry_run:
            return run.dry_run_report()
        return _save(run, ctx, cfg, teacher, index, student, spec, lora)


def _discriminator(teacher: ModelFolder, cfg: DistillConfig, main: bool, device) -> Discriminator:
    """ADD's discriminator on the teacher's network: heads on its encoder features, their AdamW."""
    network = teacher.denoiser.network
    config = network.config
    cond_dim = config.vector_dim if config.vector_dim is not None else config.context_dim
    heads = DiscriminatorHeads(network.feature_channels(), cond_dim, cfg.disc_hidden).to(device)
    return Discriminator(teacher.denoiser, heads, cfg.disc_lr or cfg.lr, cfg.grad_clip, main and not cfg.quiet)


def _save(run: Run, ctx, cfg: DistillConfig, teacher: ModelFolder, index, student: Denoiser, spec,
          lora: LoRAStudent | None) -> Path:
    """The last training checkpoint, then the student's model folder (the target network's weights), or the LCM-LoRA
    (the target's adapters) with the student's settings in its metadata."""
    ema, main = run.finish(), ctx.is_main
    if lora is not None:
        path = run.folder / "lora.safetensors"
        if main:
            check_finite_params(ema)
            save_lora(path, ema, lora.metadata(teacher, cfg, index))
            if not cfg.quiet:
                print(f"{cfg.method.upper()}-LoRA written to {path}", file=sys.stderr)
        ctx.barrier()
        return path
    folder = run.folder / "model"
    if main:
        ema_student, text = ema_parts(ema, teacher.text_encoder, student)  # on the CPU
        check_finite_params(ema_student.network)
        write_model_folder(folder, ModelFolder(index, teacher.autoencoder, ema_student, spec, text))
        if not cfg.quiet:
            print(f"student written to {folder}", file=sys.stderr)
    ctx.barrier()
    return folder


class Conditions:
    """A batch's caption Cond and the empty prompt's (None without guidance), one token length for both: from the
    cache's stored embeddings of a frozen pretrained text encoder, else from the text encoder."""

    def __init__(self, cache: LatentCache, text_encoder, cached_text: bool, guidance: bool, device):
        self.cache, self.text_encoder, self.cached_text = cache, text_encoder, cached_text
        self.guidance, self.device = guidance, device

    def __call__(self, indices: Tensor, captions: list[str]) -> tuple[Cond, Cond | None]:
        cache, device = self.cache, self.device
        if not self.guidance:  # no guidance: the conditional estimate alone
            cond = cache.text_cond(indices, torch.zeros(len(indices), dtype=torch.bool)) if self.cached_text \
                else self.text_encoder(captions)
            return cond.map(lambda t: t.to(device)), None
        if self.cached_text:
            both = cache.text_cond(torch.cat([indices, indices]), torch.arange(2 * len(indices)) >= len(indices))
        else:
            both = self.text_encoder(captions + [""] * len(captions))
        n = len(captions)
        return both.map(lambda t: t[:n].to(device)), both.map(lambda t: t[n:].to(device))


def _pipeline(network: nn.Module, param, teacher: ModelFolder, index):
    """A Pipeline of the target network with the student's index, what the sample grids draw with."""
    from latentdiff.pipeline import Pipeline

    return Pipeline(teacher.autoencoder, Denoiser(network, param), teacher.text_encoder, index)
