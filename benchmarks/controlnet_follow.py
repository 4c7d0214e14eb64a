"""How well a layout (or depth / edges) ControlNet is followed on a shapes model, read by the rule-based judge.

    python benchmarks/controlnet_follow.py CONTROLNET [--model default] [--prompts 64] [--steps 20] [--scale 1.0]
        [--threads 2]

For held-out and training prompts of one object (``data.shapes.heldout_prompts`` / ``train_prompts``), the
ControlNet's kind of map is drawn from a scene (``data.control_maps``) and three things are generated per prompt:

- "prompt only": no ControlNet (the base model's own score);
- "prompt + map": the map of the prompt's own scene: the judge's scores against the scene, and the IoU of the
  generated object's pixels (those far from the background colour) with the map's silhouette;
- "unplaced prompt": the prompt without size and position ("a red circle on a black background"), no ControlNet:
  where the base model puts the object by itself (the judge reads against the scene: chance level for size and
  position);
- "unplaced + map": the same prompt with the scene's map: does the object land where the map puts it, at its size
  and with its shape;
- "map moves it": the map of another prompt's scene (its shape, size and place) with the full prompt: the judge
  reads against the MAP's shape, size and position and the PROMPT's colour and background; "prompt's place" is how
  often the object still sits where the prompt said instead (a conflict; lower is stronger control).

Prints one markdown row per (split, mode), each score +- one standard error, and seconds per image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentdiff.data.control_maps import control_map
from latentdiff.data.judge import score
from latentdiff.data.shapes import (
    BACKGROUNDS,
    Scene,
    ShapeObject,
    heldout_prompts,
    render,
    to_tensor,
    train_prompts,
    unplaced_caption,
)
from latentdiff.eval.judging import stderr
from latentdiff.pipeline import load

MODES = ("prompt only", "prompt + map", "unplaced prompt", "unplaced + map", "map moves it")


def _foreground(image: np.ndarray, background: str) -> np.ndarray:
    """Pixels far (> 80 in some channel) from the background colour: the generated objects."""
    return np.abs(image.astype(float) - np.asarray(BACKGROUNDS[background], float)).max(-1) > 80


def _moved(prompt: Scene, layout: Scene) -> Scene:
    """The prompt's colour and background with the layout's shape, size and place (one object each)."""
    (p,), (m,) = prompt.objects, layout.objects
    return Scene((ShapeObject(m.shape, p.color, m.size, m.position),), prompt.background)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("controlnet", help="ControlNet folder (train-controlnet's OUT/controlnet)")
    ap.add_argument("--model", default="default", help="base model folder (default: the bundled model)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scale", type=float, default=1.0, help="ControlNet scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, metavar="MODE",
                    help="the modes to run (default: all; names as in the table)")
    ap.add_argument("--splits", nargs="+", default=["held-out", "train"], choices=["held-out", "train"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    size = pipe.default_size
    net = pipe.add_controlnet(args.controlnet, scale=args.scale)
    kind = net.config.control_kind or "layout"
    controls = pipe.controlnets[:]
    use = pipe.settings(steps=args.steps)
    print(f"model {args.model}, ControlNet {args.controlnet} ({kind}, scale {args.scale:g}); {args.prompts} one-object "
          f"prompts per split; {use.sampler} {use.steps} steps, guidance {use.guidance:g}\n")
    keys = ("all_correct", "shape", "size", "position", "color")
    print("| split | mode | " + " | ".join(keys) + " | IoU with map | prompt's place | s / image |\n|"
          + "---|" * (len(keys) + 5))
    for split, make in (("held-out", heldout_prompts), ("train", train_prompts)):
        if split not in args.splits:
            continue
        prompts = make(args.prompts, seed=args.seed)
        n = len(prompts)
        scenes = [scene for _, scene in prompts]
        maps = [control_map(kind, to_tensor(render(s, size, seed=i)), s, i).permute(1, 2, 0).numpy()
                for i, s in enumerate(scenes)]
        others = [(i + 1) % n for i in range(n)]  # the map of the next prompt's scene
        for mode in args.modes:
            mapped = mode not in ("prompt only", "unplaced prompt")
            pipe.controlnets[:] = controls if mapped else []
            t = time.perf_counter()
            images = []
            for i, (caption, _) in enumerate(prompts):
                caption = unplaced_caption(scenes[i]) if mode.startswith("unplaced") else caption
                control = maps[others[i] if mode == "map moves it" else i] if mapped else None
                images.append(np.asarray(pipe.generate(caption, steps=use.steps, sampler=use.sampler,
                                                       guidance=use.guidance, seed=args.seed + i, control=control)[0]))
            seconds = (time.perf_counter() - t) / n
            targets = [_moved(scenes[i], scenes[others[i]]) for i in range(n)] if mode == "map moves it" else scenes
            s = score(images, targets)
            iou, kept = "", ""
            if mapped:
                silhouettes = [maps[others[i] if mode == "map moves it" else i].max(-1) > 0 for i in range(n)]
                fg = [_foreground(im, sc.background) for im, sc in zip(images, scenes)]
                ious = [(a & b).sum() / max((a | b).sum(), 1) for a, b in zip(fg, silhouettes)]
                iou = f"{np.mean(ious):.2f} +- {np.std(ious) / np.sqrt(n):.2f}"
            if mode == "map moves it":
                moved = [i for i in range(n) if scenes[i].objects[0].position != scenes[others[i]].objects[0].position]
                p = score([images[i] for i in moved], [scenes[i] for i in moved])["position"]
                kept = f"{p:.2f} +- {stderr(p, len(moved)):.2f} (n={len(moved)})"
            cells = " | ".join(f"{s[k]:.2f} +- {stderr(s[k], n):.2f}" for k in keys)
            print(f"| {split} | {mode} | {cells} | {iou} | {kept} | {seconds:.2f} |", flush=True)
    pipe.controlnets[:] = controls


if __name__ == "__main__":
    main()
