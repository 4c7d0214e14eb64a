"""Samplers against an exact oracle: a 2-D Gaussian mixture has a closed-form denoiser E[x0 | x, sigma].

- every sampler's samples approach the data distribution as steps grow (sliced Wasserstein-2);
- deterministic samplers show their order against a reference probability-flow ODE solution;
- identities: DDIM(eta=0) == Euler; flow Euler in sigma coordinates == rectified-flow Euler in t.
"""

import math

import pytest
import torch

from latentdiff.diffusion import sampling, schedules
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import Flow, V

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: thread start-up costs more than the math on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class GaussianMixture:
    """Isotropic 2-D Gaussian mixture with its exact denoiser E[x0 | x0 + sigma * eps = x]."""

    def __init__(self):
        self.mu = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]], dtype=F64)  # (K, D)
        self.var = torch.tensor([0.225, 0.1, 0.4], dtype=F64)  # (K,)
        self.w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)  # (K,)

    def sample(self, n, generator):
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return self.mu[k] + self.var[k, None].sqrt() * torch.randn(n, 2, generator=generator, dtype=F64)

    def __call__(self, x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])
        if bool(torch.isinf(sigma).all()):  # pure noise: the posterior is the prior
            return (self.w[:, None] * self.mu).sum(0).expand_as(x).clone()
        var_t = self.var[None] + sigma[:, None] ** 2  # (B, K)
        d2 = ((x[:, None, :] - self.mu[None]) ** 2).sum(-1)  # (B, K)
        logp = self.w.log()[None] - x.shape[1] / 2 * var_t.log() - d2 / (2 * var_t)
        resp = logp.softmax(-1)  # (B, K)
        post = self.mu[None] + (self.var[None] / var_t)[..., None] * (
            x[:, None, :] - self.mu[None]
        )  # (B, K, D)
        return (resp[..., None] * post).sum(1)


GM = GaussianMixture()


def sliced_w2(a, b, n_proj=64):
    """Sliced Wasserstein-2 between two equal-size point clouds (fixed projections)."""
    g = torch.Generator().manual_seed(123)
    theta = torch.randn(2, n_proj, generator=g, dtype=F64)
    theta = theta / theta.norm(dim=0)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


N = 4000
DATA = GM.sample(N, torch.Generator().manual_seed(1))
FLOOR = sliced_w2(DATA, GM.sample(N, torch.Generator().manual_seed(2)))  # sampling noise of the metric


def consistency_oracle(x, sigma, cond=None):
    """The exact consistency function: the probability-flow ODE solved from sigma to 0 (many Heun steps)."""
    s = float(torch.as_tensor(sigma).reshape(-1)[0])
    return sampling.sample_heun(GM, x, schedules.karras_sigmas(60, 0.002, s))


def sample_with(name, steps, **kw):
    fn, _ = sampling.get_sampler(name)
    sigmas = schedules.karras_sigmas(steps, 0.01, 40.0)
    noise = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    return fn(GM, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(7), **kw)


# every sampler converges to the data distribution -------------------------------------------

STEPS = {  # (few, many): NFE roughly comparable
    "euler": (5, 100),
    "ddim": (5, 100),
    "heun": (3, 50),
    "dpmpp_2m": (5, 100),
    "unipc": (5, 100),
    "euler_ancestral": (5, 200),
    "ddpm": (5, 200),
    "dpmpp_2m_sde": (5, 200),
    "dpmpp_3m_sde": (5, 200),
    "dpmpp_2s_ancestral": (3, 100),
}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_distribution_converges(name):
    few, many = STEPS[name]
    err_few = sliced_w2(sample_with(name, few), DATA)
    err_many = sliced_w2(sample_with(name, many), DATA)
    # at N = 4000 points two independent samples of the data are ~0.03-0.08 apart (FLOOR is one draw)
    assert err_many < 0.5 * err_few, (name, err_few, err_many)
    assert err_many < 0.1, (name, err_many, FLOOR)


def test_ddim_eta_one_converges():
    err = sliced_w2(sample_with("ddim", 200, eta=1.0), DATA)
    assert err < 0.1


def test_lcm_with_consistency_function_is_exact_at_any_step_count():
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    data = DATA[:1000]
    floor = sliced_w2(data, GM.sample(1000, torch.Generator().manual_seed(3)))
    for steps in (1, 2, 4):
        sigmas = schedules.karras_sigmas(steps, 0.5, 40.0)
        x = sampling.sample_lcm(
            consistency_oracle, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(5)
        )
        assert sliced_w2(x, data) < floor + 0.03, steps


def test_stochastic_samplers_are_reproducible():
    for name in ("euler_ancestral", "ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral", "lcm"):
        a, b = sample_with(name, 4), sample_with(name, 4)
        assert torch.equal(a, b), name


# deterministic samplers show their order ------------------------------------------------------

ORDER_GRID = {"sigma_min": 0.05, "sigma_max": 10.0}
ORDER_NOISE = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=F64)


def state_at_sigma_min(fn, steps, **kw):
    """x at the last grid point before 0: the probability-flow ODE state at sigma_min."""
    sigmas = schedules.karras_sigmas(steps, **ORDER_GRID)
    seen = {}
    fn(GM, ORDER_NOISE * sigmas[0], sigmas, callback=lambda d: seen.update(x=d["x"]), **kw)
    return seen["x"]


@pytest.fixture(scope="module")
def ode_reference():
    return state_at_sigma_min(sampling.sample_heun, 2000)


ORDERS = [  # (sampler, kwargs, slope low, slope high)
    ("euler", {}, 0.8, 1.4),
    ("ddim", {}, 0.8, 1.4),
    ("heun", {}, 1.7, 2.6),
    ("dpmpp_2m", {}, 1.7, 2.6),
    ("dpmpp_2m_sde", {"eta": 0.0}, 1.7, 2.6),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 1.7, 2.6),
    ("dpmpp_3m_sde", {"eta": 0.0}, 2.2, 3.6),
    ("unipc", {}, 2.3, 3.6),  # UniP-2 + UniC: order 3
]


@pytest.mark.parametrize("name,kw,lo,hi", ORDERS, ids=[o[0] for o in ORDERS])
def test_order_of_convergence(name, kw, lo, hi, ode_reference):
    fn, _ = sampling.get_sampler(name)
    steps = [10, 20, 40, 80]
    errs = [(state_at_sigma_min(fn, n, **kw) - ode_reference).pow(2).mean().sqrt().item() for n in steps]
    lx = torch.tensor([math.log(n) for n in steps], dtype=F64)
    ly = torch.tensor([math.log(e) for e in errs], dtype=F64)
    slope = -(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()).item()
    assert lo < slope < hi, (name, slope, errs)


# identities ---------------------------------------------------------------------------------


def test_deterministic_ddim_equals_euler():
    sigmas = schedules.karras_sigmas(12, 0.01, 40.0)
    x = ORDER_NOISE * sigmas[0]
    a = sampling.sample_ddim(GM, x, sigmas)
    b = sampling.sample_euler(GM, x, sigmas)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def velocity(z, t):
    """An arbitrary smooth velocity field u(z, t) ('network' of a rectified-flow model)."""
    W = torch.tensor([[0.7, -0.4], [0.3, 0.9]], dtype=F64)
    return torch.tanh(z @ W) * (1 + t[:, None]) - 0.5 * z


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_equals_rectified_flow_euler_from_t_one(shift):
    calls = []

    def network(z, c_noise, cond):
        calls.append((z.clone(), c_noise.clone()))
        return velocity(z, c_noise.double() / 1000)

    D = Denoiser(network, Flow())
    sigmas = schedules.flow_sigmas(8, shift=shift)
    assert math.isinf(sigmas[0])
    noise = ORDER_NOISE.clone()
    ours = sampling.sample_euler(D, sampling.init_x(noise, sigmas), sigmas)
    # the first network call sees pure noise at t = 1 exactly
    torch.testing.assert_close(calls[0][0], noise)
    assert bool((calls[0][1] == 1000).all())
    # plain rectified-flow Euler in (z, t): z <- z + (t_next - t) u(z, t)
    ts = sigmas / (1 + sigmas)
    ts[0] = 1.0
    z = noise.clone()
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        z = z + (t_next - t) * velocity(z, torch.full((z.shape[0],), t, dtype=F64))
    torch.testing.assert_close(ours, z, rtol=1e-6, atol=1e-6)  # c_noise is float32


def test_every_sampler_starts_from_pure_noise_with_flow():
    """All samplers accept a grid starting at inf; with the exact flow oracle they reach the data."""

    def network(z, c_noise, cond):  # exact flow velocity eps - x0 from the oracle
        t = c_noise.double() / 1000
        sigma = t / (1 - t)
        x = torch.where(torch.isinf(sigma)[:, None], z, z * (1 + sigma[:, None]))
        x0 = GM(x, sigma)
        return torch.where(t[:, None] == 1, z - x0, (z - x0) / t[:, None])

    D = Denoiser(network, Flow())
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    floor = sliced_w2(DATA[:2000], GM.sample(2000, torch.Generator().manual_seed(3)))
    for name in sorted(STEPS):
        fn, _ = sampling.get_sampler(name)
        sigmas = schedules.flow_sigmas(60, shift=3.0)
        x = fn(D, sampling.init_x(noise, sigmas), sigmas, generator=torch.Generator().manual_seed(1))
        assert sliced_w2(x, DATA[:2000]) < floor + 0.06, name


def test_zero_snr_v_model_starts_at_inf():
    ac = schedules.rescale_zero_terminal_snr(schedules.alphas_cumprod(schedules.scaled_linear_betas()))
    sigmas = schedules.vp_sigmas(ac, 10, "trailing")
    assert math.isinf(sigmas[0])

    def network(z, c_noise, cond):  # exact v from the oracle
        sigma = schedules.t_to_sigma(c_noise.double(), ac)
        alpha, sig_vp = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
        inf = torch.isinf(sigma)
        x = torch.where(inf[:, None], z, z / torch.where(inf, 1.0, alpha)[:, None])
        x0 = GM(x, sigma)
        eps = torch.where(inf[:, None], z, (x - x0) / torch.where(inf, 1.0, sigma)[:, None])
        return torch.where(inf, 0.0, alpha)[:, None] * eps - torch.where(inf, 1.0, sig_vp)[:, None] * x0

    D = Denoiser(network, V(ac))
    x = sampling.sample_euler(D, sampling.init_x(ORDER_NOISE, sigmas), sigmas)
    assert torch.isfinite(x).all()
    # the first step from inf lands at sigmas[1] with x = E[x0] + sigmas[1] * noise
    seen = []
    sampling.sample_euler(D, sampling.init_x(ORDER_NOISE, sigmas), sigmas, callback=seen.append)
    torch.testing.assert_close(
        seen[1]["x"], GM(ORDER_NOISE, torch.tensor(math.inf)) + sigmas[1] * ORDER_NOISE
    )
