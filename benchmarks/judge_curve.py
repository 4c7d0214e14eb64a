"""The curve of a training run: the judge suites it logged (``judge_every``) against steps and CPU time.

    python benchmarks/judge_curve.py RUN_DIR [--suite heldout] [--keys color shape size position all_correct]

Reads RUN_DIR/judge.jsonl (written by ``latentdiff train ... --set judge_every=N``) and prints one markdown row
per evaluation: step, wall and CPU minutes of the training process, and the chosen attributes of each suite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--suites", nargs="+", default=["heldout", "heldout_paraphrase", "heldout_two", "train"])
    ap.add_argument("--keys", nargs="+", default=["color", "shape", "size", "position", "all_correct"])
    args = ap.parse_args()
    rows = [json.loads(line) for line in (Path(args.run) / "judge.jsonl").read_text().splitlines() if line.strip()]
    head = ["step", "wall min", "CPU min"] + [f"{s} {k}" for s in args.suites for k in args.keys]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["step"]), f"{r['wall_s'] / 60:.0f}", f"{r['cpu_s'] / 60:.0f}"]
        cells += [f"{r[s][k]:.2f}" if s in r and k in r[s] else "" for s in args.suites for k in args.keys]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
