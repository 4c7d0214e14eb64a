"""Score distillation sampling (DreamFusion, Poole et al. 2022) from a 2D text-to-image model into a voxel grid.

Each step renders ``views`` random views of the field at the model's image size, encodes them with the model's
autoencoder (gradients flow through the encoder), noises the latents z to a random sigma in the samplers'
coordinates, x = z + sigma * eps (sigma = t / (1 - t) for flow time t ~ U(t_min, t_max), ``t_max`` annealed), and
asks the model's Denoiser for the conditional and unconditional x0 estimates in one batch. The update on z is

    sds: z - D_cfg(x, sigma)            with D_cfg = D_u + guidance * (D_c - D_u)
    csd: guidance * (D_u - D_c)         (classifier score distillation, Yu et al. 2023: the guidance term only)

i.e. DreamFusion's w(t) (eps_hat - eps) written in x0 space: eps_hat - eps = (z - D) / sigma, so this is
eps-space SDS with w = sigma (for a flow model, t times the velocity residual), one weight for all noise levels
in the space the model predicts. It is applied as the gradient of sum(stopgrad(update) * z), so Adam sees it
through the encoder and the renderer. No view-dependent suffix: the shapes model knows no "seen from the left"
(it draws flat 2D scenes), so the prompt goes in as it is; the renderer has no shading for the same reason
(the model's shapes are flat colours), so geometry comes from silhouettes alone.

Guidance defaults to 1 (the conditional estimate alone, one network pass per step). DreamFusion's large guidance
(~100) sharpens a blurry text-to-image model's mode; our shapes model already draws a prompt's one right image, and
with w > 1 the target z - update = D_u + w (D_c - D_u) overshoots that image by (w - 1) (D_c - D_u), so a right
asset is not a fixed point of the update (``fixed_point_error`` measures the stray; ``benchmarks/sds_judge.py
--fixed-point``). On the held-out prompts guidance 20 left 0.65 of views right, guidance 1 0.92 (BENCHMARKS.md).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from latentdiff.conditioning.text import HashedTextEncoder
from latentdiff.config import COUNT, FINITE, above, at_least, between, bounds, one_of
from latentdiff.data.judge import judge
from latentdiff.data.shapes import BACKGROUNDS, SIZE_RADIUS, Scene, parse_caption
from latentdiff.models.families import is_video_network
from latentdiff.threed.voxels import Camera, VoxelField, turntable

METHODS = ("sds", "csd")
SPACES = ("image", "encoder", "latent")
# 3D words the shapes model never saw, and the 2D shape every view of such an object should show.
OBJECT_WORDS = {"ball": "circle", "sphere": "circle", "orb": "circle", "cube": "square", "box": "square",
                "block": "square", "cylinder": "square", "cone": "triangle", "pyramid": "triangle"}


@dataclass
class SDSConfig:
    """``latentdiff sds``: score distillation of one prompt into a voxel grid."""

    model: str = "default"  # the 2D text-to-image model folder
    steps: int = 300  # optimizer steps
    views: int = 4  # views rendered and scored per step (one batch through the encoder and the denoiser)
    resolution: int = 32  # voxels per side
    samples: int = 48  # points per ray
    lr: float = 0.05  # Adam
    guidance: float = 1.0  # classifier-free guidance of the distillation (1: the conditional estimate alone; see above)
    method: str = "sds"  # "sds" or "csd"
    space: str = "image"  # "image" (decoded target), "encoder" (through the encoder) or "latent" (latent voxels)
    t_min: float = 0.02  # flow time (for a non-flow model: t = sigma / (1 + sigma)) drawn in [t_min, t_max]
    t_max: float = 0.98
    t_max_end: float = 0.5  # t_max falls linearly to this by the last step (coarse shape first, then detail)
    elevation: tuple = (-10.0, 10.0)  # training views' elevation range, degrees
    extent: float = 1.0  # half the image side in world units (orthographic views; the grid is [-1, 1]^3)
    tv: float = 0.0  # weight of a total-variation penalty on density
    sparsity: float = 0.0  # weight of a penalty on each view's summed opacity (against haze in empty space)
    opacity_entropy: float = 0.0  # weight of the binary entropy of each ray's opacity (summed per view): opaque or empty
    entropy_ramp: float = 0.5  # the entropy weight rises linearly from 0 to full over this share of the steps
    other_backgrounds: float = 0.0  # share of training views drawn on another named background, the prompt's
    # background word changed to match (shapes prompts with a stated background): a haze of the stated background's
    # colour shows against the others, so SDS clears it (DreamFusion's background augmentation, with a prompt to match)
    init_radius: float = 0.0  # world radius of the starting density blob; 0: the prompt's size (shapes geometry)
    negative_prompt: str = ""
    seed: int = 0
    eval_views: int = 8  # turntable views the judge reads (elevation 0)
    frames: int = 24  # turntable GIF frames
    gif_size: int = 128  # GIF pixels
    out: str = ""

    BOUNDS = bounds({"steps": COUNT, "views": COUNT, "resolution": between(4, 256), "samples": between(4, 1024),
                     "lr": above(0), "guidance": FINITE, "method": one_of(*METHODS), "space": one_of(*SPACES),
                     "t_min": between(0, 1), "t_max": between(0, 1, hi_open=True),
                     "t_max_end": between(0, 1, hi_open=True), "elevation": between(-89, 89), "extent": above(0),
                     "tv": at_least(0), "init_radius": at_least(0), "sparsity": at_least(0),
                     "opacity_entropy": at_least(0), "entropy_ramp": between(0, 1),
                     "other_backgrounds": between(0, 1), "eval_views": COUNT, "frames": COUNT,
                     "gif_size": between(8, 1024)})

    def __post_init__(self):
        if not self.t_min < min(self.t_max, self.t_max_end):
            raise ValueError(f"t_min ({self.t_min}) must be below t_max ({self.t_max}) and t_max_end "
                             f"({self.t_max_end})")
        if self.other_backgrounds and self.space == "latent":
            raise ValueError("other_backgrounds needs RGB voxels (space image or encoder), not space=latent")
        if len(self.elevation) != 2 or self.elevation[0] > self.elevation[1]:
            raise ValueError(f"elevation is a range (low, high) in degrees, got {self.elevation}")


@dataclass
class Plan:
    """What a prompt becomes: the words the model reads, the scene they state (shapes models), the background."""

    prompt: str
    model_prompt: str
    scene: Scene | None
    background: tuple[float, float, float] | None  # fixed background colour in [0, 1]; None: learned
    notes: list[str] = field(default_factory=list)


def check_text_to_image(pipe) -> None:
    """Refuse, before any work, a 2D model SDS cannot distill from: it must map a prompt alone to an image."""
    name = getattr(pipe, "name", "the model")
    if pipe.class_names:
        raise ValueError(f"{name} is class-conditional (labels {pipe.class_names[:4]}...), not text-to-image: SDS "
                         "needs a prompt-conditioned model such as the bundled default (--model default)")
    if pipe.concat_inputs is not None or pipe.index.concat is not None:
        raise ValueError(f"{name} is an inpainting model (it takes an image and a mask), not text-to-image: "
                         "use a text-to-image model for SDS")
    if pipe.index.upscale != 1:
        raise ValueError(f"{name} is a super-resolution model (x{pipe.index.upscale}), not text-to-image: use a "
                         "text-to-image model for SDS")
    network = getattr(pipe.denoiser, "network", None)
    if pipe.index.frames is not None or is_video_network(network):
        raise ValueError(f"{name} is a video model: SDS distills single images; use an image model")
    if pipe.text_encoder is None:
        raise ValueError(f"{name} has no text encoder: SDS needs a text-to-image model")


def _knows_shapes_only(pipe) -> bool:
    """Whether the model reads prompts with the built-in hashed encoder (trained on the shapes captions)."""
    return isinstance(pipe.text_encoder, HashedTextEncoder)


def plan_prompt(pipe, prompt: str) -> Plan:
    """The prompt as the model will read it. A shapes model (built-in text encoder) gets 3D object words put in its
    own ("ball" -> "circle", said in ``notes``), and a prompt that does not parse, names several objects or puts the
    object off centre is refused; a stated background is held fixed in the renderer."""
    if not prompt.strip():
        raise ValueError('empty prompt: say what to build, e.g. "a large red circle in the middle on a black '
                         'background"')
    if not _knows_shapes_only(pipe):
        return Plan(prompt, prompt, None, None, ["prompt used as given (a model outside the shapes vocabulary)"])
    notes, words = [], prompt
    for word, shape in OBJECT_WORDS.items():
        new = re.sub(rf"\b{word}(e?s)?\b", shape, words, flags=re.IGNORECASE)
        if new != words:
            notes.append(f"'{word}' read as '{shape}' (the 2D model knows circles, squares and triangles)")
            words = new
    scene = parse_caption(words)
    example = '"a large red circle in the middle on a black background"'
    if scene is None:
        raise ValueError(f"the model cannot parse {prompt!r}: it knows one to three circles, squares or triangles "
                         f"(red, green, blue, yellow, purple, cyan; small or large) on a black, gray or white "
                         f"background, e.g. {example}")
    if len(scene.objects) != 1:
        raise ValueError(f"{prompt!r} names {len(scene.objects)} objects: SDS builds one object at the centre; "
                         f"describe one, e.g. {example}")
    if scene.objects[0].position not in (None, "center"):
        raise ValueError(f"{prompt!r} puts the object on the {scene.objects[0].position}: the object sits at the "
                         f"centre of every view; say 'in the middle' or no position")
    background = None if scene.background is None else tuple(c / 255 for c in BACKGROUNDS[scene.background])
    return Plan(prompt, words, scene, background, notes)


_BACKGROUND_WORD = re.compile(r"\b(black|gr[ae]y|white)(\s+background)\b", re.IGNORECASE)


def background_variants(plan: Plan) -> list[tuple[str, tuple[float, float, float]]]:
    """(prompt, background colour) for the stated background first, then each other named background with the
    prompt's background word changed to it; only the stated one for a prompt with no background word the shapes
    vocabulary names (a learned background, or a model outside the shapes vocabulary)."""
    if plan.background is None or plan.scene is None or len(_BACKGROUND_WORD.findall(plan.model_prompt)) != 1:
        return [(plan.model_prompt, plan.background)]
    others = [name for name in BACKGROUNDS if name != plan.scene.background]
    return [(plan.model_prompt, plan.background)] + [
        (_BACKGROUND_WORD.sub(rf"{name}\2", plan.model_prompt), tuple(c / 255 for c in BACKGROUNDS[name]))
        for name in others]


def _rows(cond) -> int:
    return next(len(v) for v in (cond.context, cond.vector, cond.concat) if v is not None)


def sds_update(denoiser, z: Tensor, sigma: Tensor, eps: Tensor, cond, uncond, guidance: float, method: str
               ) -> Tensor:
    """The update on the latents z (B, C, h, w) at noise levels ``sigma`` (B,) with noise ``eps``: ``sds``
    z - D_cfg(z + sigma eps), ``csd`` guidance * (D_u - D_c); cond and uncond through the network as one batch
    (``cond``: one row for every view, or a row per view; at guidance 1, sds: the conditional pass alone)."""
    if method not in METHODS:
        raise ValueError(f"unknown SDS method {method!r}: expected one of {METHODS}")
    x = z + sigma.view(-1, *(1,) * (z.ndim - 1)) * eps
    B = z.shape[0]
    cond = cond if _rows(cond) == B else cond.repeat(B)
    if method == "sds" and guidance == 1:  # D_cfg = D_c: the unconditional pass is not needed
        return z - denoiser(x, sigma, cond)
    both = cond.cat(uncond.repeat(B))
    x0_c, x0_u = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
    if method == "csd":
        return guidance * (x0_u - x0_c)
    return z - (x0_u + guidance * (x0_c - x0_u))


def _sds_loss(pipe, images: Tensor, sigma: Tensor, generator: torch.Generator, cond, uncond, cfg: SDSConfig
              ) -> tuple[Tensor, Tensor]:
    """The loss whose gradient is the SDS update, and the update, for renders ``images`` (B, C, H, W): ``space``
    "image": d loss / d image = image - decode(z - update), the update's target decoded (no encoder gradient);
    "encoder": d loss / dz = update through the encoder; "latent": the renders are latent features, pooled to the
    latent grid (z = avg_pool(images, factor)), d loss / dz = update."""
    if cfg.space == "latent":
        z = F.avg_pool2d(images, pipe.autoencoder.factor)
    else:
        images = images * 2 - 1
        with torch.set_grad_enabled(cfg.space == "encoder" and torch.is_grad_enabled()):
            z = pipe.autoencoder.encode(images)
    eps = torch.randn(z.shape, generator=generator)
    with torch.no_grad():
        update = sds_update(pipe.denoiser, z.detach(), sigma, eps, cond, uncond, cfg.guidance, cfg.method)
    if not torch.isfinite(update).all():
        raise RuntimeError("the SDS update became non-finite: lower lr or guidance")
    if cfg.space != "image":
        return (update * z).sum() / len(images), update
    with torch.no_grad():
        target = pipe.autoencoder.decode(z - update)
    return 0.5 * (images - target).square().sum() / len(images), update


def swap_backgrounds(images: Tensor, opacity: Tensor, background: Tensor, others: Tensor, conds, share: float,
                      generator: torch.Generator) -> tuple[Tensor, object]:
    """Each view, with probability ``share``, recomposited over one of ``others`` (K, 3, 1, 1) in turn at random
    (colour + (1 - opacity) (other - background)); and the conditioning rows to match (row 0 of ``conds``: the stated
    background, row k: ``others[k - 1]``)."""
    B = len(images)
    moved = torch.rand(B, generator=generator) < share
    pick = torch.where(moved, 1 + torch.randint(len(others), (B,), generator=generator), 0)
    new = torch.cat([background.view(1, 3, 1, 1), others])[pick]
    images = images + (1 - opacity).unsqueeze(1) * (new - background.view(1, 3, 1, 1))
    return images, conds.map(lambda t: t[pick])


def fixed_point_error(pipe, images: Tensor, prompts: list[str], guidance: float, times: list[float],
                      generator: torch.Generator, method: str = "sds") -> list[float]:
    """How far the image-space SDS target decode(z - update) lies from images the prompts describe exactly
    (``images`` (N, 3, H, W) in [0, 1], e.g. ground-truth renders of shapes scenes): the RMS pixel error (0..1)
    at each flow time of ``times``, with one noise draw per image. A guidance whose target strays from a right image
    pulls a right asset away from it: the update's fixed point is not the prompt's image."""
    errors = []
    with torch.no_grad():
        cond, uncond = pipe.encode_prompts(list(prompts), [""])
        z = pipe.autoencoder.encode(images * 2 - 1)
        for t in times:
            sigma = torch.full((len(images),), t / (1 - t))
            eps = torch.randn(z.shape, generator=generator)
            update = sds_update(pipe.denoiser, z, sigma, eps, cond, uncond, guidance, method)
            target = (pipe.autoencoder.decode(z - update) + 1) / 2
            errors.append(float((target - images).square().mean().sqrt()))
    return errors


def make_field(pipe, plan: Plan, cfg: SDSConfig) -> VoxelField:
    """The field to optimize: RGB voxels, or (``space`` "latent") voxels of the autoencoder's latent channels, whose
    fixed background is the latent of a plain image of the prompt's background colour."""
    radius = cfg.init_radius or _object_radius(plan, cfg.extent)
    if cfg.space != "latent":
        return VoxelField(cfg.resolution, background=plan.background, init_radius=radius)
    background = None
    if plan.background is not None:
        size = pipe.default_size
        flat = torch.tensor(plan.background, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size)
        with torch.no_grad():
            background = pipe.autoencoder.encode(flat * 2 - 1).mean(dim=(0, 2, 3))
    return VoxelField(cfg.resolution, background=background, init_radius=radius,
                      channels=pipe.autoencoder.latent_channels, colour="linear")


def _object_radius(plan: Plan, extent: float) -> float:
    """World radius of the starting density blob: the stated size's radius in the shapes geometry (a canvas fraction
    of the 2 * extent wide view), else a large object's."""
    size = plan.scene.objects[0].size if plan.scene is not None else None
    return 2 * extent * SIZE_RADIUS[size or "large"]


def random_cameras(n: int, elevation: tuple, extent: float, generator: torch.Generator) -> list[Camera]:
    """``n`` views: azimuths evenly spread from a random start (each step sees the object all round), elevations
    uniform in the range."""
    start = float(torch.rand((), generator=generator)) * 360
    lo, hi = elevation
    elev = lo + (hi - lo) * torch.rand(n, generator=generator)
    return [Camera(start + 360 * i / n, float(e), extent=extent) for i, e in enumerate(elev)]


def opacity_entropy(opacity: Tensor, eps: float = 1e-4) -> Tensor:
    """Binary entropy H(a) = -a log a - (1 - a) log(1 - a) of each ray's opacity a, summed over a view's rays and
    averaged over views (Magic3D's / DreamFusion's opacity regularizer). dH/da = log((1 - a) / a): descent pushes a
    ray below 1/2 to empty and one above to opaque, so a faint haze clears and a semi-transparent object fills in.
    ``a`` is clamped to [eps, 1 - eps] (the gradient is 0 beyond: an empty ray far from the object costs nothing)."""
    a = opacity.clamp(eps, 1 - eps)
    return -(a * a.log() + (1 - a) * (1 - a).log()).sum() / len(opacity)


def ramp(step: int, steps: int, share: float) -> float:
    """A weight's factor at ``step`` of ``steps``: rising linearly from 0 to 1 over the first ``share`` of the run
    (``share`` 0: 1 from the start)."""
    return 1.0 if share <= 0 else min(1.0, step / (share * max(1, steps - 1)))


def total_variation(density: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring voxels' density, over the three axes."""
    return sum((density.diff(dim=d)).abs().mean() for d in (-1, -2, -3))


@dataclass
class SDSResult:
    field: VoxelField
    plan: Plan
    history: list[dict]
    cpu_seconds: float
    wall_seconds: float
    autoencoder: object = None  # decodes the views of a latent field

    def views(self, cameras: list[Camera], size: int) -> tuple[Tensor, Tensor]:
        """RGB views (N, 3, size, size) in [0, 1] and opacity: rendered, or for a latent field rendered, pooled to
        the latent grid and decoded."""
        samples = 2 * self.field.resolution
        with torch.no_grad():
            images, opacity = self.field.render(cameras, size, samples=samples)
            if self.field.colour == "rgb":
                return images, opacity
            latents = F.avg_pool2d(images, self.autoencoder.factor)
            return ((self.autoencoder.decode(latents) + 1) / 2).clamp(0, 1), opacity


def distill(pipe, plan: Plan, cfg: SDSConfig, callback=None) -> SDSResult:
    """Optimize a ``VoxelField`` so that its views look like ``plan.model_prompt`` to the model (the loop above).
    ``callback(step, record)`` sees each logged record (every tenth of the run)."""
    check_text_to_image(pipe)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    volume = make_field(pipe, plan, cfg)
    trained = [p for p in volume.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=cfg.lr)
    size = pipe.default_size
    variants = background_variants(plan) if cfg.other_backgrounds else [(plan.model_prompt, plan.background)]
    with torch.no_grad():
        conds, uncond = pipe.encode_prompts([prompt for prompt, _ in variants], [cfg.negative_prompt])
    colours = torch.tensor([colour for _, colour in variants[1:]], dtype=torch.float32).view(-1, 3, 1, 1)
    to_t, from_t = (lambda s: s / (1 + s)), (lambda t: t / (1 - t))  # flow time <-> sigma
    t_lo = max(cfg.t_min, to_t(pipe.denoiser.sigma_min))
    history, every = [], max(1, cfg.steps // 10)
    for step in range(cfg.steps):
        t_hi = cfg.t_max + (cfg.t_max_end - cfg.t_max) * step / max(1, cfg.steps - 1)
        t = t_lo + (t_hi - t_lo) * torch.rand(cfg.views, generator=generator)
        sigma = from_t(t)
        cameras = random_cameras(cfg.views, cfg.elevation, cfg.extent, generator)
        images, opacity = volume.render(cameras, size, cfg.samples, jitter=generator)
        cond = conds
        if len(variants) > 1:  # some views on another background, their prompt saying so
            images, cond = swap_backgrounds(images, opacity, volume.background(), colours, conds, cfg.other_backgrounds,
                                             generator)
        loss, update = _sds_loss(pipe, images, sigma, generator, cond, uncond, cfg)
        if cfg.tv:
            loss = loss + cfg.tv * total_variation(volume.density())
        if cfg.sparsity:
            loss = loss + cfg.sparsity * opacity.sum() / cfg.views
        if cfg.opacity_entropy:
            loss = loss + cfg.opacity_entropy * ramp(step, cfg.steps, cfg.entropy_ramp) * opacity_entropy(opacity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=trained)  # the field's gradients only: the model's modules are left as they are
        optimizer.step()
        if step % every == 0 or step == cfg.steps - 1:
            record = {"step": step, "t_max": round(t_hi, 4), "update_rms": float(update.square().mean().sqrt()),
                      "opacity": float(opacity.detach().mean()), "cpu_s": round(time.process_time() - cpu0, 1)}
            history.append(record)
            if callback is not None:
                callback(step, record)
    return SDSResult(volume, plan, history, time.process_time() - cpu0, time.perf_counter() - wall0,
                     pipe.autoencoder)


def to_uint8(images: Tensor) -> list[np.ndarray]:
    """Renders (N, 3, H, W) in [0, 1] as uint8 (H, W, 3) arrays."""
    return list((images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def judge_views(images: list[np.ndarray], scene: Scene) -> dict:
    """The shapes judge on each view of a one-object scene: a view is right when the judge finds exactly one object
    of the prompt's colour and shape (``all``: its size, position and the background too, where stated).
    ``consistency``: the share of views whose reading (colour, shape, size; or the object count when it is not one)
    is the most common reading."""
    target = scene.objects[0]
    readings, right, all_right = [], [], []
    for image in images:
        seen = judge(image)
        one = seen.objects[0] if len(seen.objects) == 1 else None
        readings.append((one.color, one.shape, one.size) if one else f"{len(seen.objects)} objects")
        ok = one is not None and one.color == target.color and one.shape == target.shape
        right.append(ok)
        all_right.append(ok and all(getattr(target, a) in (None, getattr(one, a)) for a in ("size", "position"))
                         and scene.background in (None, seen.background))
    counts = {r: readings.count(r) for r in readings}
    return {"views": len(images), "right": float(np.mean(right)), "all_right": float(np.mean(all_right)),
            "consistency": max(counts.values()) / len(readings),
            "readings": [r if isinstance(r, str) else " ".join(r) for r in readings]}


def evaluate(result: SDSResult, size: int, views: int, extent: float = 1.0) -> tuple[dict, Tensor]:
    """Render ``views`` turntable views (elevation 0, offset half a step from azimuth 0) at ``size`` pixels and
    judge them (shapes prompts); the silhouette's area across views (``area_cv``: its coefficient of variation).
    Returns the figures and the views (N, 3, size, size) in [0, 1]."""
    images, opacity = result.views(turntable(views, start=180.0 / views, extent=extent), size)
    area = opacity.mean(dim=(1, 2))
    out = {"opacity_area": [round(float(a), 4) for a in area],
           "area_cv": float(area.std() / area.mean().clamp(min=1e-8)) if views > 1 else 0.0}
    if result.plan.scene is not None:
        out.update(judge_views(to_uint8(images), result.plan.scene))
    return out, images
