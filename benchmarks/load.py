"""Load time and peak memory for an SD-1.5-shaped checkpoint: our two routes beside diffusers' own.

Builds (once, into --dir) a Stable-Diffusion-1.5-shaped pipeline with random weights stored in fp16
(U-Net 860M, VAE 84M, CLIP-L 123M parameters) as a diffusers folder, and the same weights as one
original-layout single file written with our inverse key maps. Each load runs in a fresh process;
peak memory is that process's peak RSS (VmHWM) minus its RSS after the imports. Then both of our
routes are loaded in one process and every parameter compared.

    python benchmarks/load.py [--dir /tmp/latentdiff_load_bench] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # MiB
route, path, tok = sys.argv[1], sys.argv[2], sys.argv[3]
import diffusers, transformers, latentdiff
from latentdiff.interop import open_model
base = rss("VmRSS")
t = time.perf_counter()
if route == "ours-fp32":
    m = open_model(path, tokenizer=tok)
elif route == "ours-stored":
    m = open_model(path, tokenizer=tok, dtype=None)
elif route == "diffusers-folder":
    m = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
elif route == "diffusers-single":
    m = diffusers.StableDiffusionPipeline.from_single_file(path, config=tok, local_files_only=True,
                                                           safety_checker=None)
seconds = time.perf_counter() - t
print(json.dumps({{"seconds": seconds, "peak_mib": rss("VmHWM") - base, "base_mib": base}}))
"""


def prepare(folder: Path) -> tuple[Path, Path]:
    """The diffusers folder and the single file (built once)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from interop_tiny import sd15_pipeline

    from latentdiff.interop import open_model
    from latentdiff.interop.single_file import to_original_state
    from latentdiff.io import write_safetensors

    pipe, single = folder / "sd15", folder / "sd15.safetensors"
    if not (pipe / "model_index.json").is_file():
        t = time.perf_counter()
        sd15_pipeline(pipe)
        print(f"built diffusers folder in {time.perf_counter() - t:.0f} s", flush=True)
    if not single.is_file():
        write_safetensors(single, to_original_state(open_model(pipe, dtype=None)))
    return pipe, single


def run(route: str, path: Path, tok: Path) -> dict:
    code = CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, route, str(path), str(tok)], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_identical(pipe: Path, single: Path) -> str:
    import torch

    from latentdiff.interop import open_model

    a = open_model(pipe, dtype=None)
    b = open_model(single, tokenizer=pipe, dtype=None)
    pa = {**a.denoiser.network.state_dict(), **{f"vae.{k}": v for k, v in a.autoencoder.state_dict().items()},
          **a.text_encoder.canonical_state_dict()}
    pb = {**b.denoiser.network.state_dict(), **{f"vae.{k}": v for k, v in b.autoencoder.state_dict().items()},
          **b.text_encoder.canonical_state_dict()}
    same = pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    n = sum(v.numel() for v in pa.values())
    return f"{len(pa)} tensors, {n / 1e6:.0f}M parameters: {'identical' if same else 'DIFFERENT'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/latentdiff_load_bench", help="where the checkpoints are built (kept)")
    ap.add_argument("--repeats", type=int, default=1, help="loads per route (the best is reported)")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    pipe, single = prepare(folder)
    size = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20 for p in (pipe,)}
    print(f"diffusers folder {size[pipe.name]:.0f} MiB, single file {single.stat().st_size / 2**20:.0f} MiB (fp16)")

    rows = [("latentdiff.load: diffusers folder -> fp32", "ours-fp32", pipe),
            ("latentdiff.load: single file -> fp32", "ours-fp32", single),
            ("latentdiff.load: diffusers folder, stored fp16", "ours-stored", pipe),
            ("latentdiff.load: single file, stored fp16", "ours-stored", single),
            ("diffusers from_pretrained (fp32)", "diffusers-folder", pipe),
            ("diffusers from_single_file (fp32)", "diffusers-single", single)]
    print("\n| route | load s | peak RSS above imports MiB |\n|---|---|---|")
    for name, route, path in rows:
        results = [run(route, path, pipe) for _ in range(args.repeats)]
        ok = [r for r in results if "error" not in r]
        if not ok:
            print(f"| {name} | failed: {results[0]['error']} | |")
            continue
        best = min(ok, key=lambda r: r["seconds"])
        print(f"| {name} | {best['seconds']:.1f} | {max(r['peak_mib'] for r in ok):.0f} |", flush=True)
    print("\nboth routes:", check_identical(pipe, single))


if __name__ == "__main__":
    main()
