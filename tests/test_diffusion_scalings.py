"""Parameterizations, the Denoiser, schedules and bad input."""

import math

import pytest
import torch

from latentdiff.diffusion import sampling, schedules
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import (
    EDM,
    PARAMETERIZATIONS,
    X0,
    Eps,
    Flow,
    V,
    make_parameterization,
)

F64 = torch.float64
AC = schedules.alphas_cumprod(schedules.scaled_linear_betas())
AC_ZSNR = schedules.rescale_zero_terminal_snr(AC)


def exact_network(param, x0, eps, sigma):
    """A 'network' that returns the exact target of `param` for known x0 and eps, checking its input."""

    def network(x_in, c_noise, cond):
        s = sigma.view(-1, 1, 1, 1)
        inf = torch.isinf(s)
        s_ = torch.where(inf, 1.0, s)
        alpha, sig_vp = 1 / (1 + s_**2).sqrt(), s_ / (1 + s_**2).sqrt()
        alpha, sig_vp = torch.where(inf, 0.0, alpha), torch.where(inf, 1.0, sig_vp)
        if param.name in ("eps", "v", "x0"):
            z = alpha * x0 + sig_vp * eps  # VP state
            torch.testing.assert_close(x_in, z)
            target = {"eps": eps, "v": alpha * eps - sig_vp * x0, "x0": x0}[param.name]
        elif param.name == "flow":
            t = torch.where(inf, 1.0, s_ / (1 + s_))
            torch.testing.assert_close(x_in, (1 - t) * x0 + t * eps)
            target = eps - x0
        else:  # EDM: F = (x0 - c_skip x) / c_out, Karras et al. 2022 eq. 7
            sd = param.sigma_data
            x = x0 + s * eps
            torch.testing.assert_close(x_in, x / (s**2 + sd**2).sqrt())
            target = (x0 - sd**2 / (s**2 + sd**2) * x) / (s * sd / (s**2 + sd**2).sqrt())
        return target

    return network


PARAMS = [Eps(AC), V(AC), X0(AC), EDM(), Flow()]


@pytest.mark.parametrize("param", PARAMS, ids=[p.name for p in PARAMS])
def test_denoiser_recovers_x0_from_exact_target(param):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=F64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=F64)
    sigma = torch.tensor([0.03, 0.5, 3.0, 14.0], dtype=F64)
    if param.name in ("v", "x0", "flow"):
        sigma[-1] = math.inf  # pure noise: x is the noise itself
    x = torch.where(
        torch.isinf(sigma).view(-1, 1, 1, 1),
        eps,
        x0 + torch.where(torch.isinf(sigma), 0, sigma).view(-1, 1, 1, 1) * eps,
    )
    D = Denoiser(exact_network(param, x0, eps, sigma), param)
    torch.testing.assert_close(D(x, sigma), x0, rtol=1e-10, atol=1e-10)


def test_scalings_shapes_and_float64():
    for param in PARAMS:
        out = param.scalings(torch.tensor([0.1, 1.0, 10.0]))
        assert len(out) == 4
        for c in out:
            assert c.shape == (3,) and c.dtype == F64
        assert isinstance(param.sigma_min, float) and isinstance(param.sigma_max, float)
        assert param.name in PARAMETERIZATIONS


def test_discrete_c_noise_is_the_timestep_at_table_sigmas():
    table = schedules.vp_sigma_table(AC)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    for param in (Eps(AC), V(AC)):
        c_noise = param.scalings(table[t])[3]
        torch.testing.assert_close(c_noise, t.to(F64), rtol=0, atol=1e-9)
    # fractional timesteps: t_to_sigma and sigma_to_t are inverses
    tf = torch.tensor([0.0, 0.25, 10.5, 998.75, 999.0], dtype=F64)
    torch.testing.assert_close(schedules.sigma_to_t(schedules.t_to_sigma(tf, AC), AC), tf)
    # out of range clamps
    assert schedules.sigma_to_t(torch.tensor(1e-6), AC).item() == 0
    assert schedules.sigma_to_t(torch.tensor(1e6), AC).item() == 999


def test_zero_snr_table_and_inf():
    table = schedules.vp_sigma_table(AC_ZSNR)
    assert math.isinf(table[-1]) and torch.isfinite(table[:-1]).all()
    assert schedules.sigma_to_t(torch.tensor(math.inf), AC_ZSNR).item() == 999
    assert math.isinf(schedules.t_to_sigma(999.0, AC_ZSNR).item())
    assert math.isinf(V(AC_ZSNR).sigma_max)
    with pytest.raises(ValueError, match="eps-prediction cannot denoise at sigma=inf"):
        Eps(AC_ZSNR).scalings(torch.tensor([math.inf]))


def test_flow_c_noise_is_sd3_timestep():
    sigma = torch.tensor([1.0, 3.0, math.inf], dtype=F64)
    c_skip, c_out, _c_in, c_noise = Flow().scalings(sigma)
    torch.testing.assert_close(c_noise, torch.tensor([500.0, 750.0, 1000.0], dtype=F64))
    torch.testing.assert_close(c_skip[-1:], torch.ones(1, dtype=F64))  # x0 = noise - F at t = 1
    torch.testing.assert_close(c_out[-1:], -torch.ones(1, dtype=F64))


def test_denoiser_dtypes():
    x = torch.randn(2, 3, 4, 4)
    seen = {}

    def network(x_in, c_noise, cond):
        seen.update(dtype=x_in.dtype, c_dtype=c_noise.dtype, shape=c_noise.shape)
        return x_in

    D3 = Denoiser(network, Eps(AC))
    assert D3(x, 1.0).dtype == torch.float32  # scalar sigma broadcast
    assert seen == {"dtype": torch.float32, "c_dtype": torch.float32, "shape": (2,)}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x_in, c_noise, cond):
            assert x_in.dtype == torch.bfloat16
            return self.conv(x_in)

    out = Denoiser(Net().to(torch.bfloat16), Eps(AC))(x, torch.tensor([1.0, 2.0]))
    assert out.dtype == torch.float32  # network ran in bf16, result in x's dtype
    with pytest.raises(ValueError, match="sigma must be a scalar or of shape"):
        D3(x, torch.ones(3))


def test_make_parameterization():
    assert isinstance(make_parameterization("eps", AC), Eps)
    assert isinstance(make_parameterization("v_prediction", AC), V)
    assert isinstance(make_parameterization("edm", sigma_data=1.0), EDM)
    assert isinstance(make_parameterization("flow"), Flow)
    with pytest.raises(ValueError, match="needs alphas_cumprod"):
        make_parameterization("v")
    with pytest.raises(ValueError, match="unknown parameterization"):
        make_parameterization("velocity")


# schedules ------------------------------------------------------------------------------------


def test_beta_schedules_match_definitions():
    b = schedules.scaled_linear_betas()
    assert b.dtype == F64 and len(b) == 1000
    assert abs(b[0].item() - 0.00085) < 1e-12 and abs(b[-1].item() - 0.012) < 1e-12
    ac = schedules.alphas_cumprod(schedules.linear_betas())
    assert (ac[1:] < ac[:-1]).all()
    cb = schedules.cosine_betas(1000)
    assert cb.max() <= 0.999
    z = schedules.rescale_zero_terminal_snr(AC)
    assert z[-1] == 0 and abs(z[0] - AC[0]) < 1e-12


@pytest.mark.parametrize(
    "grid",
    [
        schedules.karras_sigmas(10, 0.03, 14.6),
        schedules.exponential_sigmas(10, 0.03, 14.6),
        schedules.vp_sigmas(AC, 10, "trailing"),
        schedules.vp_sigmas(AC, 10, "leading", steps_offset=1),
        schedules.vp_sigmas(AC, 10, "linspace"),
        schedules.vp_sigmas(AC_ZSNR, 10, "trailing"),
        schedules.flow_sigmas(10, shift=3.0),
        schedules.lcm_sigmas(AC, 4),
    ],
)
def test_grids_are_valid(grid):
    assert grid.dtype == F64 and grid[-1] == 0
    schedules.check_sigmas(grid)


def test_grid_values():
    k = schedules.karras_sigmas(5, 0.1, 10.0)
    assert len(k) == 6 and abs(k[0] - 10) < 1e-12 and abs(k[-2] - 0.1) < 1e-12
    f = schedules.flow_sigmas(4)
    torch.testing.assert_close(f[1:], torch.tensor([3.0, 1.0, 1 / 3, 0.0], dtype=F64))
    assert math.isinf(f[0])
    torch.testing.assert_close(schedules.flow_sigmas(4, shift=2.0)[1:], 2 * f[1:])
    assert schedules.vp_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert schedules.vp_timesteps(1000, 4, "leading", 1).tolist() == [751, 501, 251, 1]
    assert abs(schedules.flux_mu(256) - 0.5) < 1e-12 and abs(schedules.flux_mu(4096) - 1.15) < 1e-12
    assert abs(schedules.flux_shift(4096) - math.exp(1.15)) < 1e-12


def test_make_sigmas():
    assert len(schedules.make_sigmas("karras", 7, EDM())) == 8
    assert math.isinf(schedules.make_sigmas("default", 7, Flow())[0])
    torch.testing.assert_close(schedules.make_sigmas("default", 7, Eps(AC)), schedules.vp_sigmas(AC, 7))
    assert math.isinf(schedules.make_sigmas("karras", 7, Flow())[0])  # over flow time, from t = 1
    with pytest.raises(ValueError, match="finite sigma_max"):
        schedules.make_sigmas("karras", 7, V(AC_ZSNR))
    with pytest.raises(ValueError, match="needs a discrete model"):
        schedules.make_sigmas("trailing", 7, EDM())
    with pytest.raises(ValueError, match="unknown sigma grid"):
        schedules.make_sigmas("karas", 7, EDM())


# bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,msg",
    [
        ([3.0, 1.0, 1.0, 0.0], "strictly decreasing"),
        ([3.0, 1.0, 0.5], "must end in 0"),
        ([3.0, float("nan"), 0.0], "NaN"),
        ([0.0], "at least 2"),
        ([1.0, 2.0, 0.0], "strictly decreasing"),
    ],
)
def test_bad_grid_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        schedules.check_sigmas(torch.tensor(bad))
    with pytest.raises(ValueError, match=msg):
        sampling.sample_euler(lambda x, s, c: x, torch.zeros(1, 2), torch.tensor(bad, dtype=F64))


def test_steps_below_one_refused():
    with pytest.raises(ValueError, match=">= 1"):
        schedules.karras_sigmas(0, 0.1, 10.0)
    with pytest.raises(ValueError, match="at least 2"):
        sampling.sample_dpmpp_2m(lambda x, s, c: x, torch.zeros(1, 2), torch.zeros(1, dtype=F64))


def test_unknown_sampler_lists_nearest():
    with pytest.raises(ValueError, match="Did you mean 'dpmpp_2m'") as e:
        sampling.get_sampler("dpmpp2m")
    assert "euler_ancestral" in str(e.value)
    with pytest.raises(ValueError, match="Known samplers"):
        sampling.get_sampler("zzzz")


def test_sampler_registry():
    assert sampling.get_sampler("DPM++ 2M Karras") == (sampling.sample_dpmpp_2m, "karras")
    assert sampling.get_sampler("dpm++ 2m karras") == (sampling.sample_dpmpp_2m, "karras")
    assert sampling.get_sampler("Euler a")[0] is sampling.sample_euler_ancestral
    assert sampling.get_sampler("k_euler_a")[0] is sampling.sample_euler_ancestral
    assert sampling.get_sampler("DPMSolverMultistepScheduler")[0] is sampling.sample_dpmpp_2m
    assert sampling.get_sampler("FlowMatchEulerDiscreteScheduler") == (sampling.sample_euler, "flow_match")
    for name in (
        "euler",
        "euler_ancestral",
        "heun",
        "ddim",
        "ddpm",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "dpmpp_3m_sde",
        "dpmpp_2s_ancestral",
        "unipc",
        "lcm",
    ):
        fn, grid = sampling.SAMPLERS[name]
        assert fn is getattr(sampling, f"sample_{name}") and grid in schedules.GRIDS
    for fn, grid in sampling.SAMPLERS.values():
        assert grid in schedules.GRIDS


def test_callback_and_nfe():
    seen = []
    calls = []

    def D(x, sigma, cond):
        calls.append(sigma)
        assert sigma.shape == (x.shape[0],) and sigma.dtype == F64
        return 0.5 * x

    sigmas = schedules.karras_sigmas(6, 0.1, 10.0)
    sampling.sample_heun(D, torch.ones(3, 2), sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert set(seen[0]) == {"i", "x", "sigma", "denoised"}
    assert len(calls) == 11  # 2 per step, 1 on the last


@pytest.mark.parametrize("name", sorted(sampling._CANONICAL))
def test_samplers_keep_x_dtype(name):
    fn, _ = sampling.get_sampler(name)
    x = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    sigmas = [14.6, 3.0, 0.5, 0.0]  # a plain list is accepted too
    out = fn(lambda x, s, c: 0.5 * x, x * 14.6, sigmas, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out.float()).all()


def test_evaluation_counts_and_impossible_step_counts():
    sigmas = schedules.karras_sigmas(6, 0.1, 10.0)
    assert sampling.count_evaluations("heun", sigmas) == 11
    assert sampling.count_evaluations("DPM++ 2S a", sigmas) == 11
    assert sampling.count_evaluations("dpmpp_2m", sigmas) == 6
    assert sampling.count_evaluations(sampling.sample_heun, schedules.flow_sigmas(6)) == 10  # exact first step
    assert sampling.steps_for_evaluations("heun", 9) == 5
    assert sampling.steps_for_evaluations("unipc", 10) == 10
    with pytest.raises(ValueError, match=r"heun makes 2 evaluations per step.*use 9 \(5 steps\) or 11 \(6 steps\)"):
        sampling.steps_for_evaluations("heun", 10)
    with pytest.raises(ValueError, match=">= 1"):
        sampling.steps_for_evaluations("euler", 0)
    # the counts are what the samplers do
    for name in ("heun", "dpmpp_2s_ancestral", "unipc"):
        calls = []
        fn, _ = sampling.get_sampler(name)
        fn(lambda x, s, c, calls=calls: calls.append(1) or 0.5 * x, torch.ones(1, 2), sigmas * 1.0,
           generator=torch.Generator().manual_seed(0))
        assert len(calls) == sampling.count_evaluations(name, sigmas), name


@pytest.mark.parametrize("name", sorted(sampling._CANONICAL))
def test_one_step_is_possible_for_every_sampler(name):
    """Higher-order samplers lower their order when history or steps are short: one step is one Euler step."""
    fn, _ = sampling.get_sampler(name)
    sigmas = torch.tensor([2.0, 0.0], dtype=F64)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2.0
    out = fn(lambda x, s, c: 0.5 * x, x, sigmas, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, 0.5 * x)  # x0_hat at the only step
