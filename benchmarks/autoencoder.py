"""Autoencoder inference: encode/decode time and peak memory at 256, 512, 1024 px, tiled and untiled, fp32 and
bf16 (bf16 only up to --bf16-max-size: on a CPU without native bf16 it is 20-80x slower than fp32); how far
tiles drift from the untiled result; the preview decoder's speed-up and PSNR.

    PYTHONPATH=$PWD python benchmarks/autoencoder.py --autoencoder /tmp/ae_vn/small-f8c4/autoencoder

Time and memory do not depend on the weights, so without ``--autoencoder`` a randomly initialized ``--preset``
is timed and the quality sections are skipped. Every timing runs in a fresh subprocess (one op, after one
warm-up at 64 px) and peak memory is the largest resident-set size sampled every 2 ms during the op, minus
the resident size just before it. One thread by default (on a shared 2-core machine more threads are slower).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import torch

TILE = {"encode": {"tile": 256, "overlap": 32}, "decode": {"tile": 32, "overlap": 4}}  # pixels / latents at f=8


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Samples the resident set size in a thread while the block runs; ``peak`` is the largest rise."""

    def __enter__(self):
        self.base = self.peak_abs = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak_abs = max(self.peak_abs, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak_abs = max(self.peak_abs, rss_bytes())
        self.peak = self.peak_abs - self.base


def load_model(args):
    from latentdiff.components import load_autoencoder
    from latentdiff.models.autoencoder import PRESETS, AutoencoderKL

    if args.autoencoder:
        return load_autoencoder(args.autoencoder)
    torch.manual_seed(0)
    return AutoencoderKL(PRESETS[args.preset]).eval()


def worker(spec: dict, args) -> dict:
    """One timed op in this (fresh) process."""
    from latentdiff.models.vae_inference import decode_with_fallback, tiled_decode, tiled_encode

    torch.set_num_threads(args.threads)
    ae = load_model(args)
    f, size, op, tiled, precision = ae.factor, spec["size"], spec["op"], spec["tiled"], spec["precision"]
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def run(n):
        if op == "encode":
            x = torch.rand(1, 3, n, n) * 2 - 1
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                return tiled_encode(ae, x, **TILE["encode"]) if tiled else ae.encode(x)
        z = torch.randn(1, ae.latent_channels, n // f, n // f)
        if tiled:
            return tiled_decode(ae, z, **TILE["decode"], precision=precision)
        return decode_with_fallback(ae, z, precision)

    run(64)  # warm-up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        run(size)
        seconds = time.perf_counter() - t0
    return {**spec, "seconds": seconds, "peak_mib": mem.peak / 2**20}


def timings(args) -> list[dict]:
    rows = []
    for op in ("encode", "decode"):
        for size in args.sizes:
            for tiled in (False, True):
                for precision in ("fp32", "bf16"):
                    if precision == "bf16" and size > args.bf16_max_size:
                        continue  # bf16 convolutions are 20-80x slower than fp32 on an AVX2-only CPU
                    spec = {"op": op, "size": size, "tiled": tiled, "precision": precision}
                    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--threads", str(args.threads),
                           "--preset", args.preset] + (["--autoencoder", args.autoencoder] if args.autoencoder else [])
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    rows.append(json.loads(out.strip().splitlines()[-1]))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


@torch.no_grad()
def quality(args) -> dict:
    """Tiled vs untiled on a real photograph (astronaut at --quality-size px); preview vs full decoder."""
    import torch.nn.functional as F

    from latentdiff.data import make_image_dataset
    from latentdiff.data.natural import load_skimage, skimage_heldout, to_tensor
    from latentdiff.eval.reconstruction import psnr, ssim
    from latentdiff.models.preview import PreviewConfig, distill_preview, flops
    from latentdiff.models.vae_inference import decode_with_fallback, tiled_decode, tiled_encode
    from latentdiff.train.latent_stats import image_batches

    torch.set_num_threads(args.threads)
    ae = load_model(args)
    n = args.quality_size
    x = F.interpolate(to_tensor(load_skimage("astronaut"))[None], size=(n, n), mode="bicubic").clamp(-1, 1)
    z = ae.encode(x)
    full = ae.decode(z).clamp(-1, 1)
    tiled = tiled_decode(ae, z, **TILE["decode"]).clamp(-1, 1)
    out = {"tiled_decode_vs_untiled_psnr": float(psnr(tiled, full)),
           "tiled_decode_max_abs_diff": float((tiled - full).abs().max()),
           "tiled_encode_latent_rel_err": float((tiled_encode(ae, x, **TILE["encode"]) - z).abs().mean() / z.abs().mean()),
           "untiled_recon_psnr": float(psnr(full, x))}
    zc = z[..., : 128 // ae.factor, : 128 // ae.factor]  # bf16 is very slow here: a 128 px corner
    out["bf16_decode_vs_fp32_psnr_128px"] = float(psnr(decode_with_fallback(ae, zc, "bf16").clamp(-1, 1),
                                                       ae.decode(zc).clamp(-1, 1)))
    print(json.dumps(out), file=sys.stderr, flush=True)

    # Preview decoder: distilled on training crops, measured on the held-out photographs.
    crops = make_image_dataset("skimage", args.preview_images, 64, seed=1)
    config = PreviewConfig(ae.latent_channels, ae.factor, channels=32, min_channels=8)
    t0 = time.perf_counter()
    preview = distill_preview(ae, image_batches(crops, args.preview_images, 32), steps=args.preview_steps,
                              batch_size=16, lr=3e-3, config=config)
    out["preview_distill_s"] = time.perf_counter() - t0
    p_psnr, p_ssim, p_img = [], [], []
    for img in skimage_heldout(multiple=16, max_side=256):
        zh = ae.encode(img)
        teacher = ae.decode(zh).clamp(-1, 1)
        student = preview(zh)
        p_psnr.append(float(psnr(student, teacher)))
        p_ssim.append(float(ssim(student, teacher)))
        p_img.append(float(psnr(student, img)))
    out.update(preview_vs_full_psnr=sum(p_psnr) / len(p_psnr), preview_vs_full_ssim=sum(p_ssim) / len(p_ssim),
               preview_vs_image_psnr=sum(p_img) / len(p_img))
    z256 = torch.randn(1, ae.latent_channels, 256 // ae.factor, 256 // ae.factor)
    out["flops_ratio"] = flops(ae.decode, z256) / flops(preview, z256)
    for name, fn in (("full", ae.decode), ("preview", preview)):
        fn(z256)
        t0 = time.perf_counter()
        for _ in range(2):
            fn(z256)
        out[f"{name}_decode_256_s"] = (time.perf_counter() - t0) / 2
    out["preview_speedup"] = out["full_decode_256_s"] / out["preview_decode_256_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--autoencoder", default="", help="trained autoencoder folder (enables the quality sections)")
    ap.add_argument("--preset", default="small-f8c4", help="architecture timed when no --autoencoder is given")
    ap.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512, 1024])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16-max-size", type=int, default=128,
                    help="largest size timed in bf16 (on CPUs without native bf16 it is very slow)")
    ap.add_argument("--preview-steps", type=int, default=300)
    ap.add_argument("--quality-size", type=int, default=512, help="image size of the tiled-vs-untiled comparison")
    ap.add_argument("--preview-images", type=int, default=256)
    ap.add_argument("--skip-timings", action="store_true")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args)))
        return
    what = args.autoencoder or f"{args.preset} (random weights)"
    if not args.skip_timings:
        rows = timings(args)
        print(f"\nautoencoder: {what}; {args.threads} thread(s); tiles: encode 256 px / overlap 32, "
              f"decode 32 latents / overlap 4\n")
        print("| op | size | tiled | precision | time (s) | peak memory (MiB) |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['op']} | {r['size']} | {'yes' if r['tiled'] else 'no'} | {r['precision']} | "
                  f"{r['seconds']:.2f} | {r['peak_mib']:.0f} |")
    if args.autoencoder:
        q = quality(args)
        print("\n| quality measure | value |\n|---|---|")
        for k, v in q.items():
            print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()
