"""Generation on a CPU, side by side: diffusers' U-Net, ours in torch (fp32, bf16, DeepCache), ours in OpenVINO
(fp32 and bf16 hints, int8 weights), token merging; an SD-1.5-shaped random-weight U-Net and the bundled default model.

    python benchmarks/cpu_backends.py [--preset sd15] [--size 256] [--steps 10] [--guidance 5] [--threads 2]
        [--sd-steps N] [--cache-interval 3] [--tome 0.5] [--judge 128] [--skip-sd] [--skip-default] [--rows ROW ...]

Every row runs in its own process (peak RSS is that process's ``ru_maxrss``: weights, conversion and activations).
The sampler is always ours (DPM++ 2M on the model's grid, CFG as one batch of 2); only the network changes.
"diffusers" rows run ``UNet2DConditionModel`` built from SD 1.5's config (random weights, seeded) behind our
Denoiser; our rows load those same weights. bf16 torch rows cast the weights to bf16 and store convolutions
channels-last (the fast CPU layout). "ovdiffusers" rows are OpenVINO as a user without us would run it:
``openvino.convert_model`` on diffusers' U-Net itself, compiled with the precision hint. OpenVINO rows convert our
U-Net (``backends/openvino.py``, a fresh cache folder, so the first call's conversion + compilation is reported
apart from the timing). The SD-shaped model has
no autoencoder: its "max diff" column is the largest latent difference to the fp32 torch row (latents have unit
scale); for the default model it is the largest pixel difference (of 255) to the fp32 torch image.

Also printed: FLOPs per denoiser step (``torch.utils.flop_counter.FlopCounterMode`` on our U-Net at batch 2), the
machine's matmul peak (the best of a few 4096^2 matmuls in fp32 and bf16) and each row's achieved fraction of it.
``--judge N``: the judge's held-out suite (N prompts, cfg 4) on the default model for the torch fp32 row and the
rows that change the numbers (bf16, int8, DeepCache), with one standard error.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SD_ROWS = ("diffusers-fp32", "diffusers-bf16", "torch-fp32", "torch-bf16", "torch-bf16-deepcache", "torch-bf16-tome",
           "ovdiffusers-fp32", "ovdiffusers-bf16", "openvino-fp32", "openvino-bf16", "openvino-bf16-int8")
OPENVINO_ROWS = ("openvino", "ovdiffusers")  # rows whose network takes fp32 inputs (the hint sets the precision)
DEFAULT_ROWS = ("torch-fp32", "torch-bf16", "torch-fp32-deepcache", "torch-fp32-tome", "openvino-fp32", "openvino-bf16",
                "openvino-bf16-int8")
DIFFUSERS_CONFIGS = {  # SD 1.5's U-Net; sd15-small: its layout at a fifth of the width (for a quick check)
    "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8},
    "sd15-small": {"block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 192, "attention_head_dim": 8},
}


def our_config(preset: str):
    """Our UNetConfig of the diffusers config (built on the meta device: no weights)."""
    import diffusers

    from latentdiff.interop.diffusers_folder import unet_config_from_diffusers

    with torch.device("meta"):
        return unet_config_from_diffusers(dict(diffusers.UNet2DConditionModel(**DIFFUSERS_CONFIGS[preset]).config))


def matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 4) -> float:
    """FLOP/s of the best of ``repeats`` n x n matmuls."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_flops(config, latent: int, tokens: int = 77) -> int:
    """FLOPs of one call of our U-Net at batch 2 (CFG's two halves), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from latentdiff.models.unet import UNet
    from latentdiff.types import Cond

    with torch.device("meta"):
        net = UNet(config).eval()
        x, c = torch.randn(2, config.in_channels, latent, latent), torch.full((2,), 500.0)
        cond = Cond(context=torch.randn(2, tokens, config.context_dim))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, c, cond)
    return counter.get_total_flops()


def _sd_denoiser(row: str, preset: str, cache_interval: int, cache_dir: str, tome: float = 0.5):
    """The row's denoiser of the SD-1.5-shaped random-weight U-Net (Eps on SD's scaled-linear schedule)."""
    import diffusers

    from latentdiff.diffusion.denoiser import Denoiser
    from latentdiff.diffusion.parameterization import Eps
    from latentdiff.diffusion.schedules import alphas_cumprod, scaled_linear_betas
    from latentdiff.models.unet import StepCache, TokenMerging, UNet

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**DIFFUSERS_CONFIGS[preset]).eval()
    if row.startswith("ovdiffusers"):
        net = _OpenVINODiffusers(ref, "bf16" if "bf16" in row else "f32")
    elif row.startswith("diffusers"):
        net = _DiffusersNetwork(ref)
    else:
        with torch.device("meta"):
            net = UNet(our_config(preset)).eval()
        net.load_state_dict(ref.state_dict(), strict=True, assign=True)
        del ref
    if "bf16" in row and not row.startswith(OPENVINO_ROWS):
        net.to(torch.bfloat16).to(memory_format=torch.channels_last)
    if "deepcache" in row:
        net = StepCache(net, cache_interval)
    if "tome" in row:
        net = TokenMerging(net, tome)
    if row.startswith("openvino"):
        from latentdiff.backends.openvino import OpenVINONetwork

        net = OpenVINONetwork(net, precision="bf16" if "bf16" in row else "fp32", int8="int8" in row,
                              cache_dir=cache_dir)
    return Denoiser(net, Eps(alphas_cumprod(scaled_linear_betas())))


class _DiffusersNetwork(torch.nn.Module):
    """diffusers' U-Net as our network callable: (x, timestep, Cond) -> eps."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, c_noise, cond):
        return self.unet(x, c_noise, cond.context.to(x.dtype)).sample


class _OpenVINODiffusers(torch.nn.Module):
    """OpenVINO as a user without latentdiff would run it: ``openvino.convert_model`` on diffusers' own U-Net (with
    example inputs of the first call's shapes, so the graph is static), compiled for latency with the precision
    hint; no disk cache, no fp32 islands. Our sampler still drives it."""

    def __init__(self, unet, hint: str):
        super().__init__()
        self.unet, self.hint, self.compiled = unet, hint, None

    def forward(self, x, c_noise, cond):
        import openvino

        inputs = (x.float(), c_noise.float().reshape(x.shape[0]), cond.context.float())
        if self.compiled is None:
            model = openvino.convert_model(_SampleOnly(self.unet), example_input=inputs)
            self.compiled = openvino.Core().compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        return torch.from_numpy(self.compiled([t.numpy() for t in inputs])[0]).to(x.dtype)


class _SampleOnly(torch.nn.Module):
    """diffusers' U-Net returning the tensor, not its output dataclass (what convert_model traces)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, context, return_dict=False)[0]


def run_sd_row(args, row: str, out: Path) -> dict:
    from latentdiff.diffusion import guidance
    from latentdiff.diffusion.sampling import sample_dpmpp_2m
    from latentdiff.diffusion.schedules import make_sigmas
    from latentdiff.types import Cond

    t = time.perf_counter()
    denoiser = _sd_denoiser(row, args.preset, args.cache_interval, args.cache_dir, args.tome)
    build = time.perf_counter() - t
    latent = args.size // 8
    g = torch.Generator().manual_seed(0)
    width = DIFFUSERS_CONFIGS[args.preset]["cross_attention_dim"]
    dtype = torch.bfloat16 if "bf16" in row and not row.startswith(OPENVINO_ROWS) else torch.float32
    cond, uncond = (Cond(context=torch.randn(1, 77, width, generator=g).to(dtype)) for _ in range(2))
    steps = args.sd_steps or args.steps
    sigmas = make_sigmas("trailing", steps, denoiser.parameterization)
    noise = torch.randn(1, 4, latent, latent, generator=g)
    guided = guidance.cfg(denoiser, args.guidance, uncond)
    with torch.no_grad():
        first = _timed(lambda: guided(noise * sigmas[0], sigmas[0].expand(1), cond))  # warm-up (OpenVINO: converts)
        if "deepcache" in row:  # a fresh cache for the timed run
            denoiser.network.calls, denoiser.network.deep = 0, None
        t = time.perf_counter()
        z = sample_dpmpp_2m(guided, noise * sigmas[0], sigmas, cond)
        loop = time.perf_counter() - t
    torch.save(z.float(), out)
    return {"build_s": build, "first_call_s": first, "per_step_s": loop / steps, "per_image_s": loop}


def run_default_row(args, row: str, out: Path) -> dict:
    import numpy as np

    from latentdiff.pipeline import load

    t = time.perf_counter()
    pipe = load()
    if row.startswith("openvino"):
        pipe = pipe.to_backend("openvino", precision="bf16" if "bf16" in row else "fp32", int8="int8" in row,
                               cache_dir=args.cache_dir)
    elif "bf16" in row:
        pipe.precision = "bf16"
    build = time.perf_counter() - t
    options = {"cache_interval": args.cache_interval} if "deepcache" in row else {}
    options.update({"tome": args.tome} if "tome" in row else {})
    prompts = ["a large red circle on the left", "a small blue square at the top"]
    first = _timed(lambda: pipe.generate(prompts[0], steps=args.steps, guidance=args.guidance, seed=0, **options))
    times, one_step = [], []
    for _ in range(3):
        times.append(_timed(lambda: pipe.generate(prompts[1], steps=args.steps, guidance=args.guidance, seed=1,
                                                  **options)))
        one_step.append(_timed(lambda: pipe.generate(prompts[1], steps=1, guidance=args.guidance, seed=1, **options)))
    images = pipe.generate(prompts, steps=args.steps, guidance=args.guidance, seed=2, output="np", **options)
    np.save(out, images)
    per_image, fixed1 = min(times), min(one_step)
    per_step = (per_image - fixed1) / max(args.steps - 1, 1)
    result = {"build_s": build, "first_call_s": first, "per_step_s": per_step, "per_image_s": per_image,
              "fixed_s": per_image - args.steps * per_step}
    if args.judge and row in ("torch-fp32", "torch-bf16", "torch-fp32-deepcache", "torch-fp32-tome", "openvino-bf16",
                              "openvino-bf16-int8"):
        from latentdiff.eval.judging import judge_suites

        scores = judge_suites(pipe, args.judge, suites=("heldout",), steps=args.steps, guidance=4.0, **options)
        result["judge_all"] = scores["heldout"]["all_correct"]
    return result


def child(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = (run_sd_row if args.model == "sd" else run_default_row)(args, args.row, out)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def run_rows(args, model: str, rows, work: Path) -> dict:
    results = {}
    for row in rows:
        out = work / f"{model}-{row}.{'pt' if model == 'sd' else 'npy'}"
        cmd = [sys.executable, __file__, "--child", row, "--model", model, "--out", str(out),
               "--cache-dir", str(work / "cache"), *args.passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{model} {row} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[row] = {**json.loads(line[7:]), "file": out}
        print(f"  {model} {row}: {results[row]}", file=sys.stderr, flush=True)
    return results


def max_diff(model: str, a: Path, b: Path) -> str:
    import numpy as np

    if model == "sd":
        return f"{(torch.load(a) - torch.load(b)).abs().max().item():.3f} (latent)"
    return f"{int(np.abs(np.load(a).astype(int) - np.load(b).astype(int)).max())}/255"


def table(model: str, results: dict, flops: int | None, peaks: dict) -> None:
    base = results.get("torch-fp32")
    ref = results.get("diffusers-bf16")
    judge = any("judge_all" in r for r in results.values())
    head = "| row | s / step | s / image | first call s | peak RSS GiB | max diff to torch fp32 |"
    head += " x diffusers bf16 |" if model == "sd" else " fixed s / image |"
    head += " % of matmul peak |" if flops else ""
    head += " judge all-correct |" if judge else ""
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for row, r in results.items():
        cells = [row, f"{r['per_step_s']:.3f}", f"{r['per_image_s']:.2f}", f"{r['first_call_s']:.1f}",
                 f"{r['peak_rss_gib']:.2f}", max_diff(model, r["file"], base["file"]) if base else "-"]
        if model == "sd":
            cells.append(f"{ref['per_step_s'] / r['per_step_s']:.2f}" if ref else "-")
        else:
            cells.append(f"{r['fixed_s']:.3f}")
        if flops:
            peak = peaks["bf16" if "bf16" in row else "fp32"]
            cells.append(f"{100 * flops / r['per_step_s'] / peak:.0f}%")
        if judge:
            cells.append(f"{r['judge_all']:.3f}" if "judge_all" in r else "")
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd15", choices=sorted(DIFFUSERS_CONFIGS))
    ap.add_argument("--size", type=int, default=256, help="SD-shaped model: image side (512: slow)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sd-steps", type=int, default=0, help="SD-shaped model: steps, if not --steps (it is slow)")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-interval", type=int, default=3, help="DeepCache rows: the whole U-Net every N steps")
    ap.add_argument("--tome", type=float, default=0.5, help="token merging rows: the ratio")
    ap.add_argument("--judge", type=int, default=0, help="default model: judge the held-out suite on N prompts")
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--rows", nargs="*", help="only these rows (names as in the tables)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.row = args.child
        return child(args)
    args.passthrough = ["--preset", args.preset, "--sd-steps", str(args.sd_steps), "--size", str(args.size), "--steps", str(args.steps), "--guidance", str(args.guidance),
                        "--threads", str(args.threads), "--cache-interval", str(args.cache_interval), "--tome", str(args.tome),
                        "--judge", str(args.judge)]
    torch.set_num_threads(args.threads)
    import openvino

    from latentdiff.backends.openvino import cpu_precision
    bf16 = cpu_precision("auto") == "bf16"
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"torch {torch.__version__}, OpenVINO {openvino.get_version()}, {args.threads} threads, CPU bf16: "
          f"{'yes' if bf16 else 'no'}; matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
          f"{peaks['bf16'] / 1e9:.0f} GFLOP/s; DPM++ 2M {args.steps} steps, CFG {args.guidance:g} (one batch of 2)\n")
    keep = (lambda rows: [r for r in rows if r in args.rows]) if args.rows else \
        (lambda rows: [r for r in rows if bf16 or "bf16" not in r])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_sd:
            flops = step_flops(our_config(args.preset), args.size // 8)
            print(f"{args.preset} U-Net (random weights), {args.size} px ({args.size // 8}^2 latents): "
                  f"{flops / 1e9:.0f} GFLOPs per step (batch 2)")
            table("sd", run_rows(args, "sd", keep(SD_ROWS), work), flops, peaks)
        if not args.skip_default:
            print("\nbundled default model (latentdiff/default/model)")
            table("default", run_rows(args, "default", keep(DEFAULT_ROWS), work), None, peaks)


if __name__ == "__main__":
    main()
