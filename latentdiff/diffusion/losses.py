"""Training losses: sigma samplers p(sigma), weightings, and the denoising loss.

Coordinates are EDM's: x = x0 + sigma * eps. Weightings are expressed for a loss measured on x0,
lambda(sigma) * ||D(x, sigma) - x0||^2. The network's own target space is the special case
lambda = 1 / c_out^2, since D - x0 = c_out * (F - F_target): for eps-models that is the classic
||eps - eps_hat||^2, for v-models ||v - v_hat||^2, for EDM its lambda(sigma), for flow ||u - u_hat||^2.
``denoising_loss`` with weighting=None computes exactly that raw-output MSE.

Conversions (SNR = sigma_data^2 / sigma^2, sigma_data = 1 unless the parameterization has one):
  min-SNR-gamma (Hang et al. 2023) on x0 is min(SNR, gamma); on eps it is min(SNR, gamma) / SNR and on
  v min(SNR, gamma) / (SNR + 1), as diffusers writes it; all three are the same loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.types import Cond

# ---------------------------------------------------------------------------------------------
# sigma samplers: __call__(batch_size, *, generator=None, device=None) -> (B,) float64 sigmas


def _out(sigma: Tensor, device) -> Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    return sigma.to(device, torch.float32 if device.type == "mps" else torch.float64)


def _randn(n: int, generator) -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(n, generator=generator, dtype=torch.float32, device=dev).to("cpu", torch.float64)


class DiscreteTimesteps:
    """Uniform discrete timesteps t in [0, T) of a DDPM-family model, Ho et al. 2020, as their sigmas."""

    def __init__(self, alphas_cumprod: Tensor):
        from latentdiff.diffusion.schedules import vp_sigma_table

        self.table = vp_sigma_table(alphas_cumprod)  # inf at the last timestep of a zero-terminal-SNR model

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Tensor:
        dev = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, len(self.table), (batch_size,), generator=generator, device=dev).cpu()
        return _out(self.table[t], device)


class LogNormalSigma:
    """log sigma ~ N(p_mean, p_std^2), Karras et al. 2022 (EDM)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Tensor:
        return _out((self.p_mean + self.p_std * _randn(batch_size, generator)).exp(), device)


class LogitNormalT:
    """Flow time t = sigmoid(n), n ~ N(mean, std^2), Esser et al. 2024 (SD3); returns sigma = t / (1 - t)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = mean, std

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Tensor:
        # sigma = t / (1 - t) = exp(logit t): no rounding of t to 1
        return _out((self.mean + self.std * _randn(batch_size, generator)).exp(), device)


_SIGMA_SAMPLER_ARGS = {"discrete": (), "lognormal": ("p_mean", "p_std"), "logitnormal": ("mean", "std")}


def make_sigma_sampler(name: str, parameterization=None, **kw):
    """'discrete' (needs alphas_cumprod), 'lognormal' (EDM: p_mean, p_std) or 'logitnormal' (SD3 / flow: mean, std)."""
    if name not in _SIGMA_SAMPLER_ARGS:
        raise ValueError(f"unknown sigma sampler {name!r}; known: 'discrete', 'lognormal', 'logitnormal'")
    unknown = sorted(set(kw) - set(_SIGMA_SAMPLER_ARGS[name]))
    if unknown:
        raise ValueError(f"sigma sampler {name!r} takes {list(_SIGMA_SAMPLER_ARGS[name]) or 'no arguments'}, "
                         f"not {unknown}")
    if name == "discrete":
        ac = getattr(parameterization, "alphas_cumprod", None)
        if ac is None:
            raise ValueError("the 'discrete' sigma sampler needs a discrete parameterization (eps, v, x0)")
        return DiscreteTimesteps(ac)
    if name == "lognormal":
        return LogNormalSigma(**kw)
    return LogitNormalT(**kw)


# ---------------------------------------------------------------------------------------------
# weightings on the x0 loss


def min_snr_weight(sigma: Tensor, gamma: float = 5.0, parameterization=None) -> Tensor:
    """Min-SNR-gamma weighting, Hang et al. 2023, for the x0 loss: min(SNR, gamma), SNR = sigma_data^2 / sigma^2."""
    sigma_data = parameterization.sigma_data if parameterization is not None else 1.0
    snr = sigma_data**2 / torch.as_tensor(sigma, dtype=torch.float64) ** 2
    return snr.clamp(max=gamma)


def edm_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """EDM loss weight, Karras et al. 2022: (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 on the x0 loss."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# ---------------------------------------------------------------------------------------------
# the loss


def denoising_loss(
    denoiser,
    x0: Tensor,
    sigma: Tensor,
    cond: Cond | None = None,
    *,
    weighting=None,
    noise: Tensor | None = None,
    offset_noise: float = 0.0,
    generator: torch.Generator | None = None,
    target=None,
) -> Tensor:
    """Per-sample denoising loss (B,), Karras et al. 2022: lambda(sigma) * mean ||D(x0 + sigma n) - x0||^2.

    sigma (B,) > 0; sigma = inf (zero-terminal-SNR timesteps) means x = n, the pure-noise convention.

    weighting=None: the MSE of the raw network output against its target (the classic eps-MSE for an
    eps-model), i.e. lambda = 1 / c_out^2, computed directly in the raw space for a ``Denoiser``.
    weighting=callable: lambda(sigma) on the x0 loss, e.g. ``lambda s: min_snr_weight(s, 5.0, param)``.
    offset_noise: adds offset_noise * N(0, 1) per (sample, channel), Guttenberg 2023.
    target: None (the loss pulls D(x) toward x0), or a callable (x, sigma) -> the x0 to pull toward instead, from
    the noised x and sigma (B,) (float64): a teacher's D(x) for self-distillation (``train-lora``'s ``preserve``).
    """
    B = x0.shape[0]
    sigma = torch.as_tensor(sigma)
    if sigma.shape != (B,):
        raise ValueError(f"sigma must have shape ({B},), got {tuple(sigma.shape)}")
    if bool((sigma <= 0).any()) or bool(torch.isnan(sigma).any()):
        raise ValueError("training sigmas must be > 0 (inf is pure noise: x = noise)")
    dev = generator.device if generator is not None else torch.device("cpu")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32, device=dev).to(
            x0.device, x0.dtype
        )
    if offset_noise:
        off = torch.randn(x0.shape[:2], generator=generator, dtype=torch.float32, device=dev)  # (B, C)
        noise = noise + offset_noise * off.to(x0.device, x0.dtype).view(*x0.shape[:2], *(1,) * (x0.ndim - 2))
    s = sigma.to(x0.device, torch.float64 if x0.device.type != "mps" else torch.float32)
    inf = torch.isinf(s).view(-1, *(1,) * (x0.ndim - 1))
    x = torch.where(
        inf, noise, x0 + torch.where(inf, 0, s.view_as(inf)).to(x0.dtype) * noise
    )  # x = noise at inf
    dims = tuple(range(1, x0.ndim))
    if target is not None:
        x0 = target(x, s).to(x0.dtype)  # the noised x stays the data's
    if isinstance(denoiser, Denoiser):
        # Raw space: F(c_in x, c_noise) against the raw output that gives x0; D - x0 = c_out (F - F_target).
        scalings = denoiser.scalings(x, s)
        raw = denoiser.raw_output(x, scalings, cond).float()
        target = denoiser.parameterization.raw_target(scalings, x, x0).float()
        loss = (raw - target).pow(2).mean(dims)  # (B,)
        if weighting is not None:
            loss = loss * (weighting(s) * scalings[1].view(B).double() ** 2).to(loss.dtype)
        return loss
    if weighting is None:
        raise ValueError(
            "a plain denoiser callable has no raw space: pass a weighting (lambda on the x0 loss)"
        )
    err = (denoiser(x, s, cond).float() - x0.float()).pow(2).mean(dims)  # (B,)
    return err * weighting(s).to(err.device, err.dtype)
