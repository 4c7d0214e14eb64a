"""U-Net, DiT and MMDiT trained on the shapes latents for the same CPU time, then judged.

Each training preset first measures its CPU seconds per step (process time, all threads: fair on a shared
machine where wall time depends on the neighbours; the difference of a 1-step and a (1 + ``--calib-steps``)-step
run), then trains from scratch for ``--cpu-seconds / (seconds per step)`` steps. The model then generates the demo's held-out and
training-distribution prompts (DPM++ 2M on each model's own grid: trailing for the eps U-Net, the flow grid
for the flow DiT and MMDiT; CFG) and the rule-based judge scores them.

    latentdiff train-vae --preset shapes-demo --out outputs/bb/vae
    latentdiff cache --preset shapes-demo --set autoencoder=outputs/bb/vae/autoencoder --set num_images=4000 \
        --out outputs/bb/cache
    python benchmarks/backbones_judge.py --cache outputs/bb/cache --out outputs/bb/judge --cpu-seconds 100

On a shared machine the presets can run as three processes side by side (``--presets shapes-demo --threads 1``,
and so on): each is timed in its own CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from latentdiff.config import build_config
from latentdiff.data.shapes import heldout_prompts, train_prompts
from latentdiff.eval.judging import score_prompts
from latentdiff.pipeline import load
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser

ATTRS = ("color", "shape", "size", "position", "count", "all_correct")


def train_for(preset: str, overrides: dict, steps: int, out: Path) -> tuple[Path, float, dict]:
    """Train ``steps`` steps; returns the model folder, the CPU seconds it took and the config."""
    cfg = build_config(TrainConfig, TRAIN_PRESETS, preset, None, {
        **overrides, "out": str(out), "steps": steps, "warmup_steps": min(50, max(1, steps // 10)),
        "sample_every": 0, "save_every": steps, "quiet": True})
    t0 = time.process_time()
    folder = train_denoiser(cfg)
    return folder, time.process_time() - t0, cfg


def judge(folder: Path, cfg: TrainConfig, steps: int, cpu: float, wall: float, args) -> dict:
    """Generate the held-out and training-distribution prompts with the model and score them."""
    pipe = load(folder)
    n_params = sum(p.numel() for p in pipe.denoiser.network.parameters())
    settings = {"steps": args.steps, "sampler": "dpmpp_2m", "schedule": args.schedule, "guidance": args.guidance,
                "seed": 0}
    with torch.no_grad():
        held, _ = score_prompts(pipe, heldout_prompts(args.eval_prompts, seed=0), **settings)
        seen, _ = score_prompts(pipe, train_prompts(args.eval_prompts, seed=0), **settings)
    return {"model": cfg.model, "parameterization": cfg.parameterization, "params_M": n_params / 1e6,
            "steps": steps, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "schedule": args.schedule,
            "heldout": {k: held[k] for k in ATTRS}, "train_prompts": {k: seen[k] for k in ATTRS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="latent cache (from `latentdiff cache`)")
    ap.add_argument("--out", required=True, help="folder for the runs and report.json")
    ap.add_argument("--presets", nargs="+", default=["shapes-demo", "shapes-demo-dit", "shapes-demo-mmdit"])
    ap.add_argument("--cpu-seconds", type=float, default=100.0, help="training budget per model, CPU seconds")
    ap.add_argument("--calib-steps", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--schedule", default="default",
                    help="sigma grid for DPM++ 2M; 'default': each model's own (trailing for eps, flow for flow)")
    ap.add_argument("--eval-only", action="store_true", help="judge the models already trained under --out")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="training-config override for every preset, e.g. --set lr=0.0005 (repeatable)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    rows = {}
    for preset in args.presets:
        overrides = {"cache": args.cache, **{k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}}
        if args.eval_only:
            folder, cpu, wall = out / preset / "model", float("nan"), float("nan")
            steps = int((out / preset / "checkpoints" / "latest").read_text().split("_")[1])
            cfg = build_config(TrainConfig, TRAIN_PRESETS, preset, None, overrides)
            rows[preset] = judge(folder, cfg, steps, cpu, wall, args)
            print(json.dumps({preset: rows[preset]}), flush=True)
            continue
        # CPU seconds per step: the difference of a 1-step and a (1 + calib-steps)-step run (start-up cancels).
        _, one, _ = train_for(preset, overrides, 1, out / f"{preset}-calib1")
        _, more, _ = train_for(preset, overrides, 1 + args.calib_steps, out / f"{preset}-calib")
        per_step = max(more - one, 1e-3) / args.calib_steps
        steps = max(1, int(args.cpu_seconds / per_step))
        t0 = time.time()
        folder, cpu, cfg = train_for(preset, overrides, steps, out / preset)
        wall = time.time() - t0
        rows[preset] = judge(folder, cfg, steps, cpu, wall, args)
        print(json.dumps({preset: rows[preset]}), flush=True)
    (out / f"report-{'-'.join(args.presets)}.json").write_text(json.dumps(rows, indent=1))

    print(f"\nbudget {args.cpu_seconds:.0f} CPU s per model, {torch.get_num_threads()} threads; "
          f"{args.eval_prompts} prompts each; "
          f"{args.steps} steps DPM++ 2M, CFG {args.guidance}")
    print("| preset (network, prediction) | params | steps | CPU s | wall s | prompts | "
          + " | ".join(ATTRS) + " |")
    print("|---" * (6 + len(ATTRS)) + "|")
    for preset, r in rows.items():
        for split in ("heldout", "train_prompts"):
            scores = " | ".join(f"{r[split][k]:.3f}" for k in ATTRS)
            print(f"| {preset} ({r['model']}, {r['parameterization']}) | {r['params_M']:.2f}M | {r['steps']} | "
                  f"{r['cpu_s']} | {r['wall_s']} | {split} | {scores} |")


if __name__ == "__main__":
    main()
