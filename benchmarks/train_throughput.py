"""Denoiser training throughput (images/s) with 1 and 2 processes under torchrun (DDP, gloo), via the dry run.

Each configuration runs ``latentdiff train --dry-run`` (a few timed steps at the configured global batch;
the first step is not timed) on a cache of shapes latents encoded by an untrained demo autoencoder (speed
does not depend on what the weights learned). The global batch is the same in every row, so the rows
train the same thing; "threads" is OMP_NUM_THREADS per process.

    python benchmarks/train_throughput.py [--batch 64] [--steps 6] [--model shapes-tiny] [--image-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def make_cache(root: Path, image_size: int, n: int) -> Path:
    from latentdiff.components import save_autoencoder
    from latentdiff.data.cache import build_cache
    from latentdiff.data.shapes import ShapesDataset
    from latentdiff.models.autoencoder import PRESETS, AutoencoderKL

    torch.manual_seed(0)
    ae = AutoencoderKL(PRESETS["shapes-demo"])
    save_autoencoder(root / "ae", ae)
    return build_cache(ae, ShapesDataset(n, size=image_size, seed=0), root / "cache",
                       source={"autoencoder": str(root / "ae")}, quiet=True)


def dry_run(cache: Path, out: Path, procs: int, threads: int, args) -> dict:
    train = ["train", "--preset", "shapes-demo", "--cache", str(cache), "--out", str(out), "--dry-run",
             "--set", f"batch_size={args.batch}", "--set", f"dry_run_steps={args.steps}",
             "--set", f"model={args.model}"]
    if procs == 1:
        cmd = [sys.executable, "-m", "latentdiff.cli", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "latentdiff.cli", *train]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64, help="global batch (latents per step)")
    p.add_argument("--steps", type=int, default=6, help="dry-run steps per configuration (first not timed)")
    p.add_argument("--model", default="shapes-tiny", help="U-Net preset")
    p.add_argument("--image-size", type=int, default=32, help="pixels (latents are 1/4 of this)")
    args = p.parse_args()
    rows = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp), args.image_size, 256)
        results = [(procs, threads, dry_run(cache, Path(tmp) / "run", procs, threads, args)) for procs, threads in rows]
    base = results[0][2]["images_per_s"]
    print(f"denoiser {args.model}, latents {args.image_size // 4}x{args.image_size // 4}x4, global batch {args.batch}, "
          f"{args.steps - 1} timed steps; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| processes | threads each | step time (s) | images/s | vs 1 process, 1 thread |")
    print("|---|---|---|---|---|")
    for procs, threads, r in results:
        print(f"| {procs} | {threads} | {r['step_time_s']:.3f} | {r['images_per_s']:.1f} | "
              f"{r['images_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
