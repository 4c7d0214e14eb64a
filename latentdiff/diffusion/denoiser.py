"""Denoiser: a raw network plus a parameterization gives x0_hat = D(x, sigma, cond), Karras et al. 2022.

The network is called ``network(c_in * x, c_noise, cond) -> raw`` with c_noise of shape (B,) in float32.
Scalings are computed in float64, the network runs in its own dtype (that of its first parameter,
else x's), and the result comes back in x's dtype. At sigma = inf, x is the unit noise itself and the
scalings are the limits documented in ``parameterization.py``; e.g. a flow model gets z = noise at t = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latentdiff.diffusion.parameterization import Parameterization
from latentdiff.types import Cond


def _network_dtype(network, fallback: torch.dtype) -> torch.dtype:
    if isinstance(network, nn.Module):
        for p in network.parameters():
            return p.dtype
    return fallback


class Denoiser(nn.Module):
    """x0_hat = c_skip * x + c_out * network(c_in * x, c_noise, cond), EDM preconditioning."""

    def __init__(self, network, parameterization: Parameterization):
        super().__init__()
        if not isinstance(parameterization, Parameterization):
            raise TypeError(
                f"parameterization must be a Parameterization, got {type(parameterization).__name__}"
            )
        self.network = network
        self.parameterization = parameterization

    @property
    def sigma_min(self) -> float:
        return self.parameterization.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.parameterization.sigma_max

    def scalings(self, x: Tensor, sigma) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) shaped (B, 1, ..., 1) in x's dtype and c_noise (B,) float32, on x's device."""
        B = x.shape[0]
        sigma = torch.as_tensor(sigma)
        # float64 where the device has it (MPS does not): scalings are computed there, then cast
        dev = torch.device("cpu") if x.device.type == "mps" or sigma.device.type == "mps" else sigma.device
        sigma = sigma.to(dev, torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(B)
        if sigma.shape != (B,):
            raise ValueError(
                f"sigma must be a scalar or of shape ({B},) for a batch of {B}, got {tuple(sigma.shape)}"
            )
        c_skip, c_out, c_in, c_noise = self.parameterization.scalings(sigma)
        shape = (B,) + (1,) * (x.ndim - 1)  # (B, 1, 1, 1)
        c_skip, c_out, c_in = (c.to(x.device, x.dtype).view(shape) for c in (c_skip, c_out, c_in))
        return c_skip, c_out, c_in, c_noise.to(x.device, torch.float32)

    def raw_output(self, x: Tensor, scalings, cond: Cond | None = None) -> Tensor:
        """The network's raw output F(c_in * x, c_noise, cond), in the network's dtype."""
        _, _, c_in, c_noise = scalings
        return self.network((c_in * x).to(_network_dtype(self.network, x.dtype)), c_noise, cond)  # (B, C, H, W)

    def forward(self, x: Tensor, sigma, cond: Cond | None = None) -> Tensor:
        scalings = self.scalings(x, sigma)
        return self.parameterization.from_raw(scalings, x, self.raw_output(x, scalings, cond).to(x.dtype))

    def raw_target(self, x: Tensor, sigma, x0: Tensor) -> Tensor:
        """The raw network output that would give x0 exactly (finite sigma > 0): eps, v, velocity, ..."""
        return self.parameterization.raw_target(self.scalings(x, sigma), x, x0)

    def from_raw(self, x: Tensor, sigma, raw: Tensor) -> Tensor:
        """x0_hat from a raw network output (the inverse of ``raw_target``)."""
        return self.parameterization.from_raw(self.scalings(x, sigma), x, raw)
