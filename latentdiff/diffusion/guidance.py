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
