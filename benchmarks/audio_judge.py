"""An audio model on held-out tones prompts, read by the tones judge: pitch, note count, both, instrument.

    python benchmarks/audio_judge.py MODEL_DIR [--prompts 60] [--split heldout] [--steps 20] [--guidance 4]
                                     [--seed 0] [--batch 12] [--ceilings]

Prompts are the captions of ``--prompts`` clips drawn from a fixed seed of the split (``heldout``: (pitch,
instrument) pairs never in training; ``train``: the in-distribution reference), one clip each; the clips are
generated (``Pipeline.generate_audio``: mel spectrograms decoded by Griffin-Lim) and judged (``judge_tone``). Prints
one markdown row: pitch, note count, pitch and count (the issue's goal), instrument and all three, each with one
standard error. ``--ceilings`` adds the rows a perfect model would reach: the same clips rendered, their mel
spectrograms through Griffin-Lim, and through the model's autoencoder (encode, decode) and Griffin-Lim.
"""

from __future__ import annotations

import argparse
import time

import torch

from latentdiff.audio import mel_to_wave
from latentdiff.data.tones import ToneSet, score_tones
from latentdiff.pipeline import load

COLUMNS = ("pitch", "count", "pitch_and_count", "timbre", "all")


def row(name: str, scores: dict, extra: str = "") -> str:
    cells = " | ".join(f"{scores[f'{c}_accuracy']:.3f} +- {scores[f'{c}_se']:.3f}" for c in COLUMNS)
    return f"| {name} | {scores['n']} | {cells} | {extra} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an audio model folder (latentdiff train-audio)")
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--split", default="heldout", choices=("heldout", "train"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--ceilings", action="store_true", help="also judge rendered clips and their round trips")
    args = ap.parse_args()
    pipe = load(args.model)
    spec = pipe.index.audio
    if spec is None:
        ap.error(f"{args.model} is not an audio model")
    truth = ToneSet(args.prompts, spec, frames=pipe.index.sample_size, seed=10_000 + args.seed, split=args.split)
    items = [truth[i] for i in range(args.prompts)]
    tones = [it["tone"] for it in items]
    t = time.perf_counter()
    waves = []
    for start in range(0, args.prompts, args.batch):
        prompts = [it["caption"] for it in items[start:start + args.batch]]
        w, _ = pipe.generate_audio(prompts, steps=args.steps, guidance=args.guidance, seed=args.seed + start)
        waves += list(w.numpy())
    seconds = (time.perf_counter() - t) / args.prompts
    print(f"model {args.model}; {args.prompts} {args.split} prompts, dpmpp_2m {args.steps} steps, guidance "
          f"{args.guidance}, Griffin-Lim {spec.griffin_lim_iters} iterations\n")
    print("| clips | n | pitch | note count | pitch and count | instrument | all three | s / clip |\n"
          "|---|---|---|---|---|---|---|---|")
    print(row("generated", score_tones(waves, tones, spec.sample_rate), f"{seconds:.2f}"))
    if args.ceilings:
        print(row("rendered", score_tones([truth.clip(i)[1] for i in range(args.prompts)], tones, spec.sample_rate)))
        mels = torch.stack([it["image"] for it in items])
        print(row("rendered -> mel -> Griffin-Lim", score_tones(list(mel_to_wave(mels, spec).numpy()), tones,
                                                                 spec.sample_rate)))
        with torch.no_grad():
            coded = pipe.autoencoder.decode(pipe.autoencoder.encode(mels)).clamp(-1, 1)
        print(row("rendered -> mel -> autoencoder -> Griffin-Lim",
                  score_tones(list(mel_to_wave(coded, spec).numpy()), tones, spec.sample_rate)))


if __name__ == "__main__":
    main()
