"""Parity with diffusers' schedulers: the same analytic network, the same noise, the same result.

The network is analytic (no weights): x0_hat is a smooth nonlinear function of the VP state z and the
sigma of the timestep it is called with; it returns eps, v or flow velocity. diffusers calls it with
(z, timestep); we call it through Denoiser + parameterization with (c_in * x, c_noise). Stochastic
schedulers draw their noise through a patched ``randn_tensor`` that follows our convention (CPU
float32, then cast), so one seed gives one noise stream in both.
"""

import inspect
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers (pip install diffusers)")

from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_lcm,
)

from latentdiff.diffusion import sampling, schedules
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import Flow, make_parameterization

F64 = torch.float64
SHAPE = (2, 3, 4, 4)
SEED = 11


def our_randn(shape, generator=None, device=None, dtype=None, layout=None):
    """diffusers' randn_tensor, drawn our way: CPU float32 from the generator, then moved and cast."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device or "cpu", dtype)


@pytest.fixture(autouse=True)
def one_thread_and_our_noise(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)

    for mod in (
        scheduling_ddim,
        scheduling_ddpm,
        scheduling_dpmsolver_multistep,
        scheduling_euler_ancestral_discrete,
        scheduling_lcm,
    ):
        monkeypatch.setattr(mod, "randn_tensor", our_randn)
    yield
    torch.set_num_threads(n)


def x0_of(z, sig_vp):
    """Analytic 'denoised' prediction from the VP state z and sigma_vp = sigma / sqrt(1 + sigma^2) in [0, 1]."""
    return 0.8 * torch.tanh(1.3 * z) + 0.2 * sig_vp * z.mean(dim=(1, 2, 3), keepdim=True) + 0.1


def vp_network(prediction, ac, sigma_of=None):
    """network(z, t) -> eps / v / x0 for a discrete VP model with alphas_cumprod ac.

    sigma_of(t) gives the sigma the caller means by timestep t; by default the table's (log-sigma
    interpolation, exact at integers). diffusers' multistep schedulers round the timesteps of a Karras
    grid, so there the test passes the grid's own sigma for each rounded timestep.
    """

    def network(z, t, cond=None):
        t = torch.as_tensor(t, dtype=F64).reshape(-1).expand(z.shape[0])
        a = torch.as_tensor(ac, dtype=F64)
        sigma = schedules.t_to_sigma(t, a) if sigma_of is None else sigma_of(t)
        inf = torch.isinf(sigma)
        s_ = torch.where(inf, torch.ones_like(sigma), sigma)
        alpha = torch.where(inf, 0.0, 1 / (1 + s_**2).sqrt()).view(-1, 1, 1, 1)
        sig_vp = torch.where(inf, 1.0, s_ / (1 + s_**2).sqrt()).view(-1, 1, 1, 1)
        z = z.to(F64)
        x0 = x0_of(z, sig_vp)
        eps = (z - alpha * x0) / sig_vp
        return {"epsilon": eps, "v_prediction": alpha * eps - sig_vp * x0, "sample": x0}[prediction]

    return network


PARAM_NAME = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def our_denoiser(prediction, ac):
    net = vp_network(prediction, ac)
    return Denoiser(
        lambda x_in, c_noise, cond: net(x_in, c_noise.double()),
        make_parameterization(PARAM_NAME[prediction], ac),
    )


def noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED), dtype=torch.float32).to(F64)


def run_diffusers(sched, n, net, x_init, step_kw=None, dtype=F64, **set_kw):
    """The usual diffusers loop; returns the final sample."""
    sched.set_timesteps(n, **set_kw)
    g = torch.Generator().manual_seed(SEED + 1)
    x = x_init.to(dtype)
    for t in sched.timesteps:
        z = sched.scale_model_input(x, t)
        out = net(z, t).to(dtype)
        if "generator" in inspect.signature(sched.step).parameters:
            step_kw = {**(step_kw or {}), "generator": g}
        x = sched.step(out, t, x, **(step_kw or {})).prev_sample
    return x.to(F64)


def run_ours(fn, prediction, ac, sigmas, x_init, **kw):
    return fn(
        our_denoiser(prediction, ac), x_init, sigmas, generator=torch.Generator().manual_seed(SEED + 1), **kw
    )


def assert_rel(a, b, tol=1e-5):
    err = ((a - b).norm() / b.norm()).item()
    assert err < tol, f"relative error {err:.2e}"


def table_ac(sched):
    return sched.alphas_cumprod.to(F64)


# DDIM / DDPM: VP coordinates, our x = z / sqrt(alpha_bar) --------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
# Not "linspace": DDIMScheduler steps from t to t - T // n, which is not the next of its own linspace
# timesteps, so it has no sigma grid; its "leading" and "trailing" steps do land on the next timestep.
@pytest.mark.parametrize("spacing,n", [("trailing", 10), ("leading", 25), ("trailing", 50), ("leading", 7)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(prediction, spacing, n, eta):
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction,
        timestep_spacing=spacing,
        steps_offset=1,
        set_alpha_to_one=True,
        clip_sample=False,
    )
    ac = table_ac(sched)
    ref = run_diffusers(sched, n, vp_network(prediction, ac), noise(), step_kw={"eta": eta})
    sigmas = schedules.vp_sigmas(ac, n, spacing, steps_offset=1 if spacing == "leading" else 0)
    torch.testing.assert_close(sigmas[:-1], schedules.sigmas_from_timesteps(sched.timesteps, ac)[:-1])
    ours = run_ours(
        sampling.sample_ddim, prediction, ac, sigmas, noise() * (1 + sigmas[0] ** 2).sqrt(), eta=eta
    )
    assert_rel(ours, ref)


def test_ddim_zero_terminal_snr_v_starts_at_inf():
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        clip_sample=False,
    )
    ac = table_ac(sched)
    assert ac[-1] == 0
    ref = run_diffusers(sched, 10, vp_network("v_prediction", ac), noise())
    sigmas = schedules.vp_sigmas(ac, 10, "trailing")
    assert math.isinf(sigmas[0])
    ours = run_ours(sampling.sample_ddim, "v_prediction", ac, sigmas, sampling.init_x(noise(), sigmas))
    assert_rel(ours, ref)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,n", [("leading", 10), ("trailing", 20)])
def test_ddpm(prediction, spacing, n):
    sched = diffusers.DDPMScheduler(
        beta_schedule="linear",
        prediction_type=prediction,
        timestep_spacing=spacing,
        clip_sample=False,
        variance_type="fixed_small",
    )
    ac = table_ac(sched)
    ref = run_diffusers(sched, n, vp_network(prediction, ac), noise())
    sigmas = schedules.sigmas_from_timesteps(sched.timesteps, ac)
    torch.testing.assert_close(sigmas, schedules.vp_sigmas(ac, n, spacing))
    ours = run_ours(sampling.sample_ddpm, prediction, ac, sigmas, noise() * (1 + sigmas[0] ** 2).sqrt())
    assert_rel(ours, ref)


# Euler family: diffusers' sample is our x -----------------------------------------------------

EULER_GRIDS = [("leading", 10), ("trailing", 15), ("karras", 12)]


def euler_like(cls, prediction, grid, **kw):
    if grid == "karras":
        grid, kw = "linspace", {**kw, "use_karras_sigmas": True}
    return cls(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction,
        timestep_spacing=grid,
        steps_offset=1,
        **kw,
    )


def our_grid(grid, n, ac):
    if grid == "karras":
        p = make_parameterization("eps", ac)
        return schedules.karras_sigmas(n, p.sigma_min, p.sigma_max)
    return schedules.vp_sigmas(ac, n, grid, steps_offset=1 if grid == "leading" else 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("grid,n", EULER_GRIDS)
@pytest.mark.parametrize(
    "cls,fn",
    [
        (diffusers.EulerDiscreteScheduler, sampling.sample_euler),
        (diffusers.EulerAncestralDiscreteScheduler, sampling.sample_euler_ancestral),
        (diffusers.HeunDiscreteScheduler, sampling.sample_heun),
    ],
    ids=["euler", "euler_ancestral", "heun"],
)
def test_euler_family(cls, fn, prediction, grid, n):
    if cls is diffusers.EulerAncestralDiscreteScheduler and grid == "karras":
        pytest.skip("EulerAncestralDiscreteScheduler has no karras sigmas")
    if cls is diffusers.EulerAncestralDiscreteScheduler and prediction == "sample":
        pytest.skip("EulerAncestralDiscreteScheduler does not implement prediction_type='sample'")
    sched = euler_like(cls, prediction, grid)
    ac = table_ac(sched)
    x_init = noise() * sched.init_noise_sigma
    ref = run_diffusers(sched, n, vp_network(prediction, ac), x_init)
    sigmas = our_grid(grid, n, ac)
    dsig = sched.sigmas.to(F64)
    if cls is diffusers.HeunDiscreteScheduler:
        dsig = torch.cat([dsig[:1], dsig[1::2]])
    torch.testing.assert_close(sigmas, dsig, rtol=1e-6, atol=1e-6)  # diffusers keeps sigmas in float32
    ours = run_ours(fn, prediction, ac, sigmas, x_init)
    assert_rel(ours, ref)


def test_euler_linspace_grid_close_to_diffusers():
    """diffusers interpolates sigma linearly at fractional timesteps; we interpolate log-sigma."""
    sched = euler_like(diffusers.EulerDiscreteScheduler, "epsilon", "linspace")
    sched.set_timesteps(13)
    ours = schedules.vp_sigmas(table_ac(sched), 13, "linspace")
    torch.testing.assert_close(ours, sched.sigmas.to(F64), rtol=2e-3, atol=1e-6)


def test_sigma_to_t_matches_diffusers():
    sched = euler_like(diffusers.EulerDiscreteScheduler, "epsilon", "karras")
    sched.set_timesteps(17)
    ac = table_ac(sched)
    ours = schedules.sigma_to_t(sched.sigmas[:-1].to(F64), ac)
    torch.testing.assert_close(ours, sched.timesteps.to(F64), rtol=0, atol=2e-3)  # float32 timesteps


# multistep solvers in VP coordinates ----------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,n", [("linspace", 8), ("leading", 20), ("trailing", 25)])
@pytest.mark.parametrize(
    "algorithm,order,fn,kw",
    [
        ("dpmsolver++", 2, sampling.sample_dpmpp_2m, {}),
        ("sde-dpmsolver++", 2, sampling.sample_dpmpp_2m_sde, {}),
        ("dpmsolver++", 3, sampling.sample_dpmpp_3m_sde, {"eta": 0.0}),
    ],
    ids=["2m", "2m_sde", "3m"],
)
def test_dpm_solver_multistep(algorithm, order, fn, kw, prediction, spacing, n):
    # Below 15 steps diffusers lowers the order of the last steps (lower_order_final); k-diffusion's
    # samplers and ours do not, so that is switched off (the last step to sigma = 0 is first order in both).
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction,
        algorithm_type=algorithm,
        solver_order=order,
        solver_type="heun" if order == 3 else "midpoint",
        timestep_spacing=spacing,
        steps_offset=1,
        lower_order_final=False,
    )
    ac = table_ac(sched)
    ref = run_diffusers(sched, n, vp_network(prediction, ac), noise())
    sigmas = schedules.sigmas_from_timesteps(sched.timesteps, ac)  # DPMSolver's own spacing (n + 1 points)
    ours = run_ours(fn, prediction, ac, sigmas, noise() * (1 + sigmas[0] ** 2).sqrt(), **kw)
    assert_rel(ours, ref)


MULTISTEP = {  # name: (diffusers scheduler kwargs, our sampler, its kwargs)
    "2m": ({"algorithm_type": "dpmsolver++", "solver_order": 2}, sampling.sample_dpmpp_2m, {}),
    "2m_sde": ({"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, sampling.sample_dpmpp_2m_sde, {}),
    "3m": ({"algorithm_type": "dpmsolver++", "solver_order": 3, "solver_type": "heun"},
           sampling.sample_dpmpp_3m_sde, {"eta": 0.0}),
    "unipc": (None, sampling.sample_unipc, {}),
}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [10, 20])
@pytest.mark.parametrize("kind", sorted(MULTISTEP))
def test_multistep_karras_grid(kind, prediction, n):
    """use_karras_sigmas=True: diffusers rounds the timesteps but steps on the exact Karras sigmas."""
    sched_kw, fn, kw = MULTISTEP[kind]
    common = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "prediction_type": prediction, "use_karras_sigmas": True}
    if sched_kw is None:
        sched = diffusers.UniPCMultistepScheduler(**common)
    else:
        sched = diffusers.DPMSolverMultistepScheduler(**common, **sched_kw, lower_order_final=False)
    ac = table_ac(sched)
    sched.set_timesteps(n)
    sigmas = sched.sigmas.to(F64)
    p = make_parameterization("eps", ac)
    torch.testing.assert_close(sigmas, schedules.karras_sigmas(n, p.sigma_min, p.sigma_max), rtol=1e-6, atol=0)
    steps = iter(sigmas[:-1])  # the network is told each step's exact sigma, not the rounded timestep's

    def sigma_of(t):
        return next(steps).expand(t.shape[0])

    ref = run_diffusers(sched, n, vp_network(prediction, ac, sigma_of), noise())
    ours = run_ours(fn, prediction, ac, sigmas, noise() * (1 + sigmas[0] ** 2).sqrt(), **kw)
    assert_rel(ours, ref)


# DPM-Solver++(3M) SDE: diffusers' third-order SDE step has the wrong sign on one term ----------------


def exact_coefficient(h, k, sde):
    """Weight of the k-th divided difference D_k in the data-prediction exponential integrator, by quadrature.

    Over a step of h in lambda = -log(sigma), x0(lambda_s + tau) ~ D0 + D1 tau / h + D2 tau^2 / h^2 (times 1/2
    for D2 in DPM-Solver's convention), integrated against the ODE kernel exp(-(h - tau)) or the SDE kernel
    2 exp(-2 (h - tau)) (Lu et al. 2022, eqs. for DPM-Solver++ and SDE-DPM-Solver++).
    """
    from scipy.integrate import quad

    kernel = (lambda tau: 2 * math.exp(-2 * (h - tau))) if sde else (lambda tau: math.exp(-(h - tau)))
    taylor = [lambda tau: 1.0, lambda tau: tau / h, lambda tau: tau**2 / (2 * h**2)][k]
    return quad(lambda tau: kernel(tau) * taylor(tau), 0, h, epsabs=1e-14, epsrel=1e-12)[0]


@pytest.mark.parametrize("h", [0.05, 0.4, 1.3])
def test_third_order_coefficients_against_quadrature(h):
    pytest.importorskip("scipy")
    em, em2 = math.exp(-h), math.exp(-2 * h)
    # diffusers' ODE (dpmsolver++) third-order coefficients equal the integrals ...
    assert abs(-(em - 1.0) - exact_coefficient(h, 0, False)) < 1e-12
    assert abs(((em - 1.0) / h + 1.0) - exact_coefficient(h, 1, False)) < 1e-12
    assert abs(-((em - 1.0 + h) / h**2 - 0.5) - exact_coefficient(h, 2, False)) < 1e-12
    # ... so do its SDE (sde-dpmsolver++) D0 and D1 coefficients and k-diffusion's / our phi_2, -phi_3 ...
    h_eta = 2 * h  # eta = 1
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    phi_3 = phi_2 / h_eta - 0.5
    assert abs((1.0 - em2) - exact_coefficient(h, 0, True)) < 1e-12
    assert abs(((1.0 - em2) / (-2.0 * h) + 1.0) - exact_coefficient(h, 1, True)) < 1e-12
    assert abs(phi_2 - exact_coefficient(h, 1, True)) < 1e-12
    assert abs(-phi_3 - exact_coefficient(h, 2, True)) < 1e-12
    # ... but its SDE D2 coefficient is off by exactly -1: "- 0.5" where the integral gives "+ 0.5".
    diffusers_d2 = (1.0 - em2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5
    assert abs(diffusers_d2 - (exact_coefficient(h, 2, True) - 1.0)) < 1e-12


class CorrectedSDE3M(diffusers.DPMSolverMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler with its sde-dpmsolver++ third-order D2 term corrected by +alpha_t * D2."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kw):
        x_t = super().multistep_dpm_solver_third_order_update(
            model_output_list, *args, sample=sample, noise=noise, **kw
        )
        if self.config.algorithm_type != "sde-dpmsolver++":
            return x_t
        i = self.step_index
        pairs = [self._sigma_to_alpha_sigma_t(self.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
        lam = [torch.log(a) - torch.log(s) for a, s in pairs]
        h, h_0, h_1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        r0, r1 = h_0 / h, h_1 / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        return x_t + pairs[0][0] * d2


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,n", [("trailing", 8), ("leading", 20)])
def test_dpmpp_3m_sde(prediction, spacing, n):
    """Ours (k-diffusion's formula) equals diffusers' 3M SDE once its D2 sign is corrected, and differs without."""
    kw = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": prediction,
          "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun", "timestep_spacing": spacing,
          "steps_offset": 1,
          "lower_order_final": False}
    fixed = CorrectedSDE3M(**kw)
    ac = table_ac(fixed)
    ref = run_diffusers(fixed, n, vp_network(prediction, ac), noise())
    sigmas = schedules.sigmas_from_timesteps(fixed.timesteps, ac)
    ours = run_ours(sampling.sample_dpmpp_3m_sde, prediction, ac, sigmas, noise() * (1 + sigmas[0] ** 2).sqrt())
    assert_rel(ours, ref)
    as_shipped = run_diffusers(diffusers.DPMSolverMultistepScheduler(**kw), n, vp_network(prediction, ac), noise())
    assert ((as_shipped - ref).norm() / ref.norm()).item() > 1e-3


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "order,n,spacing", [(2, 6, "linspace"), (2, 20, "trailing"), (3, 10, "leading"), (1, 5, "linspace")]
)
def test_unipc(prediction, order, n, spacing):
    sched = diffusers.UniPCMultistepScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction,
        solver_order=order,
        timestep_spacing=spacing,
        steps_offset=1,
    )
    ac = table_ac(sched)
    ref = run_diffusers(sched, n, vp_network(prediction, ac), noise())
    sigmas = schedules.sigmas_from_timesteps(sched.timesteps, ac)
    ours = run_ours(
        sampling.sample_unipc, prediction, ac, sigmas, noise() * (1 + sigmas[0] ** 2).sqrt(), order=order
    )
    assert_rel(ours, ref)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_lcm(n, prediction):
    # LCM's boundary-condition scalings (c_skip ~ 1e-9 at its timesteps) are switched off here;
    # they belong to the consistency-model parameterization, not to the sampler.
    sched = diffusers.LCMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_scaling=1e8,
        set_alpha_to_one=True,
        prediction_type=prediction,
    )
    ac = table_ac(sched)
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(SEED + 1)
    x, net = noise(), vp_network(prediction, ac)
    for t in sched.timesteps:
        x, denoised = sched.step(net(x, t), t, x, generator=g, return_dict=False)
    sigmas = schedules.lcm_sigmas(ac, n)
    torch.testing.assert_close(sigmas, schedules.sigmas_from_timesteps(sched.timesteps, ac))
    ours = run_ours(sampling.sample_lcm, prediction, ac, sigmas, noise() * (1 + sigmas[0] ** 2).sqrt())
    assert_rel(ours, denoised)


# rectified flow -------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [4, 28])
def test_flow_match_euler(shift, n):
    def velocity(z, timestep):  # network(z, t * 1000) -> eps - x0
        t = torch.as_tensor(timestep, dtype=F64).reshape(-1).expand(z.shape[0]).view(-1, 1, 1, 1) / 1000
        z = z.to(F64)
        x0 = x0_of(z, t)
        return torch.where(t == 1, z - x0, (z - x0) / t.clamp(min=1e-12))

    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 1 / n, n).tolist())
    g = torch.Generator().manual_seed(0)
    x = noise().float()
    for t in sched.timesteps:
        x = sched.step(velocity(x, t).float(), t, x, generator=g).prev_sample
    sigmas = schedules.flow_sigmas(n, shift=shift)
    D = Denoiser(lambda x_in, c_noise, cond: velocity(x_in, c_noise.double()), Flow())
    ours = sampling.sample_euler(D, sampling.init_x(noise(), sigmas), sigmas)
    assert_rel(ours, x.to(F64), tol=2e-5)  # diffusers runs flow matching in float32


@pytest.mark.parametrize("grid,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")])
@pytest.mark.parametrize("n", [6, 20])
def test_flow_named_grids_match_flow_match_scheduler(grid, flag, n):
    """Our 'karras' / 'exponential' grids of a flow model are diffusers' FlowMatch ones, over t from 1 exactly."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**{flag: True})
    sched.set_timesteps(n)
    sigmas = schedules.make_sigmas(grid, n, Flow())
    assert math.isinf(sigmas[0])
    t = torch.where(torch.isinf(sigmas), 1.0, sigmas / (1 + sigmas))
    torch.testing.assert_close(t, sched.sigmas.to(F64), rtol=1e-6, atol=1e-7)  # diffusers: float32
