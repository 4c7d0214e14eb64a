"""Does a LoRA teach a model a colour word it never saw, and leave the rest alone?

    python benchmarks/lora_orange.py LORA [--model default] [--color orange] [--prompts 128] [--threads 1]
                                     [--round-trip-only] [--weight 1] [--skip-base]

Scores the model without and with the LoRA (at ``--weight``, default 1) on two prompt sets, with one standard error: prompts whose
first object has the new colour (``shapes.extra_color_prompts``, judged with the extended palette
``shapes.ALL_COLORS``), and the held-out prompts without it (``shapes.heldout_prompts``, judged as always). The
model's own generation settings, seeds 0.. per prompt set. Prints one markdown row per (model, prompt set), after
the ceiling the autoencoder sets: its round trip (encode, decode) of both sets' rendered scenes, judged alike,
without and with the LoRA (whose decoder adapters, when the file has them, raise the new colour's ceiling).
``--skip-base``: the LoRA's rows only (the base rows do not depend on the file).
"""

from __future__ import annotations

import argparse
import time

import torch

from latentdiff.data.judge import score
from latentdiff.data.shapes import ALL_COLORS, extra_color_prompts, heldout_prompts
from latentdiff.eval.judging import render_prompts, score_prompts, stderr
from latentdiff.images import to_uint8
from latentdiff.pipeline import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lora")
    ap.add_argument("--model", default="default")
    ap.add_argument("--color", default="orange")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-trip-only", action="store_true", help="the autoencoder rows alone (no generation)")
    ap.add_argument("--weight", type=float, default=1.0, help="the LoRA's strength (Pipeline.load_lora's weight)")
    ap.add_argument("--skip-base", action="store_true", help="only the rows with the LoRA")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model)
    sets = {f"{args.color} (new word)": (extra_color_prompts(args.prompts, color=args.color), ALL_COLORS),
            "heldout (without it)": (heldout_prompts(args.prompts), None)}
    keys = ("color", "shape", "size", "position", "all_correct")
    print(f"model {args.model}, LoRA {args.lora} (weight {args.weight:g}), {args.prompts} prompts per set, the model's "
          "generation settings\n")
    labels = ("base + LoRA",) if args.skip_base else ("base", "base + LoRA")
    print("| model | prompts | " + " | ".join(keys) + " | s / image |\n|" + "---|" * (len(keys) + 3))
    for label in labels:
        lora = pipe.load_lora(args.lora, args.weight) if label != "base" else None
        for name, (prompts, colors) in sets.items():
            print(f"| autoencoder round trip, {label} | {name}, rendered scenes | "
                  + " | ".join(round_trip(pipe, prompts, colors, keys)) + " | |", flush=True)
        if lora is not None:
            pipe.unload_loras()
    for label in () if args.round_trip_only else labels:
        lora = pipe.load_lora(args.lora, args.weight) if label != "base" else None
        for name, (prompts, colors) in sets.items():
            t = time.perf_counter()
            scores, _ = score_prompts(pipe, prompts, steps=None, sampler=None, guidance=None, seed=0, batch=64,
                                      colors=colors)
            seconds = (time.perf_counter() - t) / len(prompts)
            print(f"| {label} | {name} | " + " | ".join(cells(scores, keys, len(prompts))) + f" | {seconds:.3f} |",
                  flush=True)
        if lora is not None:
            pipe.unload_loras()


def cells(scores: dict, keys: tuple[str, ...], n: int) -> list[str]:
    return [f"{scores[k]:.3f} +- {stderr(scores[k], n):.3f}" for k in keys]


def round_trip(pipe, prompts, colors, keys: tuple[str, ...]) -> list[str]:
    """The judge's scores of the prompts' scenes rendered, encoded and decoded by the pipeline's autoencoder."""
    with torch.no_grad():
        images = render_prompts(prompts, pipe.default_size)
        trip = to_uint8(pipe.autoencoder.decode(pipe.autoencoder.encode(images)))
    return cells(score(list(trip), [s for _, s in prompts], colors), keys, len(prompts))


if __name__ == "__main__":
    main()
