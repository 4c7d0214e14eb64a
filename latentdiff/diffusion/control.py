"""ControlNet on any sampler: a denoiser whose network gets the residuals of one or more ControlNets.

``ControlledDenoiser(denoiser, controls, sigmas)`` is a ``Denoiser`` (same network, same parameterization), so
guidance (CFG, rescale, APG, PAG) and every sampler use it unchanged. On each call it runs every active ControlNet
on the network's own input (``c_in * x``, ``c_noise``) and Cond, sums their residuals, each times its scale, and
adds the sum to ``Cond.control``, which the U-Net adds to its skips and middle block (diffusers'
``down_block_additional_residuals`` / ``mid_block_additional_residual``). Under CFG the batch is [cond; uncond], so
the ControlNets see the negative prompt too and the control image is repeated to the batch, as in diffusers.

Start and end (fractions of the sampling run, diffusers' ``control_guidance_start`` / ``_end``): a ControlNet acts at
step ``i`` of ``n`` when ``start <= i / n`` and ``(i + 1) / n <= end``. The step of a call is read off the sigma grid:
the number of grid sigmas after the first that are >= the call's sigma (a call at ``sigmas[i]`` is step ``i``; a
second-order sampler's midpoint between ``sigmas[i]`` and ``sigmas[i + 1]`` also counts as step ``i``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from latentdiff.diffusion.denoiser import Denoiser, _network_dtype
from latentdiff.types import Cond


@dataclass
class Control:
    """One ControlNet at work: the network, its control image and when and how strongly it acts."""

    net: object  # net(x_in, c_noise, cond, image) -> residuals (models/controlnet.py's ControlNet)
    image: Tensor  # (1 or B, C, H, W) in [0, 1], at the image's pixel size
    scale: float = 1.0  # its residuals are multiplied by this (diffusers' controlnet_conditioning_scale)
    start: float = 0.0  # fraction of the sampling run where it starts acting
    end: float = 1.0  # fraction of the sampling run where it stops

    def __post_init__(self):
        if not (0.0 <= self.start < self.end <= 1.0):
            raise ValueError(f"control start and end must satisfy 0 <= start < end <= 1, got start {self.start}, "
                             f"end {self.end}")
        if not abs(self.scale) < float("inf"):
            raise ValueError(f"control scale must be finite, got {self.scale}")


def step_of(sigma: float, sigmas: Tensor) -> int:
    """The sampling step a call at ``sigma`` belongs to on grid ``sigmas`` (decreasing, ending in 0)."""
    n = len(sigmas) - 1
    later = sigmas[1:n]  # grid sigmas of steps 1..n-1
    return int((later >= sigma * (1 - 1e-5)).sum())


def active(control: Control, step: int, n: int) -> bool:
    """Whether a ControlNet acts at ``step`` of ``n`` (diffusers' ``controlnet_keep``)."""
    return not (step / n < control.start or (step + 1) / n > control.end)


def _batched(image: Tensor, B: int) -> Tensor:
    """The control image repeated to a batch of B (B a multiple of its own batch: CFG's [cond; uncond])."""
    b = image.shape[0]
    if B % b:
        raise ValueError(f"the control image has batch {b}, which does not divide the batch of {B} being denoised")
    return image.repeat(B // b, 1, 1, 1) if B != b else image


class ControlledDenoiser(Denoiser):
    """A denoiser whose network also gets ControlNet residuals (Zhang et al. 2023), several summed with scales."""

    def __init__(self, denoiser: Denoiser, controls: list[Control], sigmas: Tensor | None = None):
        super().__init__(denoiser.network, denoiser.parameterization)
        self.controls = list(controls)
        self.sigmas = None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        if self.sigmas is not None and len(self.sigmas) < 2:
            raise ValueError("the sigma grid of a controlled run needs at least one step")

    def acting(self, sigma: Tensor) -> list[Control]:
        """The controls that act at this sigma (all of them without a grid, e.g. in training)."""
        if self.sigmas is None:
            return self.controls
        n = len(self.sigmas) - 1
        step = step_of(float(torch.as_tensor(sigma).reshape(-1)[0]), self.sigmas)
        return [c for c in self.controls if active(c, step, n)]

    def control_cond(self, x_in: Tensor, c_noise: Tensor, cond: Cond | None, controls: list[Control]) -> Cond | None:
        """``cond`` with the scaled sum of the controls' residuals added to its ``control``."""
        total = None
        for c in controls:
            if c.scale == 0:
                continue
            image = _batched(c.image.to(x_in.device), x_in.shape[0])
            residuals = [r * c.scale for r in c.net(x_in, c_noise, cond, image)]
            total = residuals if total is None else [a + b for a, b in zip(total, residuals, strict=True)]
        if total is None:
            return cond
        cond = cond if cond is not None else Cond()
        if cond.control is not None:
            total = [a + b for a, b in zip(cond.control, total, strict=True)]
        dtype = _network_dtype(self.network, x_in.dtype)
        return Cond(cond.context, cond.context_mask, cond.vector, cond.concat, [r.to(dtype) for r in total])

    def raw_output(self, x: Tensor, scalings, cond: Cond | None = None, controls: list[Control] | None = None
                   ) -> Tensor:
        """The network's raw output with the residuals of ``controls`` (default: all) added."""
        _, _, c_in, c_noise = scalings
        x_in = (c_in * x).to(_network_dtype(self.network, x.dtype))
        cond = self.control_cond(x_in, c_noise, cond, self.controls if controls is None else controls)
        return self.network(x_in, c_noise, cond)  # (B, C, H, W)

    def forward(self, x: Tensor, sigma, cond: Cond | None = None) -> Tensor:
        scalings = self.scalings(x, sigma)
        raw = self.raw_output(x, scalings, cond, self.acting(sigma))
        return self.parameterization.from_raw(scalings, x, raw.to(x.dtype))
