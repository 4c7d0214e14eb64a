"""APG, autoguidance and PAG: their algebra against CFG and against hand-written formulas."""

from __future__ import annotations

import threading

import torch

from latentdiff.diffusion.guidance import apg, autoguidance, cfg, pag
from latentdiff.models.layers import Attention, perturbed_self_attention
from latentdiff.types import Cond


def _toy():
    """A denoiser whose output depends on x, sigma and the condition vector."""
    def d(x, sigma, cond=None):
        v = cond.vector.view(-1, 4, 1, 1) if cond is not None else 0.0
        return torch.tanh(x) * 0.7 + v - 0.1 * sigma.view(-1, 1, 1, 1)
    return d


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([2.0, 1.0, 0.5])
    cond = Cond(vector=torch.randn(3, 4, generator=g))
    uncond = Cond(vector=torch.zeros(1, 4))
    return x, sigma, cond, uncond


def test_apg_with_the_parallel_part_kept_is_cfg():
    x, sigma, cond, uncond = _inputs()
    d = _toy()
    torch.testing.assert_close(apg(d, 4.0, uncond, eta=1.0)(x, sigma, cond), cfg(d, 4.0, uncond)(x, sigma, cond))


def test_apg_update_is_orthogonal_to_the_conditional_prediction():
    x, sigma, cond, uncond = _inputs()
    d = _toy()
    x0_c = d(x, sigma, cond)
    delta = apg(d, 4.0, uncond)(x, sigma, cond) - x0_c
    dots = (delta * x0_c).sum(dim=(1, 2, 3)) / (delta.flatten(1).norm(dim=1) * x0_c.flatten(1).norm(dim=1))
    assert dots.abs().max() < 1e-5
    assert delta.abs().max() > 1e-2  # it does guide


def test_apg_norm_cap_and_momentum():
    x, sigma, cond, uncond = _inputs()
    d = _toy()
    x0_c = d(x, sigma, cond)
    capped = apg(d, 3.0, uncond, eta=1.0, norm_threshold=0.1)(x, sigma, cond) - x0_c
    assert torch.allclose(capped.flatten(1).norm(dim=1), torch.full((3,), 2 * 0.1), atol=1e-5)
    g = apg(d, 3.0, uncond, eta=1.0, momentum=-0.5)
    first = g(x, sigma, cond) - x0_c
    second = g(x, sigma, cond) - x0_c  # the same update again, minus half the running one
    torch.testing.assert_close(second, first * 0.5)


def test_autoguidance_is_the_lerp_from_the_guide():
    x, sigma, cond, _ = _inputs()
    d = _toy()

    def weak(x, sigma, cond=None):
        return 0.5 * d(x, sigma, cond)

    out = autoguidance(d, weak, 2.5)(x, sigma, cond)
    torch.testing.assert_close(out, weak(x, sigma, cond) + 2.5 * (d(x, sigma, cond) - weak(x, sigma, cond)))
    torch.testing.assert_close(autoguidance(d, weak, 1.0)(x, sigma, cond), d(x, sigma, cond))


class _AttnNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention(4, None, heads=2, head_dim=2)

    def forward(self, x, sigma, cond=None):
        B, C, H, W = x.shape
        h = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        return (h + self.attn(h)).transpose(1, 2).reshape(B, C, H, W)


def test_pag_guides_away_from_the_identity_attention_prediction():
    x, sigma, _, _ = _inputs()
    net = _AttnNet()
    with torch.no_grad():
        plain = net(x, sigma)
        with perturbed_self_attention():
            perturbed = net(x, sigma)
        h = x.flatten(2).transpose(1, 2)
        expect = (h + net.attn.to_out[0](net.attn.to_v(h))).transpose(1, 2).reshape(x.shape)
        torch.testing.assert_close(perturbed, expect)  # the identity map: each token keeps its own value
        assert not torch.allclose(plain, perturbed)
        torch.testing.assert_close(pag(net, 2.0, perturbed_self_attention)(x, sigma), plain + 2.0 * (plain - perturbed))
        torch.testing.assert_close(pag(net, 0.0, perturbed_self_attention)(x, sigma), plain)
        torch.testing.assert_close(net(x, sigma), plain)  # the context ends with the call


def test_perturbation_stays_in_its_thread():
    x, sigma, _, _ = _inputs()
    net = _AttnNet()
    with torch.no_grad():
        plain = net(x, sigma)
        seen = {}
        with perturbed_self_attention():
            t = threading.Thread(target=lambda: seen.update(out=net(x, sigma)))
            t.start()
            t.join()
        torch.testing.assert_close(seen["out"], plain)
