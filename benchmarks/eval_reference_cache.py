"""Reference statistics from a folder: the first run (decode, resize, extract, write) against a cached run.

Writes ``--n`` random-content PNGs of mixed sizes into a temporary folder and computes their reference
features with latentdiff.eval.folders.reference_features three times: cold, cached, and after one file
changed (the entry is invalidated and recomputed). The extractor is the shapes feature net's architecture
with random weights (the cost, not the features, is measured), or the FID Inception with ``--inception``
(random weights too: no file is needed to time it).

    PYTHONPATH=. python benchmarks/eval_reference_cache.py --n 500 --size 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.eval.folders import reference_features
from latentdiff.eval.shapes_net import ShapesNet, ShapesNetConfig


class RandomShapesNet:
    """The shapes feature net's architecture (64-d) with random weights."""

    name, dim = "bench-shapes-net", 64

    def __init__(self):
        torch.manual_seed(0)
        self.net = ShapesNet(ShapesNetConfig()).eval()

    @torch.no_grad()
    def __call__(self, images):
        return self.net.features(images)


class RandomInception:
    """The FID Inception-v3 (2048-d, resize to 299) with random weights."""

    name, dim = "bench-inception", 2048

    def __init__(self):
        from latentdiff.eval.inception import FIDInceptionV3

        torch.manual_seed(0)
        self.net = FIDInceptionV3().eval()

    @torch.no_grad()
    def __call__(self, images):
        return self.net(images)


def write_folder(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    sizes = [(128, 96), (96, 128), (160, 160), (200, 120)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="reference images")
    parser.add_argument("--size", type=int, default=64, help="evaluation size (pixels)")
    parser.add_argument("--inception", action="store_true", help="time the FID Inception instead")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    extractor = RandomInception() if args.inception else RandomShapesNet()
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "ref", Path(tmp) / "cache"
        folder.mkdir()
        write_folder(folder, args.n)
        rows = []
        for label in ("cold (decode + resize + extract + write)", "cached (fingerprint + read)", "one file changed"):
            if label == "one file changed":
                Image.new("RGB", (128, 96), (255, 0, 0)).save(folder / "00000.png")
            t0 = time.perf_counter()
            feats, hit = reference_features(extractor, folder, args.size, cache, batch_size=64, log=lambda m: None)
            rows.append((label, time.perf_counter() - t0, hit, feats.shape))
    print(f"{args.n} reference PNGs (96x128 .. 200x120) at {args.size} px, extractor {extractor.name} "
          f"({extractor.dim}-d), {torch.get_num_threads()} thread(s)\n")
    print("| run | seconds | cache hit | features |\n|---|---|---|---|")
    for label, seconds, hit, shape in rows:
        print(f"| {label} | {seconds:.3f} | {hit} | {shape[0]} x {shape[1]} |")
    print(f"\ncached / cold: {rows[1][1] / rows[0][1]:.4f} ({rows[0][1] / rows[1][1]:.0f}x faster)")


if __name__ == "__main__":
    main()
