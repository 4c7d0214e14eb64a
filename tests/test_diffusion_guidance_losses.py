"""Classifier-free guidance wrappers and training losses."""

import math

import pytest
import torch

from latentdiff.diffusion import guidance, losses, schedules
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import EDM, Eps, Flow, V
from latentdiff.types import Cond

F64 = torch.float64
AC = schedules.alphas_cumprod(schedules.scaled_linear_betas())


class CountingNet(torch.nn.Module):
    """eps-net whose output depends on the Cond vector, recording batch sizes of its calls."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x_in, c_noise, cond):
        self.calls.append(x_in.shape[0])
        v = cond.vector if cond is not None else torch.zeros(x_in.shape[0], 1)
        return torch.tanh(x_in) * self.w + v.view(-1, 1, 1, 1) * 0.1 + c_noise.view(-1, 1, 1, 1) / 1000


def setup():
    net = CountingNet()
    D = Denoiser(net, Eps(AC))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([5.0, 5.0, 5.0], dtype=F64)
    cond = Cond(vector=torch.tensor([[1.0], [2.0], [3.0]]))
    uncond = Cond(vector=torch.zeros(1, 1))
    return net, D, x, sigma, cond, uncond


def test_cfg_one_batch_and_formula():
    net, D, x, sigma, cond, uncond = setup()
    guided = guidance.cfg(D, 4.0, uncond)
    out = guided(x, sigma, cond)
    assert net.calls == [6]  # cond and uncond as one batch
    c = D(x, sigma, cond)
    u = D(x, sigma, Cond(vector=torch.zeros(3, 1)))
    torch.testing.assert_close(out, u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_cfg_scale_one_skips_uncond():
    net, D, x, sigma, cond, uncond = setup()
    out = guidance.cfg(D, 1.0, uncond)(x, sigma, cond)
    assert net.calls == [3]
    torch.testing.assert_close(out, D(x, sigma, cond))


def test_cfg_uncond_none_and_errors():
    net, D, x, sigma, cond, _ = setup()
    guidance.cfg(D, 2.0, None)(x, sigma, cond)
    assert net.calls == [3, 3]  # a cond=None call cannot share a batch
    with pytest.raises(ValueError, match="batch 1"):
        guidance.cfg(D, 2.0, Cond(vector=torch.zeros(2, 1)))(x, sigma, cond)
    with pytest.raises(ValueError, match="scale must be >= 0"):
        guidance.cfg(D, -1.0, None)
    with pytest.raises(ValueError, match="interval"):
        guidance.cfg(D, 2.0, None, interval=(3.0, 1.0))


def test_guidance_interval():
    net, D, x, sigma, cond, uncond = setup()
    guided = guidance.cfg(D, 4.0, uncond, interval=(1.0, 10.0))
    out_in = guided(x, sigma, cond)
    assert net.calls == [6]
    out_out = guided(x, torch.full((3,), 20.0, dtype=F64), cond)
    assert net.calls == [6, 3]  # outside the interval: cond only
    torch.testing.assert_close(out_out, D(x, torch.full((3,), 20.0, dtype=F64), cond))
    mixed = guided(x, torch.tensor([5.0, 20.0, 0.5], dtype=F64), cond)
    torch.testing.assert_close(mixed[0], out_in[0])
    torch.testing.assert_close(mixed[1], D(x, torch.full((3,), 20.0, dtype=F64), cond)[1])


def test_guidance_rescale_matches_diffusers_formula_on_eps():
    _net, D, x, sigma, cond, uncond = setup()
    phi, scale = 0.7, 6.0
    out = guidance.cfg(D, scale, uncond, rescale=phi)(x, sigma, cond)
    # diffusers' rescale_noise_cfg on the eps prediction
    s = sigma.float().view(-1, 1, 1, 1)
    eps_c = (x - D(x, sigma, cond)) / s
    eps_u = (x - D(x, sigma, Cond(vector=torch.zeros(3, 1)))) / s
    eps = eps_u + scale * (eps_c - eps_u)
    std_c = eps_c.std(dim=(1, 2, 3), keepdim=True)
    std_g = eps.std(dim=(1, 2, 3), keepdim=True)
    eps = phi * eps * (std_c / std_g) + (1 - phi) * eps
    torch.testing.assert_close(out, x - s * eps, rtol=1e-4, atol=1e-4)


def test_dynamic_threshold():
    x0 = torch.randn(2, 3, 8, 8) * 3
    out = guidance.dynamic_threshold(x0, 0.9)
    assert out.abs().max() <= 1 + 1e-6
    small = torch.rand(2, 3, 8, 8) * 0.5
    torch.testing.assert_close(guidance.dynamic_threshold(small, 0.9), small)  # s = max(1, q)
    _net, D, x, sigma, cond, uncond = setup()
    guided = guidance.cfg(D, 30.0, uncond, threshold=0.995)
    assert guided(x, sigma, cond).abs().max() <= 1 + 1e-6


# losses ---------------------------------------------------------------------------------------


def test_eps_unit_weight_is_classic_eps_mse():
    net = CountingNet()
    D = Denoiser(net, Eps(AC))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 4, 4, generator=g)
    noise = torch.randn(4, 2, 4, 4, generator=g)
    sigma = schedules.vp_sigma_table(AC)[torch.tensor([10, 200, 600, 999])]
    loss = losses.denoising_loss(D, x0, sigma, None, noise=noise)
    assert loss.shape == (4,)
    # classic: z_t = sqrt(a) x0 + sqrt(1-a) eps, network(z_t, t) vs eps
    a = AC[torch.tensor([10, 200, 600, 999])].float().view(-1, 1, 1, 1)
    z = a.sqrt() * x0 + (1 - a).sqrt() * noise
    eps_hat = net(z, torch.tensor([10.0, 200.0, 600.0, 999.0]), None)
    torch.testing.assert_close(loss, (eps_hat - noise).pow(2).mean((1, 2, 3)), rtol=1e-4, atol=1e-6)
    loss.mean().backward()
    assert net.w.grad is not None


@pytest.mark.parametrize("param", [Eps(AC), V(AC), EDM(), Flow()], ids=["eps", "v", "edm", "flow"])
def test_weighting_is_on_x0_loss(param):
    net = CountingNet()
    D = Denoiser(net, param)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    sigma = torch.tensor([0.1, 1.0, 7.0], dtype=F64)
    w = lambda s: losses.min_snr_weight(s, 5.0, param)
    loss = losses.denoising_loss(D, x0, sigma, None, noise=noise, weighting=w)
    x0_hat = D(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma)
    expected = w(sigma) * (x0_hat - x0).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)
    # unit weight = raw MSE = x0 loss / c_out^2
    raw = losses.denoising_loss(D, x0, sigma, None, noise=noise)
    c_out = param.scalings(sigma)[1]
    torch.testing.assert_close(
        raw.double(), (x0_hat - x0).pow(2).mean((1, 2, 3)) / c_out**2, rtol=1e-4, atol=1e-7
    )


def test_min_snr_conversions_and_edm_weight():
    sigma = torch.tensor([0.1, 0.5, 2.0], dtype=F64)
    snr = 1 / sigma**2
    # on x0: min(snr, g); on eps: min(snr, g) / snr (diffusers); on v: min(snr, g) / (snr + 1)
    eps_w = losses.min_snr_weight(sigma) * sigma**2  # x0-weight times c_out^2 for eps
    torch.testing.assert_close(eps_w, snr.clamp(max=5) / snr)
    v_w = losses.min_snr_weight(sigma) * sigma**2 / (sigma**2 + 1)
    torch.testing.assert_close(v_w, snr.clamp(max=5) / (snr + 1))
    # EDM with unit weighting is EDM's lambda
    torch.testing.assert_close(losses.edm_weight(sigma, 0.5), 1 / EDM(0.5).scalings(sigma)[1] ** 2)


def test_sigma_samplers():
    g = torch.Generator().manual_seed(0)
    d = losses.make_sigma_sampler("discrete", Eps(AC))(2000, generator=g)
    assert d.shape == (2000,) and d.dtype == F64
    table = schedules.vp_sigma_table(AC)
    assert torch.isin(d, table).all()
    ln = losses.make_sigma_sampler("lognormal", None)(20000, generator=g)
    assert abs(ln.log().mean().item() + 1.2) < 0.05 and abs(ln.log().std().item() - 1.2) < 0.05
    lt = losses.make_sigma_sampler("logitnormal", Flow(), mean=0.5)(20000, generator=g)
    t = lt / (1 + lt)
    assert ((t > 0) & (t < 1)).all() and abs(torch.logit(t).mean().item() - 0.5) < 0.05
    a = losses.LogNormalSigma()(5, generator=torch.Generator().manual_seed(3))
    b = losses.LogNormalSigma()(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs a discrete parameterization"):
        losses.make_sigma_sampler("discrete", EDM())
    with pytest.raises(ValueError, match="unknown sigma sampler"):
        losses.make_sigma_sampler("uniform", EDM())
    with pytest.raises(ValueError, match=r"takes \['mean', 'std'\], not \['p_mean'\]"):
        losses.make_sigma_sampler("logitnormal", Flow(), p_mean=0.5)


def test_training_config_passes_sigma_sampler_args(tmp_path):
    """`sigma_sampler_args` reaches the sampler: a train run with a wrong key fails before training, naming it."""
    from _tiny import make_tiny_cache

    from latentdiff.config import build_config
    from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser

    cfg = build_config(TrainConfig, TRAIN_PRESETS, "shapes-demo", None, {"sigma_sampler_args.mean": -0.5})
    assert cfg.sigma_sampler == "logitnormal" and cfg.sigma_sampler_args == {"mean": -0.5}
    bad = build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None,
                       {"sigma_sampler_args.p_std": 2.0, "cache": str(make_tiny_cache(tmp_path)),
                        "out": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"sigma sampler 'discrete' takes no arguments, not \['p_std'\]"):
        train_denoiser(bad)
    assert not (tmp_path / "run" / "model").exists()


def test_zero_snr_v_training_at_inf():
    ac = schedules.rescale_zero_terminal_snr(AC)
    D = Denoiser(CountingNet(), V(ac))
    x0 = torch.randn(2, 2, 4, 4)
    noise = torch.randn(2, 2, 4, 4)
    loss = losses.denoising_loss(D, x0, torch.tensor([math.inf, 1.0], dtype=F64), None, noise=noise)
    assert torch.isfinite(loss).all()
    # at sigma = inf the v-target is -x0 and the input is the noise
    raw = D.network(noise, torch.tensor([999.0, 0.0]), None)[0]
    torch.testing.assert_close(loss[0], (raw + x0[0]).pow(2).mean(), rtol=1e-5, atol=1e-6)


def test_offset_noise_and_plain_callable():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(2, 3, 4, 4)
    D = lambda x, s, c: torch.zeros_like(x)
    one = lambda s: torch.ones_like(s)
    loss = losses.denoising_loss(
        D, x0, torch.ones(2, dtype=F64), weighting=one, generator=g, offset_noise=0.1
    )
    assert loss.shape == (2,) and (loss == 0).all()
    with pytest.raises(ValueError, match="pass a weighting"):
        losses.denoising_loss(D, x0, torch.ones(2, dtype=F64))
