"""PSNR and SSIM against scikit-image and analytic cases; the rFID hook's wiring."""

import math

import numpy as np
import pytest
import torch
from test_models import one_thread, tiny_vae  # noqa: F401 (one_thread: an autouse fixture)

from latentdiff.eval.reconstruction import psnr, reconstruction_fid, reconstruction_metrics, ssim


def pair(seed=0, b=3, size=32, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size + 6, generator=g) * 2 - 1
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return y, x


def test_psnr_analytic():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1  # MSE 0.01 on a range of 2: 10 log10(4 / 0.01) = 26.02 dB
    torch.testing.assert_close(psnr(y, x), torch.full((2,), 10 * math.log10(400.0), dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_analytic_cases():
    x, _ = pair()
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64))
    flat = torch.zeros(1, 3, 16, 16)
    # Two flat images: SSIM is the luminance term (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    c1 = (0.01 * 2) ** 2
    expected = (2 * 0.5 * -0.5 + c1) / (0.25 + 0.25 + c1)
    torch.testing.assert_close(ssim(flat + 0.5, flat - 0.5), torch.tensor([expected], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(flat[..., :8, :8], flat[..., :8, :8])
    with pytest.raises(ValueError, match="of one shape"):
        psnr(flat, flat[..., :8])


@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_parity_with_scikit_image(noise):
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (dev extra) is the reference")
    y, x = pair(noise=noise)
    ours_ssim, ours_psnr = ssim(y, x), psnr(y, x)
    for i in range(len(x)):
        a, b = y[i].permute(1, 2, 0).double().numpy(), x[i].permute(1, 2, 0).double().numpy()
        ref_ssim = metrics.structural_similarity(a, b, data_range=2.0, channel_axis=2, gaussian_weights=True,
                                                 sigma=1.5, use_sample_covariance=False)
        ref_psnr = metrics.peak_signal_noise_ratio(b, a, data_range=2.0)
        assert ours_ssim[i].item() == pytest.approx(ref_ssim, abs=1e-10)
        assert ours_psnr[i].item() == pytest.approx(ref_psnr, abs=1e-10)


def test_reconstruction_metrics_and_rfid_hook():
    vae = tiny_vae()
    batches = [pair(seed=s, size=16)[1] for s in range(2)]
    m = reconstruction_metrics(vae, batches)
    assert m["images"] == 6 and 0 < m["psnr"] < 60 and -1 <= m["ssim"] <= 1
    perfect = reconstruction_metrics(vae, batches, reconstruct_fn=lambda x: x)
    assert perfect["ssim"] == pytest.approx(1.0) and math.isinf(perfect["psnr"])

    seen = []

    def features(images):  # a stand-in extractor: per-channel means
        seen.append(images)
        return images.mean(dim=(2, 3))

    def distance(real, fake):  # a stand-in distance: squared difference of the means
        assert real.shape == fake.shape == (6, 3)
        return float((real.mean(0) - fake.mean(0)).pow(2).sum())

    d = reconstruction_fid(vae, batches, features, distance)
    assert len(seen) == 4 and torch.equal(seen[0], batches[0])  # real, reconstruction, real, reconstruction
    recon = torch.cat([seen[1], seen[3]])
    expected = (torch.cat(batches).mean(dim=(0, 2, 3)).double() - recon.mean(dim=(0, 2, 3)).double()).pow(2).sum()
    assert d == pytest.approx(float(expected)) and np.isfinite(d)
