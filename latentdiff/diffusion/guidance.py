"""Guidance: a denoiser in, a denoiser out.

``cfg(denoiser, scale, uncond)`` returns ``guided(x, sigma, cond) -> x0_hat``. Conditional and
unconditional predictions go through the network as one batch of 2B (``Cond.cat``). Because x is
shared, eps, v and x0 predictions are affine in one another, so CFG in x0 space equals CFG in eps or
v space; it is computed on x0_hat.

Guidance rescale (Lin et al. 2023) is not affine-invariant; it is computed where diffusers computes it,
on the network's raw prediction (eps for eps-models, v for v-models, velocity for flow models) when the
wrapped denoiser is a ``Denoiser``, and on eps = (x - x0_hat) / sigma for any other callable.
Dynamic thresholding (Saharia et al. 2022) acts on the final x0_hat.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.types import Cond


def _batch_of(cond: Cond) -> int | None:
    for v in (cond.context, cond.context_mask, cond.vector, cond.concat):
        if v is not None:
            return v.shape[0]
    return cond.control[0].shape[0] if cond.control else None


def _broadcast(uncond: Cond, B: int) -> Cond:
    n = _batch_of(uncond)
    if n == B or n is None:
        return uncond
    if n != 1:
        raise ValueError(f"uncond has batch {n}; it must have batch 1 (shared) or {B} (one per sample)")
    return uncond.map(lambda t: t.expand(B, *t.shape[1:]))


def _std(t: Tensor) -> Tensor:
    return t.std(dim=tuple(range(1, t.ndim)), keepdim=True)


def dynamic_threshold(x0: Tensor, percentile: float) -> Tensor:
    """Dynamic thresholding, Saharia et al. 2022: s = max(1, percentile of |x0|); x0 <- clamp(x0, -s, s) / s."""
    s = torch.quantile(x0.abs().reshape(x0.shape[0], -1).float(), percentile, dim=1).clamp(min=1.0)
    s = s.to(x0.dtype).view(-1, *(1,) * (x0.ndim - 1))
    return x0.clamp(-s, s) / s


def cfg(
    denoiser,
    scale: float,
    uncond: Cond | None,
    *,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
    threshold: float | None = None,
):
    """Classifier-free guidance, Ho & Salimans 2022, with rescale, interval and dynamic thresholding.

    scale: x0 = x0_u + scale * (x0_c - x0_u); 1 skips the uncond pass.
    uncond: the unconditional Cond (batch 1 or B); None means the network's own ``cond=None`` call.
    rescale: phi of Lin et al. 2023 (0.7 in the paper), in [0, 1].
    interval: (sigma_lo, sigma_hi); guidance only where sigma_lo < sigma <= sigma_hi, plain cond
        prediction and no uncond pass elsewhere (Kynkaanniemi et al. 2024).
    threshold: percentile p in (0, 1) for dynamic thresholding (0.995 in Imagen), or None.
    """
    if not scale >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if not 0 <= rescale <= 1:
        raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
    if interval is not None:
        lo, hi = interval
        if not 0 <= lo < hi:
            raise ValueError(
                f"guidance interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi, got {interval}"
            )
    if threshold is not None and not 0 < threshold < 1:
        raise ValueError(f"threshold is a percentile in (0, 1) such as 0.995, got {threshold}")
    parameterized = isinstance(denoiser, Denoiser)

    def to_pred(x, sigma, x0):  # the space where rescale is measured
        if parameterized:
            return denoiser.raw_target(x, sigma, x0)
        s = sigma.to(x.dtype).view(-1, *(1,) * (x.ndim - 1))
        return torch.where(torch.isinf(s), x, (x - x0) / s)

    def from_pred(x, sigma, pred, x0_fallback):
        if parameterized:
            return denoiser.from_raw(x, sigma, pred)
        s = sigma.to(x.dtype).view(-1, *(1,) * (x.ndim - 1))
        return torch.where(torch.isinf(s), x0_fallback, x - s * pred)

    def guided(x: Tensor, sigma, cond: Cond | None = None) -> Tensor:
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(B) if sigma.ndim == 0 else sigma
        active = torch.ones(B, dtype=torch.bool, device=sigma.device)
        if interval is not None:
            active = (sigma > interval[0]) & (sigma <= interval[1])
        if scale == 1 or not bool(active.any()):
            # Plain conditional prediction: no uncond pass.
            x0 = denoiser(x, sigma, cond)
        else:
            # Conditional and unconditional predictions, as one batch where possible.
            if cond is None and uncond is not None:
                raise ValueError(
                    "cond is None but uncond is given: pass the conditional Cond to the guided denoiser"
                )
            if cond is not None and uncond is not None:
                both = cond.cat(_broadcast(uncond, B))
                x0_c, x0_u = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
            elif (
                cond is not None
            ):  # uncond=None: the network's own unconditional call, which cannot share a batch
                x0_c, x0_u = denoiser(x, sigma, cond), denoiser(x, sigma, None)
            else:
                raise ValueError(
                    "classifier-free guidance needs a cond (and an uncond, or None for cond=None)"
                )
            # Guidance.
            x0 = x0_u + scale * (x0_c - x0_u)
            # Guidance rescale: match the std of the guided prediction to the conditional one.
            if rescale > 0:
                pred_c, pred = to_pred(x, sigma, x0_c), to_pred(x, sigma, x0)
                pred_r = pred * (_std(pred_c) / _std(pred))
                x0 = from_pred(x, sigma, rescale * pred_r + (1 - rescale) * pred, x0)
            if not bool(active.all()):
                x0 = torch.where(active.view(-1, *(1,) * (x.ndim - 1)), x0, x0_c)
        # Dynamic thresholding of x0_hat.
        if threshold is not None:
            x0 = dynamic_threshold(x0, threshold)
        return x0

    guided.parameterization = getattr(denoiser, "parameterization", None)
    return guided


def _project(v: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """(parallel, orthogonal) parts of v relative to ``onto``, per sample, in float64 for the dot products."""
    dims = tuple(range(1, v.ndim))
    v64, o64 = v.double(), onto.double()
    unit = o64 / torch.linalg.vector_norm(o64, dim=dims, keepdim=True).clamp(min=1e-12)
    parallel = (v64 * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(v.dtype), (v64 - parallel).to(v.dtype)


def apg(denoiser, scale: float, uncond: Cond | None, *, eta: float = 0.0, norm_threshold: float = 0.0,
        momentum: float = 0.0):
    """Adaptive projected guidance, Sadat et al. 2024: CFG's update without its part parallel to the conditional
    prediction (the part that oversaturates), optionally norm-capped and with (negative) momentum.

    x0 = x0_c + (scale - 1) * (orthogonal + eta * parallel), where the update x0_c - x0_u (plus momentum times the
    running average of earlier updates) is split against x0_c and its norm capped at norm_threshold (0: no cap).
    eta = 1 and no cap or momentum is plain CFG. The running average lives in this closure: make one guided
    denoiser per generation.
    """
    if not scale >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if norm_threshold < 0:
        raise ValueError(f"APG norm_threshold must be >= 0 (0 = no cap), got {norm_threshold}")
    if not -1 < momentum < 1:
        raise ValueError(f"APG momentum must lie in (-1, 1) (the paper uses -0.5), got {momentum}")
    running: list[Tensor] = []

    def guided(x: Tensor, sigma, cond: Cond | None = None) -> Tensor:
        if scale == 1:
            return denoiser(x, sigma, cond)  # no uncond pass, as cfg
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma = sigma.expand(B) if sigma.ndim == 0 else sigma
        if cond is None or uncond is None:
            raise ValueError("APG needs a cond and an uncond, as classifier-free guidance does")
        x0_c, x0_u = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond.cat(_broadcast(uncond, B))).chunk(2)
        update = x0_c - x0_u
        if momentum:
            update = update + momentum * running[0] if running else update
            running[:] = [update]
        if norm_threshold > 0:
            norm = torch.linalg.vector_norm(update, dim=tuple(range(1, x.ndim)), keepdim=True)
            update = update * (norm_threshold / norm.clamp(min=1e-12)).clamp(max=1.0)
        parallel, orthogonal = _project(update, x0_c)
        return x0_c + (scale - 1) * (orthogonal + eta * parallel)

    guided.parameterization = getattr(denoiser, "parameterization", None)
    return guided


def autoguidance(denoiser, guide, scale: float):
    """Autoguidance, Karras et al. 2024 (EDM2): guide a model with a weaker version of itself, same condition.

    x0 = x0_guide + scale * (x0_main - x0_guide), where ``guide`` is a smaller or less-trained denoiser of the
    same data and conditioning (an early checkpoint of the same run). Both see the conditional prompt.
    """
    if not scale >= 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")

    def guided(x: Tensor, sigma, cond: Cond | None = None) -> Tensor:
        x0 = denoiser(x, sigma, cond)
        if scale == 1:
            return x0
        return torch.lerp(guide(x, sigma, cond), x0, scale)

    guided.parameterization = getattr(denoiser, "parameterization", None)
    return guided


def pag(denoiser, scale: float, perturb):
    """Perturbed-attention guidance, Ahn et al. 2024: guide away from the prediction the network makes with its
    self-attention maps replaced by the identity: x0 = x0_c + scale * (x0_c - x0_perturbed).

    ``perturb`` is a zero-argument context manager factory under which the network's self-attention is
    perturbed (``latentdiff.models.layers.perturbed_self_attention``); no uncond pass, so it needs no CFG
    training. Compose with CFG by wrapping a CFG-guided denoiser: ``pag(cfg(d, w, u), s, perturb)``.
    """
    if not scale >= 0:
        raise ValueError(f"PAG scale must be >= 0, got {scale}")

    def guided(x: Tensor, sigma, cond: Cond | None = None) -> Tensor:
        x0 = denoiser(x, sigma, cond)
        if scale == 0:
            return x0
        with perturb():
            x0_p = denoiser(x, sigma, cond)
        return x0 + scale * (x0 - x0_p)

    guided.parameterization = getattr(denoiser, "parameterization", None)
    return guided
