"""``latentdiff sds PROMPT --out DIR``: score distillation of a prompt into a voxel asset (thin glue)."""

from __future__ import annotations

from latentdiff.config import add_config_args, add_options, config_from_args
from latentdiff.io import end_progress, progress_line
from latentdiff.threed.sds import (
    METHODS,
    SPACES,
    SDSConfig,
    check_text_to_image,
    distill,
    evaluate,
    plan_prompt,
)

_FLAGS = {
    "out": {"help": "folder to write (replaced whole): turntable.gif, views.png, voxels.npz, mesh.obj, report.json",
            "flags": ("-o", "--out"), "metavar": "DIR"},
    "model": {"help": "2D text-to-image model folder ('default': the bundled shapes model)", "metavar": "PATH"},
    "steps": {"help": "optimizer steps", "metavar": "N"},
    "guidance": {"help": "classifier-free guidance of the distillation", "metavar": "SCALE"},
    "method": {"help": "sds (DreamFusion) or csd (classifier score distillation: the guidance term only)",
               "choices": METHODS},
    "space": {"help": "image (RGB voxels; the update's target decoded), encoder (RGB voxels; the update through the "
                      "encoder) or latent (voxels of latent features, rendered straight into latent space)",
              "choices": SPACES},
    "seed": "random seed (views, noise levels, noise)",
}


def add_command(sub) -> None:
    """Add ``sds`` to the CLI's subcommands."""
    p = sub.add_parser("sds", help="distill a prompt into a 3D voxel asset (score distillation sampling)",
                       description="Score distillation sampling (DreamFusion) from a 2D text-to-image model into a "
                                   "voxel grid: writes a turntable GIF, the judged views, the voxels (.npz), a "
                                   "marching-cubes mesh (.obj, with scikit-image) and report.json. The bundled "
                                   "model knows the shapes vocabulary: 'a large red circle in the middle on a black "
                                   "background' ('ball', 'cube', 'cone' are read as circle, square, triangle).")
    p.add_argument("prompt", help="what to build: one object")
    add_config_args(p, {}, SDSConfig)
    add_options(p, SDSConfig, _FLAGS, show_defaults=True)
    p.set_defaults(func=cmd_sds)


def cmd_sds(args) -> None:
    from latentdiff.pipeline import load
    from latentdiff.threed.asset import save_asset

    cfg = config_from_args(SDSConfig, {}, args)
    if not cfg.out:
        raise ValueError("no output folder: latentdiff sds \"a large red circle in the middle\" --out DIR")
    pipe = load(cfg.model)
    check_text_to_image(pipe)
    plan = plan_prompt(pipe, args.prompt)  # refused here, before any work, if the model cannot read it
    for note in plan.notes:
        print(f"note: {note}")
    print(f"distilling {plan.model_prompt!r}: {cfg.steps} steps, {cfg.views} views each, {cfg.resolution}^3 voxels")
    result = distill(pipe, plan, cfg, callback=lambda step, r: progress_line(
        f"step {step + 1}/{cfg.steps}  t_max {r['t_max']:.2f}  opacity {r['opacity']:.3f}  cpu {r['cpu_s']:.0f} s"))
    end_progress()
    evaluation, views = evaluate(result, pipe.default_size, cfg.eval_views, cfg.extent)
    report = save_asset(cfg.out, result, cfg, evaluation, views)
    judged = (f"; views judged right {evaluation['right']:.2f} (colour and shape), consistency "
              f"{evaluation['consistency']:.2f}" if "right" in evaluation else "")
    print(f"wrote {cfg.out} in {report['cpu_minutes']:.2f} CPU minutes{judged}")
