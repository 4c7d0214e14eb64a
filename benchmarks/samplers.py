"""Sampler benchmark: accuracy on an exact oracle at fixed NFE, and per-step overhead outside the network.

    python benchmarks/samplers.py [--n 4000] [--quick]

1. Distance to the data distribution (sliced Wasserstein-2, lower is better) of samples from a 2-D
   Gaussian mixture whose denoiser E[x0 | x, sigma] is exact, at 5, 10, 20, 50 and 200 network
   function evaluations (NFE), on the Karras grid (sigma 0.002 .. 80). The "floor" row is the distance
   between two independent data samples of the same size: nothing can do better.
   LCM is left out: it needs a consistency model, not the posterior mean.
2. Sampler overhead per step: wall time of the sampler's own tensor work per step with a free
   "network" (returns a precomputed tensor), on latent-sized tensors.
"""

from __future__ import annotations

import argparse
import time

import torch

from latentdiff.diffusion import sampling, schedules

F64 = torch.float64
NFES = [5, 10, 20, 50, 200]
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
TWO_EVALS_PER_STEP = {"heun", "dpmpp_2s_ancestral"}  # minus one on the last step to sigma = 0


class GaussianMixture:
    """2-D isotropic Gaussian mixture with its exact denoiser."""

    mu = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]], dtype=F64)
    var = torch.tensor([0.225, 0.1, 0.4], dtype=F64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)

    def sample(self, n, generator):
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return self.mu[k] + self.var[k, None].sqrt() * torch.randn(n, 2, generator=generator, dtype=F64)

    def __call__(self, x, sigma, cond=None):
        var_t = self.var[None] + sigma.to(F64)[:, None] ** 2  # (B, K)
        logp = self.w.log()[None] - var_t.log() - ((x[:, None] - self.mu[None]) ** 2).sum(-1) / (2 * var_t)
        post = self.mu[None] + (self.var[None] / var_t)[..., None] * (x[:, None] - self.mu[None])  # (B, K, 2)
        return (logp.softmax(-1)[..., None] * post).sum(1)


def sliced_w2(a, b, n_proj=128):
    theta = torch.randn(2, n_proj, generator=torch.Generator().manual_seed(123), dtype=F64)
    theta = theta / theta.norm(dim=0)
    return ((a @ theta).sort(0).values - (b @ theta).sort(0).values).pow(2).mean().sqrt().item()


def steps_for(name, nfe):
    return max(1, (nfe + 1) // 2) if name in TWO_EVALS_PER_STEP else nfe


def accuracy_table(n):
    gm = GaussianMixture()
    data = gm.sample(n, torch.Generator().manual_seed(1))
    floor = sliced_w2(data, gm.sample(n, torch.Generator().manual_seed(2)))
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    print(f"\nDistance to the data (sliced W2, {n} samples; floor = two data samples: {floor:.3f})\n")
    print(f"{'sampler':<20}" + "".join(f"{'NFE ' + str(k):>10}" for k in NFES))
    for name in SAMPLERS:
        fn, _ = sampling.get_sampler(name)
        row = []
        for nfe in NFES:
            sigmas = schedules.karras_sigmas(steps_for(name, nfe), 0.002, 80.0)
            x = fn(gm, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(7))
            row.append(sliced_w2(x, data))
        print(f"{name:<20}" + "".join(f"{e:>10.3f}" for e in row))


def overhead_table(shapes, steps, repeats):
    print(
        f"\nSampler overhead per step (ms, best of 3, free network, float32, {torch.get_num_threads()} threads)\n"
    )
    print(f"{'sampler':<20}" + "".join(f"{label:>22}" for label, _ in shapes))
    rows = {name: [] for name in SAMPLERS + ["lcm"]}
    for _, shape in shapes:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        out = noise * 0.5

        def free(x, sigma, cond=None, out=out):
            return out

        sigmas = schedules.karras_sigmas(steps, 0.03, 14.6)
        for name, times in rows.items():
            fn, _ = sampling.get_sampler(name)
            fn(free, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(1))  # warm-up
            best = float("inf")
            for _ in range(repeats):  # best of `repeats`: the machine may be shared
                t0 = time.perf_counter()
                fn(free, noise * sigmas[0], sigmas, generator=torch.Generator().manual_seed(1))
                best = min(best, time.perf_counter() - t0)
            times.append(best / steps * 1e3)
    for name, ms in rows.items():
        print(f"{name:<20}" + "".join(f"{m:>22.3f}" for m in ms))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="samples for the distribution distance")
    ap.add_argument("--quick", action="store_true", help="skip the 1024x1024 latent in the overhead table")
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    accuracy_table(args.n)
    shapes = [("4x64x64 (512px SD)", (1, 4, 64, 64)), ("16x128x128 (1024px)", (1, 16, 128, 128))]
    if not args.quick:
        shapes.append(("4x1024x1024", (1, 4, 1024, 1024)))
    overhead_table(shapes, steps=10, repeats=3)


if __name__ == "__main__":
    main()
