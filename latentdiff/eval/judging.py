"""The shapes judge on a pipeline: prompt suites (held-out, paraphrased, two-object), autoencoder ceilings, and
the training hook that logs the suite against training time (the curve a long run is read by)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from latentdiff.data.judge import score
from latentdiff.data.shapes import heldout_prompts, render, to_tensor, train_prompts
from latentdiff.images import to_uint8
from latentdiff.io import append_jsonl

# name -> (prompt set, phrasing, objects per scene); "heldout" is the headline figure.
SUITES = {
    "heldout": (heldout_prompts, "template", 1),
    "heldout_paraphrase": (heldout_prompts, "paraphrase", 1),
    "heldout_two": (heldout_prompts, "template", 2),
    "train": (train_prompts, "template", 1),
    "train_two": (train_prompts, "template", 2),  # binding without held-out pairs: which colour goes where
    "heldout_three": (heldout_prompts, "template", 3),
    "train_three": (train_prompts, "template", 3),
}
CURVE_SUITES = ("heldout", "heldout_paraphrase", "heldout_two", "train", "train_two")  # what judge_every logs


def canvas(pipe) -> dict:
    """What text-to-image needs on this pipeline: for an inpainting model a blank image under a white mask
    (``Pipeline.blank_canvas``), else nothing (also for stand-ins that are not Pipelines)."""
    blank = getattr(pipe, "blank_canvas", None)
    return blank() if blank is not None else {}


def score_prompts(pipe, prompts: list[tuple[str, object]], *, steps: int, sampler: str, guidance: float,
                  seed: int, batch: int = 16, schedule: str | None = None, colors: dict | None = None,
                  **options) -> tuple[dict, list]:
    """Generate one image per (caption, scene) prompt and score it with the judge against the scene (``colors``:
    the named colours the judge reads; default the data set's)."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = [c for c, _ in prompts[start:start + batch]]
        images += pipe.generate(chunk, steps=steps, sampler=sampler, guidance=guidance, seed=seed + start,
                                schedule=schedule, **canvas(pipe), **options)
    scores = score([np.asarray(im) for im in images], [s for _, s in prompts], colors)
    return scores, images


def render_prompts(prompts: list[tuple[str, object]], size: int) -> torch.Tensor:
    """The prompts' scenes drawn at ``size`` (scene i with jitter seed i): (N, 3, size, size) in [-1, 1]."""
    return torch.stack([to_tensor(render(scene, size, seed=i)) for i, (_, scene) in enumerate(prompts)])


@torch.no_grad()
def autoencoder_ceiling(autoencoder, prompts: list[tuple[str, object]], size: int) -> dict:
    """The judge on autoencoder round trips of the prompts' rendered scenes: what generation can reach at best."""
    images = render_prompts(prompts, size)
    return score(list(to_uint8(autoencoder.decode(autoencoder.encode(images)))), [s for _, s in prompts])


def stderr(p: float, n: int) -> float:
    """One standard error of a share p measured on n independent trials."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def judge_suites(pipe, n: int, *, suites=CURVE_SUITES, steps: int | None = None, sampler: str | None = None,
                 guidance: float | None = None, seed: int = 0, schedule: str | None = None, **options) -> dict:
    """The judge's scores on ``n`` prompts of each named suite (fixed prompts and seeds: only the model moves);
    settings left None are the model's own (``Pipeline.settings``)."""
    out = {}
    for name in suites:
        prompts_for, phrasing, objects = SUITES[name]
        prompts = prompts_for(n, seed=seed, phrasing=phrasing, objects=objects)
        scores, _ = score_prompts(pipe, prompts, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                                  schedule=schedule, batch=64, **options)
        out[name] = {k: round(v, 4) for k, v in scores.items() if isinstance(v, float)}
    return out


def make_judge_hook(every: int, n: int, log_path: str | os.PathLike, **settings) -> Callable[[int, object], dict]:
    """A training hook ``hook(step, pipeline)`` that appends the judge suites, wall and CPU time to ``log_path``."""
    if every < 1 or n < 1:
        raise ValueError(f"judge_every and judge_prompts must be positive, got {every} and {n}")
    t0, c0 = time.time(), time.process_time()

    def hook(step: int, pipeline) -> dict:
        row = {"step": int(step), "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
               **judge_suites(pipeline, n, **settings)}
        append_jsonl(log_path, row)  # one line per evaluation, appended like metrics.jsonl
        return row

    return hook
