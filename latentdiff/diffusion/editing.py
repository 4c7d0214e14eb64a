"""Editing on any sampler: img2img (SDEdit) and inpainting by latent blending, as a grid, a start and a denoiser.

SDEdit (Meng et al. 2022): noise the image's latent z0 to a sigma partway down the grid and sample from there:
``strength_sigmas`` keeps the last ``int(steps * strength)`` steps of the grid (diffusers' ``t_start``), and
``edit_start`` makes the sampler's first x, ``z0 + sigma_start * noise``. strength 1 is text-to-image: the start
is the pure noise text-to-image takes (at sigma = inf, a flow model's t = 1, the noise itself), not the image
plus noise, so no trace of the image survives it.

Inpainting (the "replacement" method: Song et al. 2021, Lugmayr et al. 2022): ``keep_known`` wraps the denoiser
so that its estimate of x0 is z0 wherever the latent mask is 0, blended by the mask at its soft edge:

    x0_hat = m * D(x, sigma) + (1 - m) * z0.

Why x0 and not x. Every sampler here updates x from (x, x0_hat) alone, and for a denoiser that returns the
constant z0 each of them moves x = z0 + sigma * n to z0 + sigma' * n' exactly: the ODE solvers with n' = n
(Euler, Heun, DDIM, PLMS, DPM++ 2M, UniPC are exact for a constant x0_hat), the ancestral and SDE ones
(Euler a, DDPM, DPM++ 2S a, 2M SDE, 3M SDE, LCM) with n' a fresh mix of n and their own noise that is again
N(0, 1): the known region stays a correct noisy copy of z0 at every sigma, and lands on z0 at sigma = 0. For the
deterministic samplers this is exactly the classic blend ``x = m * x + (1 - m) * (z0 + sigma_next * noise)``
with the start noise (diffusers' legacy inpainting); unlike the classic blend it needs no hook into the
sampler's loop, and the sampler's own state, its multistep history included, always agrees with the x it
steps (the history holds z0 in the known region, as it would for data it knew exactly), where blending x after
each step would leave an SDE sampler's history and state disagreeing. The pipeline sets the known latents to
z0 once more at the end (``torch.where(m == 0, z0, z)``), so that rounding leaves no trace there.

A grown mask while noise dominates (``early``, used while sigma > ``until``, 1 by default: signal-to-noise below
one). The repainted region then reaches a latent cell further (``edit_inputs.grown_latent_mask``), so the steps
that lay out the picture may place an object whose edge sits at the mask's border with the cells around it free
to agree; the later steps hold that ring on z0 again, and an ODE sampler, whose x0_hat there is then the constant
z0, lands on z0 at sigma = 0 whatever x was (x = z0 + sigma * n with some n, shrunk to z0). On the shapes
inpainting benchmark this put the asked object right in 0.91 of the cases against 0.89 without it, at 36.5 dB
outside the mask against 36.7; growing the mask for every step instead gave 0.91 and 33.3 dB (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def strength_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a grid an edit of ``strength`` in (0, 1] runs: its last ``int(steps * strength)`` steps, as
    diffusers' img2img pipelines count them; an error when that is no step at all."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    steps = len(sigmas) - 1
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(f"strength {strength:g} of {steps} steps runs no step (int({steps} * {strength:g}) = 0): "
                         f"raise the strength to at least {1 / steps:.3g} or take more steps")
    return sigmas[steps - kept:]


def edit_start(x_init: Tensor, noise: Tensor, sigma: float, z0: Tensor, mask: Tensor | None,
               strength: float) -> Tensor:
    """The sampler's first x for an edit starting at ``sigma``: the image's latent noised, ``z0 + sigma * noise``.

    ``x_init`` is what text-to-image starts from (``init_x``, the noise at sigma = inf). strength 1 starts there,
    except in the known region of a mask (``mask`` 0), which starts at z0 + sigma * noise so that it follows z0's
    path from the first step on; at sigma = inf there is no image in x (the first step's x0_hat, which
    ``keep_known`` makes z0, brings it in).
    """
    if math.isinf(sigma):
        return x_init
    known = z0 + sigma * noise
    start = x_init if strength == 1 else known
    if mask is None:
        return start
    return mask * start + (1 - mask) * known


def keep_known(denoiser, z0: Tensor, mask: Tensor, early: Tensor | None = None, until: float = 1.0):
    """A denoiser whose x0_hat is ``z0`` where ``mask`` is 0 and the model's where it is 1 (blended between):
    inpainting on any sampler (module docstring). ``early``: the mask used instead while sigma > ``until``."""

    def blended(x: Tensor, sigma: Tensor, cond=None) -> Tensor:
        denoised = denoiser(x, sigma, cond)
        m = mask if early is None else torch.where(torch.as_tensor(sigma, device=mask.device).reshape(-1, 1, 1, 1)
                                                   > until, early, mask)
        m = m.to(denoised.dtype)
        return m * denoised + (1 - m) * z0.to(denoised.dtype)

    return blended
