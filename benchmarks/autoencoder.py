"""Autoencoder inference: encode/decode time and peak memory at 256, 512, 1024 px, tiled and untiled, fp32 and
bf16 (bf16 only up to --bf16-max-size); how far tiles drift from the untiled result for 1 or 4 passes of
whole-image GroupNorm statistics (or exact ones); the preview decoder's speed-up and PSNR.

    PYTHONPATH=$PWD python benchmarks/autoencoder.py --autoencoder /tmp/ae_vn/small-f8c4/autoencoder
    PYTHONPATH=$PWD python benchmarks/autoencoder.py --sizes 256 512 --passes 4 --bf16-max-size 512 --timeout 300

bf16 runs the way the library does it (``runtime.autocast``: autocast with channels-last convolution
weights on the CPU; on a CPU without native bf16 that is ~7x slower than fp32, NCHW bf16 150x);
``--bf16-nchw`` times the old contiguous bf16 path instead (plain autocast), for comparison.

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

TILE = {"encode": {"tile": 256, "overlap": 64}, "decode": {"tile": 32, "overlap": 8}}  # pixels / latents at f=8


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
    from latentdiff.models.runtime import autocast
    from latentdiff.models.vae_inference import decode_with_fallback, tiled_decode, tiled_encode

    torch.set_num_threads(args.threads)
    ae = load_model(args)
    f, size, op, tiled, precision = ae.factor, spec["size"], spec["op"], spec["tiled"], spec["precision"]
    passes = spec.get("passes", 4)
    nchw = precision == "bf16" and args.bf16_nchw  # the old path: autocast alone, contiguous weights

    def run(n):
        if op == "encode":
            x = torch.rand(1, 3, n, n) * 2 - 1
            context = torch.autocast("cpu", dtype=torch.bfloat16) if nchw else autocast(precision, "cpu", ae)
            with torch.no_grad(), context:
                return tiled_encode(ae, x, **TILE["encode"], passes=passes) if tiled else ae.encode(x)
        z = torch.randn(1, ae.latent_channels, n // f, n // f)
        if nchw:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return tiled_decode(ae, z, **TILE["decode"], passes=passes) if tiled else ae.decode(z)
        if tiled:
            return tiled_decode(ae, z, **TILE["decode"], precision=precision, passes=passes)
        return decode_with_fallback(ae, z, precision)

    run(64)  # warm-up
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        run(size)
        seconds = time.perf_counter() - t0
    return {**spec, "seconds": seconds, "peak_mib": mem.peak / 2**20,
            "layout": "NCHW" if nchw or precision == "fp32" else "NHWC"}


def timings(args) -> list[dict]:
    rows = []
    untiled = [] if args.skip_untiled else [(False, None)]
    for op in args.ops:
        for size in args.sizes:
            for tiled, passes in untiled + [(True, p) for p in args.passes]:
                for precision in args.precisions:
                    if precision == "bf16" and size > args.bf16_max_size:
                        continue  # bf16 is several times slower than fp32 on a CPU without native bf16
                    spec = {"op": op, "size": size, "tiled": tiled, "precision": precision, "passes": passes}
                    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--threads", str(args.threads),
                           "--preset", args.preset] + (["--autoencoder", args.autoencoder] if args.autoencoder else []) \
                        + (["--bf16-nchw"] if args.bf16_nchw else [])
                    try:
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                             timeout=args.timeout or None).stdout
                        rows.append(json.loads(out.strip().splitlines()[-1]))
                    except subprocess.TimeoutExpired:  # reported as "> timeout", the op stopped
                        rows.append({**spec, "seconds": None, "peak_mib": None, "layout": "-"})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


@torch.no_grad()
def tile_quality(ae, args) -> dict:
    """Tiled against untiled on the astronaut photograph at each of --quality-sizes, for each number of
    whole-image GroupNorm passes in --passes (1 = each tile's own statistics, the old behaviour; 0 = exact)."""
    import torch.nn.functional as F

    from latentdiff.data.natural import load_skimage, to_tensor
    from latentdiff.eval.reconstruction import psnr
    from latentdiff.models.vae_inference import tiled_decode, tiled_encode

    out = {}
    for n in args.quality_sizes:
        x = F.interpolate(to_tensor(load_skimage("astronaut"))[None], size=(n, n), mode="bicubic").clamp(-1, 1)
        z = ae.encode(x)
        full = ae.decode(z)
        for passes in args.passes + ([0] if n <= args.exact_max_size else []):
            p = passes or None  # 0: exact statistics
            t0 = time.perf_counter()
            tiled = tiled_decode(ae, z, **TILE["decode"], passes=p)
            seconds = time.perf_counter() - t0
            zt = tiled_encode(ae, x, **TILE["encode"], passes=p)
            key = f"{n}px_passes_{passes or 'exact'}"
            out[f"{key}_decode_psnr_vs_untiled"] = float(psnr(tiled.clamp(-1, 1), full.clamp(-1, 1)))
            out[f"{key}_decode_max_abs_diff"] = float((tiled - full).abs().max())
            out[f"{key}_decode_s"] = seconds
            out[f"{key}_encode_latent_rel_err"] = float((zt - z).abs().mean() / z.abs().mean())
            out[f"{key}_encode_latent_max_abs_diff"] = float((zt - z).abs().max())
            print(json.dumps({k: v for k, v in out.items() if k.startswith(key)}), file=sys.stderr, flush=True)
    return out


@torch.no_grad()
def quality(args) -> dict:
    """Tiles against untiled (``tile_quality``), bf16 against fp32, and the preview decoder against the full one."""
    import torch.nn.functional as F

    from latentdiff.data import make_image_dataset
    from latentdiff.data.natural import load_skimage, skimage_heldout, to_tensor
    from latentdiff.eval.reconstruction import psnr, ssim
    from latentdiff.models.preview import PreviewConfig, flops
    from latentdiff.models.vae_inference import decode_with_fallback
    from latentdiff.train.latent_stats import image_batches
    from latentdiff.train.preview import distill_preview

    torch.set_num_threads(args.threads)
    ae = load_model(args)
    n = args.quality_size
    x = F.interpolate(to_tensor(load_skimage("astronaut"))[None], size=(n, n), mode="bicubic").clamp(-1, 1)
    out = tile_quality(ae, args)
    z = ae.encode(x)
    out["untiled_recon_psnr"] = float(psnr(ae.decode(z).clamp(-1, 1), x))
    zc = z[..., : 128 // ae.factor, : 128 // ae.factor]  # bf16 is very slow here: a 128 px corner
    out["bf16_decode_vs_fp32_psnr_128px"] = float(psnr(decode_with_fallback(ae, zc, "bf16").clamp(-1, 1),
                                                       ae.decode(zc).clamp(-1, 1)))
    print(json.dumps(out), file=sys.stderr, flush=True)
    if args.skip_preview:
        return out

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
                    help="largest size timed in bf16 (on CPUs without native bf16 it is several times slower)")
    ap.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--skip-untiled", action="store_true", help="time only the tiled rows")
    ap.add_argument("--bf16-nchw", action="store_true",
                    help="bf16 by plain autocast with contiguous weights (the path before channels-last)")
    ap.add_argument("--timeout", type=int, default=0, help="seconds after which an op is stopped (0: none)")
    ap.add_argument("--preview-steps", type=int, default=300)
    ap.add_argument("--quality-size", type=int, default=512, help="image size of the bf16 and recon checks")
    ap.add_argument("--quality-sizes", nargs="+", type=int, default=[256, 512, 1024],
                    help="image sizes of the tiled-vs-untiled comparison")
    ap.add_argument("--passes", nargs="+", type=int, default=[1, 4],
                    help="whole-image GroupNorm passes of the tiled rows (1: per-tile statistics)")
    ap.add_argument("--exact-max-size", type=int, default=512,
                    help="largest size where tiles also run with exact statistics (one pass per GroupNorm layer)")
    ap.add_argument("--skip-preview", action="store_true")
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
        print(f"\nautoencoder: {what}; {args.threads} thread(s); tiles: encode {TILE['encode']}, "
              f"decode {TILE['decode']} (latents)\n")
        print("| op | size | tiled (GroupNorm passes) | precision (layout) | time (s) | peak memory (MiB) |\n"
              "|---|---|---|---|---|---|")
        for r in rows:
            timed = r["seconds"] is not None
            seconds = f"{r['seconds']:.2f}" if timed else f"> {args.timeout} (stopped)"
            peak = f"{r['peak_mib']:.0f}" if timed else "-"
            print(f"| {r['op']} | {r['size']} | {r['passes'] if r['tiled'] else 'no'} | "
                  f"{r['precision']} ({r['layout']}) | {seconds} | {peak} |")
    if args.autoencoder:
        q = quality(args)
        print("\n| quality measure | value |\n|---|---|")
        for k, v in q.items():
            print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()
