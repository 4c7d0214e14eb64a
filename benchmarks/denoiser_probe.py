"""Two cheap diagnostics of a denoiser on the shapes latents: does it use the text, and does a fresh DiT start clean.

``--models``: for each trained model folder, the x0 mean squared error at fixed noise levels on fixed latents of
a cache (the last ``--items`` of it, one posterior draw and one noise draw from seed 123), with the captions'
Cond and with the empty prompt's. It is the same number for every parameterization (eps, v, flow, ...), so
the U-Net, DiT and MMDiT compare directly; the gap between the two columns is what the text is worth to the
model. A model that has not learned to read the text has the same error either way.

``--init``: a fresh text DiT (``dit-shapes`` at the shapes-demo widths), each block's change to the tokens,
and the cosine between the final LayerNorm's input tokens and the embedded input (1.0: the blocks passed
the input through untouched, as adaLN-Zero intends). With ``--xavier-cross-out`` the cross-attention output
layers get Xavier weights, as before they were zero-initialized (BENCHMARKS.md, issue 5).

    python benchmarks/denoiser_probe.py --init
    python benchmarks/denoiser_probe.py --init --xavier-cross-out
    python benchmarks/denoiser_probe.py --cache CACHE --models RUN_A/model RUN_B/model
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F

from latentdiff.conditioning.text import HashedTextEncoder, TextEncoderConfig
from latentdiff.data.cache import LatentCache
from latentdiff.models.dit import PRESETS, DiT
from latentdiff.pipeline import load

SIGMAS = (0.1, 0.5, 1.0, 2.0, 5.0, 14.0)


@torch.no_grad()
def text_gap(folder: str, cache: LatentCache, items: int) -> dict[float, tuple[float, float]]:
    """sigma -> (x0 MSE with the captions, x0 MSE with the empty prompt) on the cache's last ``items`` latents."""
    pipe = load(folder)
    g = torch.Generator().manual_seed(123)
    idx = torch.arange(len(cache) - min(items, len(cache)), len(cache))
    raw, captions = cache.sample(idx, g)
    x0 = pipe.autoencoder.normalize(raw)  # (N, C, h, w)
    noise = torch.randn(x0.shape, generator=g)
    cond, empty = pipe.text_encoder(captions), pipe.text_encoder([""] * len(captions))
    out = {}
    for s in SIGMAS:
        sigma = torch.full((len(captions),), s)
        errors = [((pipe.denoiser(x0 + s * noise, sigma, c) - x0) ** 2).mean().item() for c in (cond, empty)]
        out[s] = (errors[0], errors[1])
    return out


@torch.no_grad()
def fresh_dit(xavier_cross_out: bool, seed: int = 0) -> None:
    """Print each fresh block's change to the tokens and the final cosine with the embedded input."""
    torch.manual_seed(seed)
    text = HashedTextEncoder(TextEncoderConfig(dim=128, num_layers=1))  # the shapes-demo text encoder
    cond = text(["a large red circle on the left", "a small blue square at the top"] * 4)
    net = DiT(replace(PRESETS["dit-shapes"], in_channels=8, context_dim=128, vector_dim=128))
    if xavier_cross_out:
        for block in net.transformer_blocks:
            torch.nn.init.xavier_uniform_(block.attn2.to_out[0].weight)
    x = torch.randn(8, 8, 8, 8)  # (B, C, H, W): what the network sees at high noise
    tokens = embedded = net.pos_embed(x)  # (B, N, D)
    c = net.embed(torch.full((8,), 500.0), cond, 8)
    print(f"cross-attention output layer: {'Xavier (before)' if xavier_cross_out else 'zero (now)'}; "
          f"embedded token norm {embedded.norm(dim=-1).mean():.2f}")
    print("| block | change of the tokens (mean norm) |")
    print("|---|---|")
    for i, block in enumerate(net.transformer_blocks):
        new = block(tokens, c, cond.context, cond.context_mask)
        print(f"| {i} | {(new - tokens).norm(dim=-1).mean():.2f} |")
        tokens = new
    cos = F.cosine_similarity(net.norm_out(tokens), net.norm_out(embedded), dim=-1).mean()
    print(f"cosine(final tokens, embedded input) = {cos:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", action="store_true", help="the fresh-DiT diagnostic")
    ap.add_argument("--xavier-cross-out", action="store_true", help="with --init: the old cross-attention init")
    ap.add_argument("--cache", help="latent cache the models were trained on (its autoencoder's latents)")
    ap.add_argument("--models", nargs="*", default=[], help="model folders (a training run's OUT/model)")
    ap.add_argument("--items", type=int, default=256, help="latents from the end of the cache")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.init:
        fresh_dit(args.xavier_cross_out)
    if args.models:
        if not args.cache:
            ap.error("--models needs --cache")
        cache = LatentCache(args.cache)
        print("x0 MSE, captions / empty prompt, per sigma")
        print("| model | " + " | ".join(f"sigma {s}" for s in SIGMAS) + " |")
        print("|---" * (1 + len(SIGMAS)) + "|")
        for folder in args.models:
            gap = text_gap(folder, cache, args.items)
            print(f"| {folder} | " + " | ".join(f"{c:.4f} / {u:.4f}" for c, u in gap.values()) + " |")


if __name__ == "__main__":
    main()
