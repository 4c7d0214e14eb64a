"""Denoiser training throughput (images/s): cached latents vs encoding every batch; cached text embeddings vs a
frozen text encoder in the loop. Side by side in one run, modes interleaved round by round.

Part 1, latents: the same U-Net training step fed (a) from the latent cache (``LatentCache.sample``: a fresh
posterior sample from the cached mean and std) and (b) by encoding every batch through the autoencoder
under ``no_grad`` and sampling its posterior -- the way diffusers' ``train_text_to_image.py`` trains
(``vae.encode(pixel_values).latent_dist.sample() * scaling_factor``). Both start from images already
decoded in memory, so (b) is not charged for JPEG decoding or resizing, which would widen the gap.

Part 2, text (``--text``): the demo's 32 px model with MiniLM as a frozen text encoder, (c) encoding every
batch's captions, (d) ``PretrainedTextEncoder`` with its per-prompt memo warm (every caption seen
before: later epochs), (e) embeddings read from the cache (``cached_text``); (f) the built-in hashed
encoder (trained jointly, 128-d) for reference -- the pair the demo compared (0.44 vs 0.81 it/s).

Weights are random: speed does not depend on what they learned.

    python benchmarks/train_throughput_cache.py [--sizes 32 64 | --sizes] [--batch 64] [--steps 6] [--rounds 3] [--text]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

import torch

from latentdiff.components import DenoiserSpec, build_denoiser
from latentdiff.conditioning.text import HashedTextEncoder, PretrainedTextEncoder, TextEncoderConfig
from latentdiff.data.buckets import batch_indices
from latentdiff.data.cache import LatentCache, build_cache
from latentdiff.data.shapes import ShapesDataset
from latentdiff.diffusion.losses import denoising_loss, make_sigma_sampler
from latentdiff.models.autoencoder import PRESETS as AE_PRESETS
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.unet import PRESETS as UNET_PRESETS

AUTOENCODER_FOR_SIZE = {32: "shapes-demo", 64: "shapes-f4c4"}  # the demo's and the 64 px presets


class Setup:
    """A random autoencoder, a latent cache of ``n`` shapes images, the images in memory, a U-Net + optimizer."""

    def __init__(self, size: int, n: int, text_encoder, tmp: str):
        torch.manual_seed(0)
        self.ae = AutoencoderKL(AE_PRESETS[AUTOENCODER_FOR_SIZE[size]]).eval().requires_grad_(False)
        data = ShapesDataset(n, size=size, seed=0)
        frozen = text_encoder if isinstance(text_encoder, PretrainedTextEncoder) else None
        self.cache = LatentCache(build_cache(self.ae, data, f"{tmp}/cache{size}", batch_size=64, quiet=True,
                                             text_encoder=frozen))
        self.images = torch.stack([data[i]["image"] for i in range(n)])  # (n, 3, size, size) in [-1, 1]
        self.text_encoder = text_encoder
        unet = dataclasses.replace(UNET_PRESETS["shapes-tiny"], in_channels=self.ae.latent_channels,
                                   out_channels=self.ae.latent_channels, context_dim=text_encoder.dim,
                                   vector_dim=text_encoder.dim)
        self.denoiser = build_denoiser(DenoiserSpec(unet=unet))
        trained = list(self.denoiser.network.parameters())
        if isinstance(text_encoder, HashedTextEncoder):
            trained += list(text_encoder.parameters())
        self.opt = torch.optim.AdamW(trained, lr=1e-4)
        self.sigmas = make_sigma_sampler("discrete", self.denoiser.parameterization)
        self.gen = torch.Generator().manual_seed(0)

    def step(self, step: int, batch: int, latents: str, text: str) -> None:
        """One full training step: batch -> latents -> text Cond -> loss -> backward -> AdamW."""
        idx = batch_indices(step, batch, len(self.cache), 0)
        if latents == "cache":
            raw, captions = self.cache.sample(idx, self.gen)
        else:
            with torch.no_grad():
                raw = self.ae.encode_posterior(self.images[idx]).sample(self.gen)
            captions = [self.cache.captions[i] for i in idx.tolist()]
        x0 = self.ae.normalize(raw)
        drop = torch.rand(len(idx), generator=self.gen) < 0.1
        if text == "cache":
            cond = self.cache.text_cond(idx, drop)
        else:
            if text == "encode" and isinstance(self.text_encoder, PretrainedTextEncoder):
                self.text_encoder._cache.clear()  # no memo: every caption through the transformer
            cond = self.text_encoder(["" if d else c for c, d in zip(captions, drop.tolist())])
        loss = denoising_loss(self.denoiser, x0, self.sigmas(len(idx), generator=self.gen), cond,
                              generator=self.gen).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def timed(setup: Setup, modes: dict[str, tuple[str, str]], batch: int, steps: int, rounds: int,
          clock=time.process_time) -> dict[str, float]:
    """Median images per second of ``clock`` for each mode; the modes take turns, round by round.

    The default clock is this process's CPU time: on a machine shared with other jobs, wall time
    measures the neighbours as much as the code; with one torch thread, CPU time is the work done.
    """
    rates: dict[str, list[float]] = {m: [] for m in modes}
    step = 0
    for name, (latents, text) in modes.items():  # warm-up: allocator, oneDNN primitives, text memo
        setup.step(step, batch, latents, "memo" if text == "memo" else text)
        step += 1
    for _ in range(rounds):
        for name, (latents, text) in modes.items():
            if text == "memo":  # every caption seen once (a later epoch); untimed
                for start in range(0, len(setup.cache), 256):
                    setup.text_encoder(setup.cache.captions[start: start + 256] + [""])
            t = clock()
            for _ in range(steps):
                setup.step(step, batch, latents, text)
                step += 1
            rates[name].append(steps * batch / (clock() - t))
    return {m: statistics.median(r) for m, r in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[32, 64], choices=sorted(AUTOENCODER_FOR_SIZE),
                    help="image sizes for part 1 (none: skip it)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=1024, help="shapes images cached")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--text", action="store_true", help="also part 2: MiniLM in the loop vs cached embeddings")
    ap.add_argument("--wall", action="store_true", help="time by the wall clock instead of this process's CPU time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps per mode, median of rounds; images per "
          f"{'wall' if args.wall else 'CPU'} second", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        if args.sizes:
            print("| image size | autoencoder | cached latents (img/s) | encode every batch (img/s) | speed-up |")
            print("|---|---|---|---|---|")
        for size in args.sizes:
            setup = Setup(size, args.images, HashedTextEncoder(TextEncoderConfig(dim=128, num_layers=1)), tmp)
            r = timed(setup, {"cache": ("cache", "encode"), "encode": ("encode", "encode")}, args.batch,
                      args.steps, args.rounds, clock)
            print(f"| {size} px | {AUTOENCODER_FOR_SIZE[size]} | {r['cache']:.1f} | {r['encode']:.1f} | "
                  f"{r['cache'] / r['encode']:.2f}x |", flush=True)
        if args.text:
            minilm = PretrainedTextEncoder(TextEncoderConfig(kind="pretrained", path="minilm", max_length=32))
            setup = Setup(32, args.images, minilm, tmp)
            r = timed(setup, {"encode": ("cache", "encode"), "memo": ("cache", "memo"), "cache": ("cache", "cache")},
                      args.batch, args.steps, args.rounds, clock)
            hashed = Setup(32, args.images, HashedTextEncoder(TextEncoderConfig(dim=128, num_layers=1)), tmp)
            h = timed(hashed, {"hashed": ("cache", "encode")}, args.batch, args.steps, args.rounds, clock)["hashed"]
            print("\n| text encoder (32 px, cached latents) | img/s | steps/s | vs cached embeddings |")
            print("|---|---|---|---|")
            rows = [("MiniLM, every batch encoded", r["encode"]), ("MiniLM, per-prompt memo warm", r["memo"]),
                    ("MiniLM, cached embeddings", r["cache"]), ("hashed (built in, 128-d, trained)", h)]
            for name, rate in rows:
                print(f"| {name} | {rate:.1f} | {rate / args.batch:.2f} | {rate / r['cache']:.2f}x |")


if __name__ == "__main__":
    main()
