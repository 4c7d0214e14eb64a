"""Autoencoders on real photographs: train on random crops of scikit-image's bundled images, measure held-out
PSNR / SSIM on whole photographs (astronaut, coffee, chelsea) as training goes on.

    PYTHONPATH=$PWD python benchmarks/vae_natural.py --out /tmp/vae_natural --stages 50 100 150

Each preset trains with a constant learning rate and is evaluated after each stage (the run resumes exactly
from its checkpoint), so the table shows how the numbers grow with training time. One CPU thread: on a
shared 2-core machine more threads are far slower (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latentdiff.components import load_autoencoder
from latentdiff.data.natural import skimage_heldout
from latentdiff.eval.reconstruction import reconstruct, reconstruction_metrics
from latentdiff.images import make_grid, save_png, to_pil
from latentdiff.train.vae import VAETrainConfig, train_vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/vae_natural")
    ap.add_argument("--presets", nargs="+", default=["small-f8c4", "small-f8c16", "small-f4c4"])
    ap.add_argument("--stages", nargs="+", type=int, default=[50, 100, 150], help="cumulative steps to evaluate at")
    ap.add_argument("--crop", type=int, default=32, help="training crop size in pixels")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--crops", type=int, default=2000, help="training crops (fixed set, drawn once)")
    ap.add_argument("--resume", action="store_true", help="continue existing runs in --out (first stage too)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heldout = skimage_heldout(multiple=16, max_side=256)
    rows = []
    for preset in args.presets:
        run = Path(args.out) / preset
        spent, cpu = 0.0, 0.0
        for i, steps in enumerate(args.stages):
            cfg = VAETrainConfig(out=str(run), data="skimage", num_images=args.crops, image_size=args.crop, model=preset,
                                 steps=steps, batch_size=args.batch_size, lr=args.lr, lr_schedule="constant",
                                 warmup_steps=10, stats_images=256, log_every=10, sample_every=0, save_every=10**9,
                                 resume=i > 0 or args.resume, quiet=True)
            t0, c0 = time.time(), time.process_time()
            folder = train_vae(cfg)
            spent, cpu = spent + time.time() - t0, cpu + time.process_time() - c0
            ae = load_autoencoder(folder)
            with torch.no_grad():
                m = reconstruction_metrics(ae, heldout)
            rows.append({"preset": preset, "steps": steps, "train_s": round(spent, 1), "cpu_s": round(cpu, 1), **m})
            print(json.dumps(rows[-1]), flush=True)
        with torch.no_grad():
            pairs = [im for x in heldout for im in to_pil(torch.cat([x, reconstruct(ae, x)]))]
        save_png(make_grid(pairs, ncols=2), run / "heldout_grid.png")
    print("\n| preset | steps | wall time (s) | CPU time (s) | held-out PSNR (dB) | held-out SSIM |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['steps']} | {r['train_s']} | {r['cpu_s']} | {r['psnr']:.2f} | {r['ssim']:.3f} |")


if __name__ == "__main__":
    main()
