"""Samplers: one function each, one loop, history in local variables (k-diffusion / EDM style).

Every sampler is ``sample_NAME(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, ...)``
in EDM coordinates x = x0 + sigma * eps: ``denoiser(x, sigma, cond) -> x0_hat`` with sigma (B,),
``sigmas`` a grid from ``schedules`` (float64, strictly decreasing, ending in 0), and ``x`` the initial
noise times ``sigmas[0]`` (``init_x(noise, sigmas)``). ``callback(dict(i, x, sigma, denoised))`` is called
once per model evaluation of the main loop, with the state x that ``denoised`` was computed from.

Starting from pure noise (sigma = inf: flow models at t = 1, zero-terminal-SNR v-models). When
``sigmas[0]`` is inf, x is the unit-variance noise itself (not inf * noise). Every sampler then first
calls ``_start_from_noise``, which takes the one exact step

    x1 = D(noise, inf) + sigmas[1] * noise,

the DDIM / Euler step in the limit sigma -> inf (for flow models it is exactly the rectified-flow
Euler step z1 = z + (t1 - 1) * v from t = 1), and the sampler continues on sigmas[1:].

Stochastic samplers draw fresh noise with ``torch.randn`` from ``generator`` (a CPU generator) in
float32 and move it to x's device and dtype, one draw of x's shape per step, as diffusers does.
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import Tensor

from latentdiff.diffusion.schedules import check_sigmas
from latentdiff.types import Cond

# ---------------------------------------------------------------------------------------------
# shared helpers


def init_x(noise: Tensor, sigmas: Tensor) -> Tensor:
    """The sampler's starting x for unit-variance noise: noise * sigmas[0], or the noise itself at sigma = inf."""
    s0 = float(sigmas[0])
    return noise if math.isinf(s0) else noise * s0


def _prepare(x: Tensor, sigmas) -> list[float]:
    if not torch.is_tensor(x):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    return check_sigmas(sigmas).tolist()


def _sigma_batch(x: Tensor, s: float) -> Tensor:
    """sigma as a (B,) tensor on x's device, float64 (float32 on MPS, which has no float64)."""
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.full((x.shape[0],), s, dtype=dtype, device=x.device)


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise like x, drawn on the generator's device (CPU) in float32, then moved."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(x.shape, generator=generator, dtype=torch.float32, device=device).to(x.device, x.dtype)


def _report(callback, i, x, sigma, denoised) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def _start_from_noise(denoiser, x, sig, cond, callback) -> tuple[Tensor, int]:
    """If sigmas[0] is inf, take the exact step x1 = D(noise, inf) + sigmas[1] * noise; return (x, first step left)."""
    if not math.isinf(sig[0]):
        return x, 0
    denoised = denoiser(x, _sigma_batch(x, math.inf), cond)
    _report(callback, 0, x, sig[0], denoised)
    return denoised + sig[1] * x, 1


def _ancestral_split(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): sigma_next^2 = down^2 + up^2, up = fresh noise of the DDPM posterior times eta."""
    up = min(s_next, eta * s_next * math.sqrt(max(0.0, 1 - (s_next / s) ** 2)))
    return math.sqrt(s_next**2 - up**2), up


def _check_eta(eta: float, hi: float | None = None) -> None:
    if eta < 0 or (hi is not None and eta > hi):
        raise ValueError(f"eta must lie in [0, {hi if hi is not None else 'inf'}), got {eta}")


# ---------------------------------------------------------------------------------------------
# foundation


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, cond: Cond | None = None, *, generator=None, callback=None) -> Tensor:
    """Euler method on the probability-flow ODE dx/dsigma = (x - D) / sigma, Karras et al. 2022."""
    sig = _prepare(x, sigmas)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        # Euler step.
        d = (x - denoised) / s
        x = x + d * (s_next - s)
    return x


def _land_at(sig: list[float], final_sigma: float) -> list[float]:
    """The grid with its last step ending at ``final_sigma`` instead of 0 (which must lie below sig[-2])."""
    if final_sigma == 0:
        return sig
    if not 0 < final_sigma < sig[-2]:
        raise ValueError(f"final_sigma must lie in (0, {sig[-2]}) (the last sigma before 0), got {final_sigma}")
    return [*sig[:-1], final_sigma]


def _vp_state(x: Tensor, final_sigma: float) -> Tensor:
    """x at sigma in VP scale, x / sqrt(1 + sigma^2): what diffusers returns when its last step stops short of 0."""
    return x if final_sigma == 0 else x / math.sqrt(1 + final_sigma**2)


@torch.no_grad()
def sample_ddim(
    denoiser, x, sigmas, cond: Cond | None = None, *, eta: float = 0.0, final_sigma: float = 0.0, generator=None,
    callback=None,
) -> Tensor:
    """DDIM, Song et al. 2021: x' = x0_hat + sigma_down * eps_hat + sigma_up * noise; eta = 0 is deterministic.

    ``final_sigma`` > 0: the last step lands at that sigma instead of 0 and the VP state
    x / sqrt(1 + final_sigma^2) is returned, as diffusers' DDIMScheduler(set_alpha_to_one=False) and
    CompVis' DDIM do: their last step goes to alphas_cumprod[0], i.e. ``vp_sigma_table(alphas_cumprod)[0]``.
    """
    _check_eta(eta, 1.0)
    sig = _land_at(_prepare(x, sigmas), final_sigma)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        # Split sigma_next into the part kept from eps_hat and fresh noise (DDIM's sigma_t(eta)).
        sigma_down, sigma_up = _ancestral_split(s, s_next, eta)
        eps = (x - denoised) / s
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * _noise(x, generator)
    return _vp_state(x, final_sigma)


@torch.no_grad()
def sample_plms(
    denoiser, x, sigmas, cond: Cond | None = None, *, final_sigma: float = 0.0, generator=None, callback=None
) -> Tensor:
    """Pseudo linear multistep (PLMS), Liu et al. 2022, as diffusers' PNDMScheduler(skip_prk_steps=True).

    Each step is the DDIM (Euler) step x' = x + (sigma' - sigma) * e with e an Adams-Bashforth
    combination of the last eps_hat = (x - D) / sigma; the first step is a 2nd-order predictor-corrector
    (eps at x and at the Euler prediction, averaged), so n steps take n + 1 evaluations (n for n = 1).
    ``final_sigma``: as for ``sample_ddim`` (PNDMScheduler's set_alpha_to_one=False, its default).
    The multistep combination is of eps estimates, as in Stability's PLMS; diffusers combines the raw
    network outputs, which is the same for eps-prediction models and differs for v-prediction ones.
    """
    sig = _land_at(_prepare(x, sigmas), final_sigma)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    history: list[Tensor] = []  # eps_hat at the previous steps' states, oldest first
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        eps = (x - denoised) / s
        if not history and i < len(sig) - 2:
            # First step: Euler prediction, eps there, and the average of both (the corrector).
            x_pred = x + (s_next - s) * eps
            eps_pred = (x_pred - denoiser(x_pred, _sigma_batch(x, s_next), cond)) / s_next
            e = (eps + eps_pred) / 2
        elif len(history) == 1:  # Adams-Bashforth orders 2, 3, 4 as history grows
            e = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            e = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        elif len(history) >= 3:
            e = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        else:  # a single step: plain DDIM
            e = eps
        history = [*history[-2:], eps]
        # DDIM step with the combined eps.
        x = x + (s_next - s) * e
    return _vp_state(x, final_sigma)


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, cond: Cond | None = None, *, generator=None, callback=None) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE, Karras et al. 2022 (Algorithm 1, no churn)."""
    sig = _prepare(x, sigmas)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        # Euler step.
        d = (x - denoised) / s
        x_next = x + d * (s_next - s)
        # Apply 2nd order correction (not on the last step to sigma = 0).
        if s_next > 0:
            d_next = (x_next - denoiser(x_next, _sigma_batch(x, s_next), cond)) / s_next
            x_next = x + (d + d_next) / 2 * (s_next - s)
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser, x, sigmas, cond: Cond | None = None, *, generator=None, callback=None
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022."""
    sig = _prepare(x, sigmas)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    old_denoised, h_last = None, None
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        if s_next == 0:
            # Last step: the first-order update to sigma = 0 is x0_hat itself.
            x = denoised
        else:
            h = math.log(s / s_next)  # step in lambda = -log(sigma)
            # Multistep 2nd-order estimate of x0 over the step (first step: first order).
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            # Exponential-integrator step.
            x = (s_next / s) * x - math.expm1(-h) * denoised_d
            h_last = h
        old_denoised = denoised
    return x


# ---------------------------------------------------------------------------------------------
# stochastic and higher-order samplers


@torch.no_grad()
def sample_euler_ancestral(
    denoiser, x, sigmas, cond: Cond | None = None, *, eta: float = 1.0, generator=None, callback=None
) -> Tensor:
    """Ancestral Euler: Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion, Ho et al. 2020)."""
    _check_eta(eta)
    sig = _prepare(x, sigmas)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        sigma_down, sigma_up = _ancestral_split(s, s_next, eta)
        # Euler step to sigma_down.
        d = (x - denoised) / s
        x = x + d * (sigma_down - s)
        # Add fresh noise up to sigma_next.
        if s_next > 0:
            x = x + sigma_up * _noise(x, generator)
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, cond: Cond | None = None, *, generator=None, callback=None) -> Tensor:
    """DDPM ancestral sampling from the posterior q(x' | x, x0_hat) (fixed-small variance), Ho et al. 2020."""
    sig = _prepare(x, sigmas)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        # Posterior mean, in sigma coordinates: interpolate x and x0_hat by (sigma_next / sigma)^2.
        ratio = (s_next / s) ** 2
        x = ratio * x + (1 - ratio) * denoised
        # Posterior noise: std sigma_next * sqrt(1 - ratio).
        if s_next > 0:
            x = x + s_next * math.sqrt(1 - ratio) * _noise(x, generator)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser, x, sigmas, cond: Cond | None = None, *, eta: float = 1.0, generator=None, callback=None
) -> Tensor:
    """DPM-Solver++(2M) SDE (midpoint), Lu et al. 2022; eta = 0 gives the ODE solver."""
    _check_eta(eta)
    sig = _prepare(x, sigmas)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    old_denoised, h_last = None, None
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
            # First-order SDE step.
            x = (s_next / s) * math.exp(-eta_h) * x + phi * denoised
            # Midpoint 2nd-order correction from the previous x0_hat.
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * phi / r * (denoised - old_denoised)
            # Fresh noise.
            if eta > 0:
                x = x + s_next * math.sqrt(-math.expm1(-2 * eta_h)) * _noise(x, generator)
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser, x, sigmas, cond: Cond | None = None, *, eta: float = 1.0, generator=None, callback=None
) -> Tensor:
    """DPM-Solver++(3M) SDE, Lu et al. 2022 (k-diffusion's form); eta = 0 gives DPM-Solver++(3M)."""
    _check_eta(eta)
    sig = _prepare(x, sigmas)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        h = None
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            h_eta = h * (eta + 1)
            # First-order step.
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            if h_2 is not None:
                # 3rd-order correction from two previous x0_hats.
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                # 2nd-order correction from one previous x0_hat.
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            # Fresh noise.
            if eta > 0:
                x = x + s_next * math.sqrt(-math.expm1(-2 * h * eta)) * _noise(x, generator)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser, x, sigmas, cond: Cond | None = None, *, eta: float = 1.0, generator=None, callback=None
) -> Tensor:
    """Ancestral DPM-Solver++(2S), Lu et al. 2022 (k-diffusion): a 2-stage step to sigma_down, then noise."""
    _check_eta(eta)
    sig = _prepare(x, sigmas)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    for i in range(start, len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        sigma_down, sigma_up = _ancestral_split(s, s_next, eta)
        if sigma_down == 0:
            # Euler step to sigma = 0.
            x = denoised
        else:
            # Stage 1: first-order step to the log-sigma midpoint.
            h = math.log(s / sigma_down)
            s_mid = s * math.exp(-h / 2)
            x_mid = (s_mid / s) * x - math.expm1(-h / 2) * denoised
            # Stage 2: full step using x0_hat at the midpoint.
            denoised_mid = denoiser(x_mid, _sigma_batch(x, s_mid), cond)
            x = (sigma_down / s) * x - math.expm1(-h) * denoised_mid
        # Fresh noise.
        if s_next > 0:
            x = x + sigma_up * _noise(x, generator)
    return x


def _unipc_update(x, lam, denoised_hist, lam_hist, lam_next, order, denoised_new=None):
    """One UniP (denoised_new None) or UniC step of order `order`, B(h) = expm1(-h) ("bh2"), data prediction."""
    m0 = denoised_hist[-1]
    h = lam_next - lam
    # Ratios of the earlier steps to this one and their divided differences (newest first).
    rks = [(lam_hist[-1 - k] - lam) / h for k in range(1, order)]
    d1s = [(denoised_hist[-1 - k] - m0) / r for k, r in zip(range(1, order), rks)]
    # Right-hand side b_k = k! * phi_{k+1}(-h) * (-h)^k / B(h), matrix R_jk = r_k^(j-1).
    hh, b_h = -h, math.expm1(-h)
    h_phi_k, fact, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R = torch.tensor([[r ** (j - 1) for r in rks + [1.0]] for j in range(1, order + 1)], dtype=torch.float64)
    b = torch.tensor(b, dtype=torch.float64)
    base = math.exp(-h) * x - math.expm1(-h) * m0  # DPM-Solver++(1) step
    if denoised_new is None:  # predictor UniP-order
        if order == 1:
            return base
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        res = sum(rho * d for rho, d in zip(rhos, d1s))
    else:  # corrector UniC-order, with the model output at the predicted point
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        res = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), rhos[-1] * (denoised_new - m0))
    return base - b_h * res


@torch.no_grad()
def sample_unipc(
    denoiser,
    x,
    sigmas,
    cond: Cond | None = None,
    *,
    order: int = 2,
    corrector: bool = True,
    generator=None,
    callback=None,
) -> Tensor:
    """UniPC (bh2), Zhao et al. 2023: UniP-p predictor plus the UniC corrector that reuses the next model output."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    sig = _prepare(x, sigmas)
    x, start = _start_from_noise(denoiser, x, sig, cond, callback)
    n = len(sig) - 1
    hist, lam_hist, x_last, last_order = [], [], None, 0
    for i in range(start, n):
        s, s_next = sig[i], sig[i + 1]
        lam = -math.log(s)
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        # UniC: correct the last predictor's x with this model output (no extra evaluation).
        if corrector and x_last is not None:
            x = _unipc_update(x_last, lam_hist[-1], hist, lam_hist, lam, last_order, denoised)
        hist, lam_hist = (hist + [denoised])[-order:], (lam_hist + [lam])[-order:]
        # UniP: predictor, lower order during warm-up and on the final steps.
        last_order = min(order, n - i, len(hist))
        x_last = x
        x = denoised if s_next == 0 else _unipc_update(x, lam, hist, lam_hist, -math.log(s_next), last_order)
    return x


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, cond: Cond | None = None, *, generator=None, callback=None) -> Tensor:
    """Latent Consistency Model multistep sampling, Luo et al. 2023: denoise, then re-noise to sigma_next.

    ``denoiser`` is the consistency function (a student's boundary scalings are its parameterization's,
    ``parameterization.Consistency``). From sigma = inf (x the unit noise) the first step is the same
    denoise-and-re-noise, with fresh noise as every step's, not the start noise again.
    """
    sig = _prepare(x, sigmas)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(x, s), cond)
        _report(callback, i, x, s, denoised)
        # Consistency step: jump to x0_hat, then fresh noise at sigma_next.
        x = denoised
        if s_next > 0:
            x = denoised + s_next * _noise(x, generator)
    return x


# ---------------------------------------------------------------------------------------------
# registry: canonical names and the names users know from other tools -> (sampler, default grid)

_CANONICAL = {
    "euler": (sample_euler, "default"),
    "euler_ancestral": (sample_euler_ancestral, "default"),
    "heun": (sample_heun, "karras"),
    "ddim": (sample_ddim, "default"),
    "plms": (sample_plms, "default"),
    "ddpm": (sample_ddpm, "default"),
    "dpmpp_2m": (sample_dpmpp_2m, "karras"),
    "dpmpp_2m_sde": (sample_dpmpp_2m_sde, "karras"),
    "dpmpp_3m_sde": (sample_dpmpp_3m_sde, "exponential"),
    "dpmpp_2s_ancestral": (sample_dpmpp_2s_ancestral, "karras"),
    "unipc": (sample_unipc, "default"),
    "lcm": (sample_lcm, "lcm"),
}

_ALIASES = {
    # AUTOMATIC1111 / Forge display names
    "Euler": ("euler", "default"),
    "Euler Karras": ("euler", "karras"),
    "Euler a": ("euler_ancestral", "default"),
    "Heun": ("heun", "default"),
    "Heun Karras": ("heun", "karras"),
    "DDIM": ("ddim", "default"),
    "DDPM": ("ddpm", "default"),
    "DPM++ 2M": ("dpmpp_2m", "default"),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 2M Exponential": ("dpmpp_2m", "exponential"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "default"),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ 2M SDE Exponential": ("dpmpp_2m_sde", "exponential"),
    "DPM++ 3M SDE": ("dpmpp_3m_sde", "default"),
    "DPM++ 3M SDE Karras": ("dpmpp_3m_sde", "karras"),
    "DPM++ 3M SDE Exponential": ("dpmpp_3m_sde", "exponential"),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", "default"),
    "DPM++ 2S a Karras": ("dpmpp_2s_ancestral", "karras"),
    "UniPC": ("unipc", "default"),
    "LCM": ("lcm", "lcm"),
    # original k-diffusion / stable-diffusion scripts
    "k_euler": ("euler", "default"),
    "k_euler_a": ("euler_ancestral", "default"),
    "k_euler_ancestral": ("euler_ancestral", "default"),
    "k_heun": ("heun", "default"),
    "k_dpmpp_2m": ("dpmpp_2m", "default"),
    "k_dpmpp_2m_karras": ("dpmpp_2m", "karras"),
    "k_dpmpp_2m_sde": ("dpmpp_2m_sde", "default"),
    "k_dpmpp_3m_sde": ("dpmpp_3m_sde", "default"),
    "k_dpmpp_2s_a": ("dpmpp_2s_ancestral", "default"),
    "k_dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", "default"),
    # ComfyUI
    "uni_pc": ("unipc", "default"),
    "uni_pc_bh2": ("unipc", "default"),
    # diffusers scheduler classes (their default spacings differ per class; we use the model's default grid)
    "EulerDiscreteScheduler": ("euler", "default"),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", "default"),
    "HeunDiscreteScheduler": ("heun", "default"),
    "DDIMScheduler": ("ddim", "default"),
    "PNDMScheduler": ("plms", "default"),
    "PLMS": ("plms", "default"),
    "DDPMScheduler": ("ddpm", "default"),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", "default"),
    "UniPCMultistepScheduler": ("unipc", "default"),
    "LCMScheduler": ("lcm", "lcm"),
    "FlowMatchEulerDiscreteScheduler": ("euler", "flow_match"),  # its own default grid, as diffusers samples it
}

SAMPLERS: dict = dict(_CANONICAL)
SAMPLERS.update({alias: (_CANONICAL[name][0], grid) for alias, (name, grid) in _ALIASES.items()})
_BY_LOWER = {k.lower(): k for k in SAMPLERS}


def get_sampler(name: str):
    """(sampler function, default grid name) for a canonical name or alias; case-insensitive."""
    key = name if name in SAMPLERS else _BY_LOWER.get(str(name).lower())
    if key is None:
        near = difflib.get_close_matches(str(name).lower(), list(_BY_LOWER), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(_BY_LOWER[m]) for m in near)}?" if near else ""
        raise ValueError(
            f"unknown sampler {name!r}.{hint} Known samplers: {', '.join(sorted(_CANONICAL))}; "
            f"aliases: {', '.join(sorted(_ALIASES))}"
        )
    return SAMPLERS[key]


# ---------------------------------------------------------------------------------------------
# network evaluations (NFE) per sampler

_TWO_EVALUATIONS = (sample_heun, sample_dpmpp_2s_ancestral)  # a second evaluation inside each step
_ONE_EXTRA = (sample_plms,)  # one more evaluation in the first step
FINAL_SIGMA_SAMPLERS = (sample_ddim, sample_plms)  # take final_sigma (diffusers' set_alpha_to_one=False)


def _sampler_fn(sampler):
    return get_sampler(sampler)[0] if isinstance(sampler, str) else sampler


def evaluations_per_step(sampler) -> int:
    """Network evaluations per step of a sampler (name or function): 2 for Heun and DPM++ 2S a, else 1.

    The two-evaluation samplers skip their second evaluation on the last step to sigma = 0.
    """
    return 2 if _sampler_fn(sampler) in _TWO_EVALUATIONS else 1


def count_evaluations(sampler, sigmas) -> int:
    """Network evaluations a sampler makes on a grid, counting the exact first step from sigma = inf."""
    sig = check_sigmas(sigmas).tolist()
    steps = len(sig) - 1
    start = 1 if math.isinf(sig[0]) else 0  # _start_from_noise: one evaluation
    if _sampler_fn(sampler) in _ONE_EXTRA:  # PLMS: the corrector of its first step, when a step follows
        return steps + (1 if steps - start >= 2 else 0)
    if evaluations_per_step(sampler) == 1:
        return steps
    return start + max(0, 2 * (steps - start) - 1)


def steps_for_evaluations(sampler, nfe: int) -> int:
    """Steps of a grid with a finite sigmas[0] that use exactly nfe evaluations; a ValueError if none does."""
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"number of network evaluations must be an integer >= 1, got {nfe!r}")
    if _sampler_fn(sampler) in _ONE_EXTRA:
        if nfe == 2:
            raise ValueError("plms makes 1 evaluation for 1 step and steps + 1 for more; 2 is not possible: use "
                             "1 (1 step) or 3 (2 steps)")
        return 1 if nfe == 1 else nfe - 1
    if evaluations_per_step(sampler) == 1:
        return nfe
    if nfe % 2 == 0:
        name = sampler if isinstance(sampler, str) else sampler.__name__
        raise ValueError(
            f"{name} makes 2 evaluations per step and 1 on the last step, so it makes an odd number "
            f"(2 * steps - 1); {nfe} is not possible: use {nfe - 1} ({nfe // 2} steps) or "
            f"{nfe + 1} ({nfe // 2 + 1} steps)"
        )
    return (nfe + 1) // 2
