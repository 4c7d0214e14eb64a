"""Network parameterizations as four scalings: x0_hat = c_skip * x + c_out * F(c_in * x, c_noise).

Coordinates are EDM's (Karras et al. 2022): x = x0 + sigma * eps. Every prediction type (eps, v, x0,
EDM, rectified flow) is nothing but its (c_skip, c_out, c_in, c_noise), the raw-output formulas on them
(``from_raw``, ``raw_target``), and its own sigma grid (``default_grid``, ``sampling_grid``, the
coordinate ramps are spaced in: ``to_ramp`` / ``from_ramp``); no other code branches on it.

Pure noise, sigma = inf (flow at t = 1, zero-terminal-SNR v-models): there the sampler's state x is
the unit-variance noise itself, x / sigma in the limit, not inf * noise. The scalings returned at
sigma = inf are therefore the limits of (sigma * c_skip, c_out, sigma * c_in) together with c_noise at
the top of the range, so the same formula x0_hat = c_skip * x + c_out * F(c_in * x) holds:

    flow:  x0 = noise - F         (c_skip=1, c_out=-1, c_in=1, c_noise=1000)
    v:     x0 = -F                (c_skip=0, c_out=-1, c_in=1, c_noise=T-1)
    x0:    x0 = F                 (c_skip=0, c_out=1,  c_in=1, c_noise=T-1)
    eps, EDM: undefined (x0 = x - inf * eps; log(inf)): a ValueError.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from latentdiff.diffusion import schedules


class Parameterization:
    """Base: subclasses give the finite scalings and their limits at sigma = inf, and their own sigma grid."""

    name: str = ""
    sigma_min: float
    sigma_max: float
    alphas_cumprod: Tensor | None = None
    sigma_data: float = 1.0  # the data's standard deviation the scalings assume (EDM: 0.5)
    default_grid: str = "karras"  # the schedules.GRIDS grid named "default" for this model

    def sampling_grid(self, sampler_grid: str) -> str:
        """The grid to sample on when none is asked for, given the sampler's own (e.g. karras for DPM++ 2M)."""
        return sampler_grid

    def to_ramp(self, sigma: float) -> float:
        """The coordinate Karras / exponential ramps are spaced in: sigma itself (flow: t, finite at sigma = inf)."""
        return sigma

    def from_ramp(self, r: Tensor) -> Tensor:
        """Inverse of ``to_ramp``, on a grid."""
        return r

    @staticmethod
    def from_raw(scalings, x: Tensor, raw: Tensor) -> Tensor:
        """x0_hat from the network's raw output: c_skip * x + c_out * raw."""
        c_skip, c_out = scalings[:2]
        return c_skip * x + c_out * raw

    @staticmethod
    def raw_target(scalings, x: Tensor, x0: Tensor) -> Tensor:
        """The raw output that gives x0 exactly: (x0 - c_skip * x) / c_out (eps for eps-models, v, velocity)."""
        c_skip, c_out = scalings[:2]
        return (x0 - c_skip * x) / c_out

    def _scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _at_inf(self) -> tuple[float, float, float, float]:
        raise ValueError(
            f"{self.name}-prediction cannot denoise at sigma=inf; use a grid with a finite sigma_max"
        )

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise), float64, each shaped like sigma; limits at sigma = inf (see module).

        Input checks run for CPU sigmas only, so an accelerator never waits on the host here.
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        inf = torch.isinf(sigma)
        on_cpu = sigma.device.type == "cpu"
        if on_cpu and (bool((sigma < 0).any()) or bool(torch.isnan(sigma).any())):
            raise ValueError(f"sigma must be >= 0 and not NaN, got {sigma.tolist()}")
        c = self._scalings(torch.where(inf, torch.ones_like(sigma), sigma))
        if on_cpu and not bool(inf.any()):
            return c
        try:
            limits = self._at_inf()
        except ValueError:
            if on_cpu:
                raise
            return c  # on an accelerator an undefined limit stays NaN rather than syncing to raise
        return tuple(torch.where(inf, torch.full_like(sigma, lim), ci) for ci, lim in zip(c, limits))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g})"


class _Discrete(Parameterization):
    """A model trained on the discrete timesteps of alphas_cumprod; c_noise is the fractional timestep."""

    default_grid = "trailing"  # diffusers' spacing that reaches the last training timestep

    def __init__(self, alphas_cumprod: Tensor):
        if alphas_cumprod is None:
            raise ValueError(
                f"{type(self).__name__} needs alphas_cumprod (e.g. schedules.alphas_cumprod(betas))"
            )
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        table = schedules.vp_sigma_table(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = table[0].item(), table[-1].item()
        self._log_tables = {torch.device("cpu"): table.log()}  # per device, so no copy per step

    def t(self, sigma: Tensor) -> Tensor:
        if sigma.device not in self._log_tables:
            self._log_tables[sigma.device] = self._log_tables[torch.device("cpu")].to(sigma.device)
        return schedules.log_table_to_t(sigma, self._log_tables[sigma.device])

    @property
    def t_max(self) -> float:
        return len(self.alphas_cumprod) - 1.0


class Eps(_Discrete):
    """Epsilon prediction, Ho et al. 2020: x0 = x - sigma * F."""

    name = "eps"

    def _scalings(self, sigma):
        one = torch.ones_like(sigma)
        return one, -sigma, 1 / (sigma**2 + 1).sqrt(), self.t(sigma)

    def _at_inf(self):
        raise ValueError(
            "eps-prediction cannot denoise at sigma=inf (zero terminal SNR): x0 = x - sigma*eps is undefined; "
            "use a v-prediction model there or a grid with a finite sigma_max"
        )


class V(_Discrete):
    """v-prediction (sigma_data = 1), Salimans & Ho 2022: v = alpha * eps - sigma_vp * x0."""

    name = "v"

    def _scalings(self, sigma):
        s2 = sigma**2 + 1
        return 1 / s2, -sigma / s2.sqrt(), 1 / s2.sqrt(), self.t(sigma)

    def _at_inf(self):
        return 0.0, -1.0, 1.0, self.t_max


class X0(_Discrete):
    """Sample (x0) prediction on a discrete VP model: x0 = F."""

    name = "x0"

    def _scalings(self, sigma):
        return torch.zeros_like(sigma), torch.ones_like(sigma), 1 / (sigma**2 + 1).sqrt(), self.t(sigma)

    def _at_inf(self):
        return 0.0, 1.0, 1.0, self.t_max


class EDM(Parameterization):
    """EDM preconditioning, Karras et al. 2022: c_noise = log(sigma) / 4."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.sigma_data, self.sigma_min, self.sigma_max = (
            float(sigma_data),
            float(sigma_min),
            float(sigma_max),
        )

    def _scalings(self, sigma):
        sd2 = self.sigma_data**2
        r = (sigma**2 + sd2).sqrt()
        return sd2 / (sigma**2 + sd2), sigma * self.sigma_data / r, 1 / r, sigma.clamp(min=1e-30).log() / 4


class Flow(Parameterization):
    """Rectified flow, Liu et al. 2022 / SD3 (Esser et al. 2024): z = (1-t) x0 + t eps, F = eps - x0, sigma = t/(1-t)."""

    name = "flow"
    default_grid = "flow"
    own_grids = ("flow", "flow_match", "default")  # grids laid out in flow time

    def __init__(self, num_train_timesteps: int = 1000, t_min: float = 1e-3):
        self.timestep_scale = float(num_train_timesteps)  # c_noise = t * 1000, SD3's / Flux's timestep
        self.sigma_min, self.sigma_max = t_min / (1 - t_min), float("inf")

    def sampling_grid(self, sampler_grid: str) -> str:
        # A Karras ramp in t (a sampler's default grid) draws worse scenes than the flow grid (BENCHMARKS.md).
        return sampler_grid if sampler_grid in self.own_grids else "flow"

    def to_ramp(self, sigma):
        # Ramps over flow time t from 1 (pure noise, sigma = inf) to t_min, as diffusers'
        # FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True) and ComfyUI lay them out.
        return 1.0 if math.isinf(sigma) else sigma / (1 + sigma)

    def from_ramp(self, t):
        return t / (1 - t)  # t = 1 gives inf exactly

    def _scalings(self, sigma):
        c = 1 / (1 + sigma)  # z = x / (1 + sigma); x0 = z - t * F
        return c, -sigma * c, c, sigma * c * self.timestep_scale

    def _at_inf(self):
        return 1.0, -1.0, 1.0, self.timestep_scale


PARAMETERIZATIONS = {"eps": Eps, "v": V, "x0": X0, "edm": EDM, "flow": Flow}
ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_matching": "flow", "rectified_flow": "flow"}


def takes_alphas_cumprod(name: str) -> bool:
    """Whether the parameterization ``name`` is a discrete one (eps, v, x0), built on a noise schedule."""
    return issubclass(PARAMETERIZATIONS.get(ALIASES.get(name, name), Parameterization), _Discrete)


def make_parameterization(name: str, alphas_cumprod: Tensor | None = None, **kw) -> Parameterization:
    """Build a parameterization by name ('eps', 'v', 'x0' need alphas_cumprod; 'edm', 'flow' do not)."""
    key = ALIASES.get(name, name)
    if key not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {name!r}; known: {sorted(PARAMETERIZATIONS)} (or {sorted(ALIASES)})"
        )
    cls = PARAMETERIZATIONS[key]
    if issubclass(cls, _Discrete):
        return cls(alphas_cumprod, **kw)
    if alphas_cumprod is not None:
        raise ValueError(f"{key!r} is a continuous parameterization and takes no alphas_cumprod")
    return cls(**kw)


class Consistency(Parameterization):
    """A consistency model on a base parameterization (Song et al. 2023; Luo et al. 2023, LCM's scalings):
    f(x, sigma) = c_skip_cm * x + c_out_cm * D_base(x, sigma), with, in the base's timestep tau = c_noise(sigma) -
    c_noise(sigma_boundary) (discrete models: the training timestep, 0 at the boundary; flow: 1000 t - 1000 t_min),

        c_skip_cm = sigma_data^2 / ((s tau)^2 + sigma_data^2),   c_out_cm = s tau / sqrt((s tau)^2 + sigma_data^2),

    s the timestep scaling (LCM: 10, sigma_data 0.5). At the boundary (the base's sigma_min) c_skip_cm = 1 and
    c_out_cm = 0, so f(x, sigma_min) = x exactly; below it tau is held at 0. Both fold into the base's four
    scalings, so every sampler takes a consistency model as it takes any denoiser. At sigma = inf (pure noise,
    x the unit noise) c_skip_cm is 0: f = c_out_cm D_base, finite.
    """

    def __init__(self, base: Parameterization, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        if isinstance(base, Consistency):
            raise TypeError("a consistency parameterization wraps a plain one, not another consistency one")
        self.base, self.cm_sigma_data, self.timestep_scaling = base, float(sigma_data), float(timestep_scaling)
        self.name, self.sigma_min, self.sigma_max = base.name, base.sigma_min, base.sigma_max
        self.alphas_cumprod, self.sigma_data, self.default_grid = base.alphas_cumprod, base.sigma_data, base.default_grid
        self._noise_at_boundary = base.scalings(torch.tensor([base.sigma_min], dtype=torch.float64))[3]  # (1,)

    def sampling_grid(self, sampler_grid: str) -> str:
        return self.base.sampling_grid(sampler_grid)

    def to_ramp(self, sigma):
        return self.base.to_ramp(sigma)

    def from_ramp(self, r):
        return self.base.from_ramp(r)

    def boundary_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip_cm, c_out_cm), float64, shaped like sigma."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        c_noise = self.base.scalings(sigma)[3]
        tau = (c_noise - self._noise_at_boundary.to(c_noise.device)).clamp(min=0) * self.timestep_scaling
        sd2 = self.cm_sigma_data**2
        c_skip = torch.where(torch.isinf(sigma), torch.zeros_like(tau), sd2 / (tau**2 + sd2))
        return c_skip, tau / (tau**2 + sd2).sqrt()

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b_skip, b_out, c_in, c_noise = self.base.scalings(sigma)
        c_skip, c_out = self.boundary_scalings(sigma)
        return c_skip + c_out * b_skip, c_out * b_out, c_in, c_noise

    def __repr__(self) -> str:
        return f"Consistency({self.base!r}, sigma_data={self.cm_sigma_data:g}, timestep_scaling={self.timestep_scaling:g})"
