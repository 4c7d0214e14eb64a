"""Noise schedules: beta/alpha tables of discrete models and sigma grids for the samplers.

Coordinates are EDM / k-diffusion: ``x = x0 + sigma * eps``. A discrete (DDPM-family) model with
``alphas_cumprod[t]`` sees ``sigma_t = sqrt((1 - a_t) / a_t)``; its VP state is ``z = x / sqrt(1 + sigma^2)``.

Sigma grids are 1-D float64 tensors, strictly decreasing, ending in 0. A grid may start at ``inf``:
``flow_sigmas`` always does (t = 1 is pure noise) and so does ``vp_sigmas`` of a zero-terminal-SNR
model. At ``sigma = inf`` the sampler's state is the unit-variance noise itself (not ``inf * noise``);
see ``sampling.py`` for how the first step is taken exactly.

Discrete timesteps: ``sigma_to_t`` interpolates linearly in log-sigma inside the model's 1000-entry
sigma table (as k-diffusion's DiscreteSchedule and diffusers' ``_sigma_to_t``), ``t_to_sigma`` is its
exact inverse. At table sigmas both are exact lookups.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# beta / alpha tables of discrete models


def linear_betas(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """Linear beta schedule, Ho et al. 2020 (DDPM)."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def scaled_linear_betas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Linear-in-sqrt beta schedule of Stable Diffusion, Rombach et al. 2022."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


def cosine_betas(n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule, Nichol & Dhariwal 2021 (diffusers' "squaredcos_cap_v2")."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


def upscaler_betas(n: int = 1000) -> Tensor:
    """SD's x4 upscaler's schedule (its denoiser's and its low-res noise's): linear in sqrt from 1e-4 to 0.02."""
    return scaled_linear_betas(n, 1e-4, 2e-2)


# Beta schedules by name (``NoiseSchedule.betas``, ``NoiseAugmentation.betas``).
BETA_SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas,
                  "upscaler": upscaler_betas}


def alphas_cumprod(betas: Tensor) -> Tensor:
    """Cumulative product of (1 - beta): the signal fraction a_t of each discrete timestep."""
    return torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(a_t) so the last timestep has zero SNR (sigma = inf), Lin et al. 2023."""
    sqrt_ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)  # first unchanged, last exactly 0
    return sqrt_ac**2


def vp_sigma_table(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) for each discrete timestep, increasing; inf where a_t = 0."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if ac.ndim != 1 or len(ac) < 2:
        raise ValueError(
            f"alphas_cumprod must be a 1-D table of at least 2 entries, got shape {tuple(ac.shape)}"
        )
    return ((1 - ac) / ac).sqrt()


def sigma_to_t(sigma: Tensor | float, alphas_cumprod: Tensor) -> Tensor:
    """Fractional discrete timestep of sigma: linear interpolation in log-sigma in the model's table."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return log_table_to_t(sigma, vp_sigma_table(alphas_cumprod).log().to(sigma.device))


def log_table_to_t(sigma: Tensor, log_table: Tensor) -> Tensor:
    """sigma_to_t with a precomputed increasing log-sigma table (T,) on sigma's device (no host sync)."""
    n = len(log_table)
    log_sigma = sigma.clamp(min=1e-30).log()
    low = (torch.searchsorted(log_table, log_sigma.reshape(-1), right=True) - 1).clamp(0, n - 2)
    low = low.reshape(sigma.shape)
    lo, hi = log_table[low], log_table[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).nan_to_num(0.0).clamp(0, 1)  # sigma = inf is set below
    t = low.to(log_table.dtype) + w
    return torch.where(torch.isinf(sigma), torch.full_like(t, n - 1.0), t)


def t_to_sigma(t: Tensor | float, alphas_cumprod: Tensor) -> Tensor:
    """Sigma of a (fractional) discrete timestep: the inverse of sigma_to_t."""
    table = vp_sigma_table(alphas_cumprod)
    t = torch.as_tensor(t, dtype=torch.float64)
    table = table.to(t.device)
    n = len(table)
    if bool(((t < 0) | (t > n - 1)).any()):
        raise ValueError(
            f"timesteps must lie in [0, {n - 1}], got min {t.min().item()}, max {t.max().item()}"
        )
    low = t.floor().clamp(0, n - 2).long()
    w = t - low
    lo, hi = table[low].log(), table[low + 1].log()
    interp = (lo + w * (hi - lo)).exp()
    return torch.where(w == 0, table[low], torch.where(w == 1, table[low + 1], interp))


# ---------------------------------------------------------------------------------------------
# sigma grids


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n!r}")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if math.isinf(sigma_max):
        raise ValueError(
            "this grid needs a finite sigma_max; a model that starts from pure noise at sigma=inf "
            "(flow, zero terminal SNR) should use the 'flow' or a vp spacing grid ('trailing'), "
            "or pass sigma_max explicitly"
        )


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (EDM) grid: uniform in sigma^(1/rho), n steps then 0."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Grid uniform in log-sigma (k-diffusion's get_sigmas_exponential), n steps then 0."""
    _check_n(n)
    _check_range(sigma_min, sigma_max)
    return _append_zero(
        torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    )


def vp_timesteps(
    num_train_timesteps: int, n: int, spacing: str = "trailing", steps_offset: int = 0
) -> Tensor:
    """Discrete timesteps of diffusers' EulerDiscreteScheduler timestep_spacing, decreasing, float64."""
    _check_n(n)
    T = num_train_timesteps
    if n > T:
        raise ValueError(f"cannot take {n} steps on a model with {T} timesteps")
    if spacing == "trailing":  # Lin et al. 2023: always start at the last timestep
        ratio = T / n
        t = torch.tensor([round(T - i * ratio) - 1 for i in range(n)], dtype=torch.float64)
    elif spacing == "leading":  # original SD / DDIM: k * (T // n) + steps_offset
        ratio = T // n
        t = torch.arange(n - 1, -1, -1, dtype=torch.float64) * ratio + steps_offset
    elif spacing == "linspace":  # evenly spaced, fractional, from T-1 to 0
        t = torch.linspace(T - 1, 0, n, dtype=torch.float64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: choose 'trailing', 'leading' or 'linspace'")
    if t.max() > T - 1:
        raise ValueError(f"steps_offset={steps_offset} pushes timesteps past {T - 1}")
    return t


def sigmas_from_timesteps(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sigma grid of explicit decreasing discrete timesteps (e.g. a diffusers scheduler's), then 0."""
    t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    if len(t) < 1 or not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"timesteps must be non-empty and strictly decreasing, got {t.tolist()}")
    return _append_zero(t_to_sigma(t, alphas_cumprod))


def vp_sigmas(alphas_cumprod: Tensor, n: int, spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
    """Sigmas of a discrete model at diffusers' timestep_spacing ('trailing', 'leading', 'linspace'), then 0.

    Same timesteps as diffusers' EulerDiscreteScheduler. For fractional 'linspace' timesteps we
    interpolate in log-sigma (the inverse of sigma_to_t); diffusers' Euler interpolates sigma
    linearly, which differs by < 1e-3 relative between table entries.
    """
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return sigmas_from_timesteps(vp_timesteps(len(ac), n, spacing, steps_offset), ac)


def lcm_sigmas(alphas_cumprod: Tensor, n: int, original_steps: int = 50) -> Tensor:
    """Sigmas at the timesteps of Latent Consistency Models, Luo et al. 2023 (diffusers' LCMScheduler)."""
    _check_n(n)
    T = len(alphas_cumprod)
    if n > original_steps or original_steps > T:
        raise ValueError(f"LCM needs n <= original_steps <= {T}, got n={n}, original_steps={original_steps}")
    k = T // original_steps
    origin = [(i + 1) * k - 1 for i in range(original_steps)][::-1]  # e.g. 999, 979, ..., 19
    idx = [math.floor(j * original_steps / n) for j in range(n)]
    return sigmas_from_timesteps(torch.tensor([origin[j] for j in idx], dtype=torch.float64), alphas_cumprod)


def flow_sigmas(n: int, shift: float = 1.0) -> Tensor:
    """Rectified-flow grid (SD3 / Flux): t uniform from 1 to 0, shifted; sigma = t / (1 - t), starts at inf.

    The SD3 shift t' = s t / (1 + (s - 1) t) is, in sigma, just a scale: sigma' = s * sigma.
    """
    _check_n(n)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    sigmas = shift * t / (1 - t)  # t = 1 -> inf, t = 0 -> 0
    return sigmas


def flow_match_sigmas(n: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The default grid of diffusers' FlowMatchEulerDiscreteScheduler (SD3's pipelines): n times t evenly from 1
    to the shifted 1 / T, each shifted (again) by t' = s t / (1 + (s - 1) t), then 0; sigma = t / (1 - t).

    Unlike ``flow_sigmas`` it never reaches t = 0 before the final step, and its shift applies twice to the
    lower end; reproduced because SD3 checkpoints were tuned and compared on it.
    """
    _check_n(n)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")

    def shifted(t):
        return shift * t / (1 + (shift - 1) * t)

    t = _append_zero(shifted(torch.linspace(1.0, shifted(1.0 / num_train_timesteps), n, dtype=torch.float64)))
    return t / (1 - t)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent mu, linear in the number of latent tokens (Esser et al. 2024)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_shift(image_seq_len: int, **kw) -> float:
    """The flow_sigmas shift equal to Flux's exponential time shift: exp(flux_mu(image_seq_len, ...))."""
    return math.exp(flux_mu(image_seq_len, **kw))


def check_sigmas(sigmas) -> Tensor:
    """Validate a sigma grid and return it as 1-D float64 on the CPU; raise a ValueError that says why not."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if s.ndim != 1 or len(s) < 2:
        raise ValueError(
            f"sigmas must be a 1-D grid of at least 2 values (1 step), got shape {tuple(s.shape)}"
        )
    if bool(torch.isnan(s).any()):
        raise ValueError(f"sigmas contain NaN: {s.tolist()}")
    if s[-1] != 0:
        raise ValueError(f"sigmas must end in 0 (the clean sample), last is {s[-1].item()}")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing, got {s.tolist()}")
    if bool(torch.isinf(s[1:]).any()):
        raise ValueError("only sigmas[0] may be inf (start from pure noise)")
    return s


# ---------------------------------------------------------------------------------------------
# grids by name, for a parameterization


def _needs_table(name: str, param) -> Tensor:
    ac = getattr(param, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"grid {name!r} needs a discrete model (alphas_cumprod); {param.name!r} has none")
    return ac


def _grid_default(n, param, **kw):
    return GRIDS[param.default_grid](n, param, **kw)  # flow -> flow, discrete -> trailing, EDM -> karras


def _ramp(ramp, n, param, sigma_min, sigma_max, **kw):
    """A ramp between the model's sigma limits, spaced in the parameterization's ramp coordinate (flow: t from 1
    exactly, so the grid starts at sigma = inf); given limits, spaced in sigma."""
    if sigma_max is not None:
        return ramp(n, sigma_min or param.sigma_min, sigma_max, **kw)
    lo, hi = param.to_ramp(sigma_min or param.sigma_min), param.to_ramp(param.sigma_max)
    return param.from_ramp(ramp(n, lo, hi, **kw))


def _grid_karras(n, param, sigma_min=None, sigma_max=None, rho=7.0):
    return _ramp(karras_sigmas, n, param, sigma_min, sigma_max, rho=rho)


def _grid_exponential(n, param, sigma_min=None, sigma_max=None):
    return _ramp(exponential_sigmas, n, param, sigma_min, sigma_max)


def _grid_spacing(spacing):
    def grid(n, param, **kw):
        return vp_sigmas(_needs_table(spacing, param), n, spacing, **kw)

    return grid


def _grid_flow(n, param, shift=1.0):
    return flow_sigmas(n, shift)


def _grid_flow_match(n, param, shift=1.0):
    return flow_match_sigmas(n, shift)


def _grid_lcm(n, param, original_steps=50):
    if getattr(param, "alphas_cumprod", None) is not None:
        return lcm_sigmas(param.alphas_cumprod, n, original_steps)
    return lcm_subgrid(GRIDS["default"](original_steps, param), n)


def lcm_subgrid(origin: Tensor, n: int) -> Tensor:
    """LCM's n steps on any model's grid: of the grid's points (before its 0) the ones LCMScheduler picks
    (index floor(j * N / n)), then 0; on a discrete model's trailing grid, ``lcm_sigmas``."""
    _check_n(n)
    points = check_sigmas(origin)[:-1]
    if n > len(points):
        raise ValueError(f"LCM sampling takes at most {len(points)} steps on this grid, got {n}")
    idx = [math.floor(j * len(points) / n) for j in range(n)]
    return _append_zero(points[idx])


GRIDS = {
    "default": _grid_default,  # flow -> flow, discrete -> trailing, EDM -> karras
    "karras": _grid_karras,
    "exponential": _grid_exponential,
    "trailing": _grid_spacing("trailing"),
    "leading": _grid_spacing("leading"),
    "linspace": _grid_spacing("linspace"),
    "flow": _grid_flow,
    "flow_match": _grid_flow_match,  # diffusers' FlowMatchEulerDiscreteScheduler default (SD3)
    "lcm": _grid_lcm,
}


def make_sigmas(name: str, n: int, parameterization, **kw) -> Tensor:
    """Build the sigma grid `name` with n steps for a parameterization (its sigma range or alphas_cumprod)."""
    if name not in GRIDS:
        raise ValueError(f"unknown sigma grid {name!r}; known: {sorted(GRIDS)}")
    return GRIDS[name](n, parameterization, **kw)
