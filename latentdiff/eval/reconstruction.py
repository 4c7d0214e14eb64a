"""How well an autoencoder reconstructs: PSNR, SSIM (Wang et al. 2004), rFID through a given feature extractor.

Images are tensors (B, 3, H, W) in [-1, 1] (the autoencoder's range), so the data range is 2. SSIM uses the
Gaussian-weighted form of Wang et al. 2004 (sigma 1.5, an 11x11 window, K1 = 0.01, K2 = 0.03, population
covariances), averaged over channels and over the pixels whose window lies inside the image; that is
scikit-image's ``structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``, and
tests/test_reconstruction_metrics.py checks the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

DATA_RANGE = 2.0  # images in [-1, 1]


def psnr(reconstruction: Tensor, target: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Peak signal-to-noise ratio per image in dB, (B,): 10 log10(range^2 / MSE); inf for identical images."""
    _check_pair(reconstruction, target)
    mse = (reconstruction.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> Tensor:
    """Normalized 1-D Gaussian taps out to ``int(truncate * sigma + 0.5)`` (11 taps for sigma 1.5), float64."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(reconstruction: Tensor, target: Tensor, data_range: float = DATA_RANGE, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Structural similarity per image, (B,), Wang et al. 2004, with a Gaussian window."""
    _check_pair(reconstruction, target)
    x, y = reconstruction.double(), target.double()
    B, C = x.shape[:2]
    w = gaussian_window(sigma)
    if min(x.shape[-2:]) < len(w):
        raise ValueError(f"SSIM needs images of at least {len(w)}x{len(w)} pixels, got {tuple(x.shape[-2:])}")

    def blur(t: Tensor) -> Tensor:  # separable 'valid' filtering: only windows fully inside the image
        t = t.reshape(B * C, 1, *t.shape[-2:])
        t = F.conv2d(t, w.view(1, 1, -1, 1))
        return F.conv2d(t, w.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.reshape(B, -1).mean(1)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


@torch.no_grad()
def reconstruct(autoencoder, images: Tensor) -> Tensor:
    """Encode to the posterior mode and decode back, clamped to [-1, 1] (what a user would see)."""
    autoencoder.eval()
    return autoencoder.decode(autoencoder.encode(images)).clamp(-1, 1)


@torch.no_grad()
def reconstruction_metrics(autoencoder, batches: Iterable[Tensor],
                           reconstruct_fn: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """Mean PSNR and SSIM over all images in ``batches`` (in [-1, 1]), plus their count.

    ``reconstruct_fn`` replaces the plain encode-decode round trip (e.g. a tiled one, or a preview decoder).
    """
    fn = reconstruct_fn or (lambda x: reconstruct(autoencoder, x))
    psnrs, ssims = [], []
    for images in batches:
        recon = fn(images).float().clamp(-1, 1)
        psnrs.append(psnr(recon, images))
        ssims.append(ssim(recon, images))
    if not psnrs:
        raise ValueError("reconstruction_metrics got no images")
    p, s = torch.cat(psnrs), torch.cat(ssims)
    finite = p[torch.isfinite(p)]
    return {"psnr": float(finite.mean()) if len(finite) else math.inf, "ssim": float(s.mean()), "images": len(p)}


@torch.no_grad()
def reconstruction_fid(autoencoder, batches: Iterable[Tensor], extract_features: Callable[[Tensor], Tensor],
                       frechet_distance: Callable[[Tensor, Tensor], float]) -> float:
    """rFID: the Frechet distance between features of the images and of their reconstructions.

    The feature extractor (images in [-1, 1] -> (B, D) features, e.g. Inception pool features) and the
    distance (two (N, D) feature sets -> a number) come from the evaluation module (latentdiff.eval); this
    function only pairs real and reconstructed images, so rFID and FID are computed the same way.
    """
    real, fake = [], []
    for images in batches:
        real.append(extract_features(images).double())
        fake.append(extract_features(reconstruct(autoencoder, images)).double())
    if not real:
        raise ValueError("reconstruction_fid got no images")
    return float(frechet_distance(torch.cat(real), torch.cat(fake)))
