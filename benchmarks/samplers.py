"""Sampler benchmark: accuracy on an exact oracle at fixed NFE, and per-step overhead outside the network.

    python benchmarks/samplers.py accuracy [--grid karras|exponential] [--sigma-min S] [--sigma-max S] [--n 10000]
                                           [--samplers euler unipc ...]
    python benchmarks/samplers.py overhead [--sizes 64 1024] [--steps 10] [--repeats 5]

accuracy: distance to the data distribution of samples drawn with the exact denoiser E[x0 | x, sigma]
of a 2-D Gaussian mixture, at 5, 10, 20, 50, 200 and 1000 network function evaluations (NFE). The
distance is the sliced Wasserstein-2 distance between the samples and the *exact* mixture: along each
of 64 fixed directions the sorted projected samples are compared with the exact quantiles of the
projected (1-D Gaussian-mixture) distribution, so no second, noisy data sample enters the estimate.
Every sampler and every NFE starts from the same initial noise; stochastic samplers share one seed.
"floor" is the same distance for exact samples of the data (mean of 3 draws): the estimator's own
noise at this sample size. "conv" is the 1000-NFE distance; the last column is NFE 10 over it. Heun
and DPM++ 2S a use 2 evaluations per step (one on the last step): their NFE is the largest odd
number <= the column's. LCM is left out: it needs a consistency model, not the posterior mean.

overhead: wall time per sampler step spent outside the network, for one latent of 4 channels. The
network is free (returns a preallocated tensor) but wrapped in the real ``Denoiser`` with an
eps-parameterization, so the scalings are counted as overhead. The denominator is one forward pass
of a real U-Net with random weights at that size (weights do not change speed): the ``shapes-small``
preset at 64x64, and at 1024x1024 the ``shapes-tiny`` preset without attention (self-attention over a
million tokens does not fit on a CPU), so the 1024 fraction is an upper bound for any real model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from latentdiff.diffusion import sampling, schedules
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import Eps
from latentdiff.models.unet import PRESETS as UNET_PRESETS
from latentdiff.models.unet import UNet

F64 = torch.float64
NFES = [5, 10, 20, 50, 200, 1000]
SAMPLERS = [
    "euler",
    "heun",
    "ddim",
    "dpmpp_2m",
    "unipc",
    "dpmpp_3m_sde",
    "euler_ancestral",
    "ddpm",
    "dpmpp_2m_sde",
    "dpmpp_2s_ancestral",
]


# ---------------------------------------------------------------------------------------------
# accuracy on the analytic oracle


class GaussianMixture:
    """2-D isotropic Gaussian mixture with its exact denoiser and the exact quantiles of its projections."""

    mu = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]], dtype=F64)  # (K, 2)
    var = torch.tensor([0.225, 0.1, 0.4], dtype=F64)  # (K,)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)  # (K,)

    def sample(self, n, generator):
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return self.mu[k] + self.var[k, None].sqrt() * torch.randn(n, 2, generator=generator, dtype=F64)

    def __call__(self, x, sigma, cond=None):
        var_t = self.var[None] + sigma.to(F64)[:, None] ** 2  # (B, K)
        logp = self.w.log()[None] - var_t.log() - ((x[:, None] - self.mu[None]) ** 2).sum(-1) / (2 * var_t)
        post = self.mu[None] + (self.var[None] / var_t)[..., None] * (x[:, None] - self.mu[None])  # (B, K, 2)
        return (logp.softmax(-1)[..., None] * post).sum(1)

    def projected_quantiles(self, n: int, theta) -> torch.Tensor:
        """(n, P) exact quantiles at (i + 1/2) / n of the data projected on each unit column of theta (2, P)."""
        m = (self.mu @ theta)[:, None, :]  # (K, 1, P): projected means; the std stays sqrt(var)
        s = self.var.sqrt().view(-1, 1, 1) * math.sqrt(2)
        u = ((torch.arange(n, dtype=F64) + 0.5) / n)[:, None]  # (n, 1)
        lo = torch.full((n, theta.shape[1]), -30.0, dtype=F64)
        hi = -lo
        for _ in range(64):  # bisection on the mixture CDF: 60 / 2^64 is far below float64 resolution
            mid = (lo + hi) / 2
            cdf = (self.w.view(-1, 1, 1) * 0.5 * torch.erfc((m - mid[None]) / s)).sum(0)
            below = cdf < u
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2


class ExactSlicedW2:
    """Sliced W2 between a point cloud of fixed size n and the exact mixture (64 fixed directions)."""

    def __init__(self, gm: GaussianMixture, n: int, n_proj: int = 64):
        theta = torch.randn(2, n_proj, generator=torch.Generator().manual_seed(123), dtype=F64)
        self.theta = theta / theta.norm(dim=0)
        self.quantiles = gm.projected_quantiles(n, self.theta)

    def __call__(self, x) -> float:
        return ((x @ self.theta).sort(0).values - self.quantiles).pow(2).mean().sqrt().item()


def steps_for(name: str, nfe: int) -> int:
    """Sampler steps that use at most nfe evaluations."""
    per_step = sampling.evaluations_per_step(name)
    return max(1, (nfe + 1) // 2) if per_step == 2 else nfe


def accuracy_table(n: int, grid: str, sigma_min: float, sigma_max: float, samplers: list[str]) -> None:
    gm = GaussianMixture()
    dist = ExactSlicedW2(gm, n)
    floor = sum(dist(gm.sample(n, torch.Generator().manual_seed(s))) for s in (1, 2, 3)) / 3
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    make = {"karras": schedules.karras_sigmas, "exponential": schedules.exponential_sigmas}[grid]
    print(
        f"\nSliced W2 to the exact mixture, {n} samples, {grid} grid sigma {sigma_min:g}..{sigma_max:g}; "
        f"floor (exact data samples) {floor:.4f}\n"
    )
    print("| sampler | " + " | ".join(f"NFE {k}" if k < 1000 else "1000 (conv)" for k in NFES) + " | 10 / conv |")
    print("|---" * (len(NFES) + 2) + "|")
    best = None
    for name in samplers:
        fn, _ = sampling.get_sampler(name)
        row = []
        for nfe in NFES:
            sigmas = make(steps_for(name, nfe), sigma_min, sigma_max)
            x = fn(gm, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(7))
            row.append(dist(x))
        ratio = row[1] / row[-1]
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in row) + f" | {ratio:.2f} |")
        if best is None or row[1] < best[1]:
            best = (name, row[1], row[-1])
    name, d10, conv = best
    print(f"\nbest at NFE 10: {name} {d10:.4f}, {d10 / conv:.2f}x its converged {conv:.4f}")


# ---------------------------------------------------------------------------------------------
# overhead per step


def _best_time(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):  # best of `repeats`: the machine may be shared
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def unet_for(size: int) -> tuple[str, UNet]:
    """The real network that times one step at this latent size (see the module docstring)."""
    if size <= 128:
        name, cfg = "shapes-small", UNET_PRESETS["shapes-small"]
        cfg = dataclasses.replace(cfg, in_channels=4, out_channels=4, context_dim=None)
    else:
        name, cfg = "shapes-tiny, no attention", UNET_PRESETS["shapes-tiny"]
        cfg = dataclasses.replace(cfg, in_channels=4, out_channels=4, context_dim=None,
                                  attention_levels=(), mid_attention=False)
    torch.manual_seed(0)
    return name, UNet(cfg).eval()


def overhead_table(sizes: list[int], steps: int, repeats: int) -> None:
    ac = schedules.alphas_cumprod(schedules.scaled_linear_betas())
    sigmas = schedules.vp_sigmas(ac, steps, "trailing")
    print(f"\nSampler overhead per step, batch 1, 4 channels, float32, {torch.get_num_threads()} threads, "
          f"{steps} steps, best of {repeats}\n")
    results = {}
    t = torch.full((1,), 500.0)  # the U-Net's timestep input
    for size in sizes:
        shape = (1, 4, size, size)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        out = noise * 0.5

        def free(x_in, c_noise, cond, out=out):
            return out

        denoiser = Denoiser(free, Eps(ac))
        per_step = {}
        for name in SAMPLERS + ["lcm"]:
            fn, _ = sampling.get_sampler(name)

            def run(fn=fn, denoiser=denoiser, x=noise * sigmas[0]):
                fn(denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))

            evals = sampling.evaluations_per_step(name)
            per_step[name] = _best_time(run, repeats) / (steps * evals - (evals - 1))  # per evaluation
        net_name, unet = unet_for(size)
        with torch.no_grad():
            big = size > 128  # one pass of seconds: no warm-up, no repeat
            t_net = _best_time(lambda unet=unet, x=noise: unet(x, t), 1 if big else repeats, warmup=not big)
        results[size] = (net_name, t_net, per_step)
    print("| sampler | " + " | ".join(f"{s}x{s}: ms / step | % of U-Net" for s in sizes) + " |")
    print("|---" * (1 + 2 * len(sizes)) + "|")
    for name in SAMPLERS + ["lcm"]:
        cells = []
        for size in sizes:
            _, t_net, per_step = results[size]
            cells.append(f"{per_step[name] * 1e3:.2f} | {100 * per_step[name] / t_net:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for size in sizes:
        net_name, t_net, _ = results[size]
        print(f"U-Net step at {size}x{size}: {net_name}, {t_net * 1e3:.1f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    acc = sub.add_parser("accuracy", help="distance to the data on the Gaussian-mixture oracle")
    acc.add_argument("--n", type=int, default=10000, help="samples per sampler run")
    acc.add_argument("--grid", choices=["karras", "exponential"], default="karras",
                     help="karras: rho = 7 (EDM); exponential: uniform in log sigma = uniform in log-SNR")
    acc.add_argument("--sigma-min", type=float, default=0.002)
    acc.add_argument("--sigma-max", type=float, default=80.0)
    acc.add_argument("--samplers", nargs="+", default=SAMPLERS, choices=SAMPLERS, help="rows of the table")
    ovh = sub.add_parser("overhead", help="time per step outside the network, against one U-Net step")
    ovh.add_argument("--sizes", type=int, nargs="+", default=[64, 1024], help="latent sizes (4 channels)")
    ovh.add_argument("--steps", type=int, default=10)
    ovh.add_argument("--repeats", type=int, default=5)
    ovh.add_argument("--threads", type=int, default=1, help="torch threads, for the sampler and the U-Net alike")
    args = ap.parse_args()
    if args.what == "accuracy":
        torch.set_num_threads(1)  # 2-D points: threads cost more than they give, more so on a shared machine
        accuracy_table(args.n, args.grid, args.sigma_min, args.sigma_max, args.samplers)
    else:
        torch.set_num_threads(args.threads)
        overhead_table(args.sizes, args.steps, args.repeats)


if __name__ == "__main__":
    main()
