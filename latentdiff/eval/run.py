"""Evaluate a model: sweeps over sampler steps and guidance, every figure per setting, a JSON and an HTML report.

Per setting (sampler, steps, guidance): ``n_samples`` images generated from captions of the training
distribution (shapes scenes of 1 to 3 objects) are compared with ``n_reference`` real images of the same
distribution in the chosen feature space (FID, KID, precision/recall); the judge scores the same images
against their captions, and ``n_judge`` held-out prompts (colour-shape pairs never seen in training);
CLIP score when a CLIP folder is given. At the base setting, memorization: the nearest of the model's
training images to every generated sample, in pixel space and feature space.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from latentdiff.config import COUNT, FINITE, at_least, between, bounds, one_of
from latentdiff.data.shapes import ShapesDataset, heldout_prompts
from latentdiff.eval import metrics
from latentdiff.eval.alignment import ClipScorer, judge_accuracy
from latentdiff.eval.features import (
    FeatureExtractor,
    cached_features,
    check_same_size,
    extract,
    make_extractor,
)
from latentdiff.eval.folders import (
    METRICS,
    RESIZE_POLICY,
    check_counts,
    folder_prompts,
    image_batches,
    image_files,
    reference_features,
    sample_size,
)
from latentdiff.eval.judging import canvas
from latentdiff.eval.memorization import memorization
from latentdiff.images import to_pil
from latentdiff.io import append_jsonl, write_json
from latentdiff.model_index import MAX_STEPS

REFERENCE_SEED = 7_000_001  # shapes reference images: a seed no training run uses by default
PROMPT_SEED = 7_000_002  # captions the model is asked to draw
FRESH_SEED = 7_000_003  # fresh real images that calibrate the near-copy threshold


@dataclass
class EvalConfig:
    """``latentdiff eval``: what to measure, and over which settings."""

    model: str = "outputs/demo/model/model"  # model folder
    out: str = "outputs/eval"  # report folder (report.json, report.html)
    extractor: str = "shapes"  # feature space: "shapes", "inception", "inception-tf1" or "dinov2"
    feature_path: str = ""  # extractor weights (file or folder); "" = its default location
    clip: str = ""  # local CLIP folder for CLIP score; "" = skip
    n_samples: int = 256  # generated images per setting (FID needs more than the feature width)
    n_reference: int = 1000  # real images in the reference set
    n_judge: int = 64  # held-out prompts judged per setting
    samplers: tuple[str, ...] = ("dpmpp_2m", "euler", "heun")  # samplers swept over steps
    steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50)  # sampler steps swept
    guidance: tuple[float, ...] = (1.0, 2.0, 4.0, 7.0)  # guidance scales swept (at base_sampler, base_steps)
    base_sampler: str = "dpmpp_2m"  # sampler of the guidance sweep and of memorization
    base_steps: int = 20  # steps of the guidance sweep
    base_guidance: float = 4.0  # guidance of the steps sweep
    kid_subset: int = 100  # KID subset size
    kid_subsets: int = 50  # KID subsets
    pr_k: int = 3  # k of the precision/recall manifolds
    memorization: bool = True  # nearest training images at the base setting
    train_images: int = 10000  # shapes training set the model saw (the cache's num_images)
    train_seed: int = 0  # ... and its seed
    seed: int = 0  # generation seed
    batch_size: int = 64  # images per generate / feature batch
    cache_dir: str = ""  # reference feature cache; "" = ~/.cache/latentdiff/eval
    grid_images: int = 16  # images per sample grid in the HTML report
    train_log: str = ""  # eval-hook JSONL to plot against training step; "" = none
    reference: str = ""  # folder of reference images (any sizes; resized + centre-cropped); "" = the shapes set
    samples: str = ""  # folder of already generated images to evaluate against the reference (no model needed)
    image_size: int = 0  # samples: the size they must all have; 0 = whatever one square size they have
    metrics: tuple[str, ...] = ("fid", "kid", "pr")  # samples: which of FID, KID, precision/recall ("pr") to compute

    BOUNDS = bounds({"n_samples": COUNT, "n_reference": COUNT, "n_judge": at_least(0), "steps": between(1, MAX_STEPS),
                     "guidance": FINITE, "base_steps": between(1, MAX_STEPS), "base_guidance": FINITE, "kid_subset": COUNT,
                     "kid_subsets": COUNT, "pr_k": COUNT, "train_images": COUNT, "batch_size": COUNT,
                     "grid_images": at_least(0), "image_size": between(0, 16384), "metrics": one_of("fid", "kid", "pr")})


def _cache_dir(cfg_dir: str) -> Path:
    return Path(cfg_dir) if cfg_dir else Path.home() / ".cache" / "latentdiff" / "eval"


def shapes_images(n: int, size: int, seed: int, split: str = "train") -> Tensor:
    """n rendered shapes images (N, 3, size, size) in [-1, 1]."""
    data = ShapesDataset(n, size=size, seed=seed, split=split)
    return torch.stack([data[i]["image"] for i in range(n)])


def shapes_captions(n: int, size: int, seed: int) -> tuple[list[str], list]:
    """n captions and scenes of the training distribution (not the training items themselves)."""
    data = ShapesDataset(n, size=size, seed=seed)
    items = [data[i] for i in range(n)]
    return [it["caption"] for it in items], [it["scene"] for it in items]


def generate(pipe, prompts: list[str], *, steps: int, sampler: str, guidance: float, seed: int,
             batch_size: int, labels: list[str] | None = None) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1], one per prompt (and class label), in batches with seeds seed + start."""
    out = []
    for start in range(0, len(prompts), batch_size):
        extra = {} if labels is None else {"label": labels[start:start + batch_size]}
        out.append(pipe.generate(prompts[start:start + batch_size], steps=steps, sampler=sampler,
                                 guidance=guidance, seed=seed + start, output="pt", **canvas(pipe),
                                 **extra).clamp(-1, 1))
    return torch.cat(out)


def distribution_metrics(real: np.ndarray, fake: np.ndarray, *, kid_subset: int, kid_subsets: int,
                         pr_k: int, seed: int = 0, which: tuple = METRICS) -> dict:
    """FID, KID and precision/recall ("pr") of one generated set against the reference (those in ``which``)."""
    out = {}
    if "fid" in which:
        out["fid"] = metrics.fid(real, fake)
    if "kid" in which:
        out["kid"] = metrics.kid(real, fake, subset_size=kid_subset, num_subsets=kid_subsets, seed=seed)
    if "pr" in which:
        out.update(metrics.precision_recall(real, fake, k=pr_k))
    return out


class PixelFeatures:
    """Raw pixels in [0, 1] as features (memorization in pixel space)."""

    def __init__(self, size: int):
        self.name, self.dim, self.size = f"pixels-{size}", 3 * size * size, size

    def __call__(self, images: Tensor) -> Tensor:
        return ((images.clamp(-1, 1) + 1) / 2).flatten(1)


class Evaluator:
    """Reference sets (cached), extractor and judge prompts for one model size; evaluates settings."""

    def __init__(self, cfg: EvalConfig, size: int, extractor: FeatureExtractor | None = None,
                 log: Callable[[str], None] | None = None):
        self.cfg, self.size = cfg, size
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.extractor = extractor or make_extractor(cfg.extractor, cfg.feature_path or None)
        if cfg.reference:  # any folder: prompts are its captions; the shapes judge has nothing to read
            n_ref = len(image_files(cfg.reference, "reference"))
            check_counts({"generated": cfg.n_samples, "reference": n_ref}, METRICS, self.extractor, cfg.pr_k,
                         selectable=False)  # the sweep reports all three
            self.reference, self.cache_hit = reference_features(self.extractor, cfg.reference, size,
                                                                _cache_dir(cfg.cache_dir), cfg.batch_size, self.log)
            self.reference_shape = (size, size)
            self.prompts, self.classes = folder_prompts(cfg.reference, cfg.n_samples)  # classes: its subfolders
            self.scenes, self.heldout = None, []
            self.clip = ClipScorer(cfg.clip) if cfg.clip else None
            return
        need = self.extractor.dim + 1
        if cfg.n_samples < need or cfg.n_reference < need:
            raise ValueError(f"FID with the {self.extractor.name} features ({self.extractor.dim}-d) needs at least "
                             f"{need} generated and reference images; got n_samples={cfg.n_samples}, "
                             f"n_reference={cfg.n_reference}")
        cache = _cache_dir(cfg.cache_dir)
        key = shapes_reference_key(size, cfg.n_reference)
        reference_images = None

        def make_reference() -> Tensor:
            nonlocal reference_images
            reference_images = shapes_images(cfg.n_reference, size, REFERENCE_SEED)
            return reference_images

        self.reference = cached_features(self.extractor, key, make_reference, cache, cfg.batch_size)
        probe = reference_images if reference_images is not None else shapes_images(1, size, REFERENCE_SEED)
        self.reference_shape = tuple(probe.shape[-2:])
        self.prompts, self.scenes = shapes_captions(cfg.n_samples, size, PROMPT_SEED + cfg.seed)
        self.heldout = heldout_prompts(cfg.n_judge, seed=cfg.seed) if cfg.n_judge else []
        self.classes = None
        self.clip = ClipScorer(cfg.clip) if cfg.clip else None

    def setting(self, pipe, sampler: str, steps: int, guidance: float, keep: int = 0) -> tuple[dict, Tensor]:
        """All figures for one setting; also returns the first ``keep`` images."""
        cfg = self.cfg
        t0 = time.time()
        images = generate(pipe, self.prompts, steps=steps, sampler=sampler, guidance=guidance, seed=cfg.seed,
                          batch_size=cfg.batch_size, labels=self.labels_for(pipe))
        check_same_size(images, torch.empty(1, 3, *self.reference_shape))
        t_gen = time.time()
        fake = extract(self.extractor, images, cfg.batch_size)
        t_feat = time.time()
        row = {"sampler": sampler, "steps": steps, "guidance": guidance, "n": len(images)}
        row.update(distribution_metrics(self.reference, fake, kid_subset=cfg.kid_subset, kid_subsets=cfg.kid_subsets,
                                        pr_k=cfg.pr_k, seed=cfg.seed))
        t_metrics = time.time()
        if self.scenes is not None:
            row["judge_train_captions"] = judge_accuracy(to_pil(images), self.scenes)
        if self.heldout:
            held = generate(pipe, [c for c, _ in self.heldout], steps=steps, sampler=sampler, guidance=guidance,
                            seed=cfg.seed, batch_size=cfg.batch_size)
            row["judge_heldout"] = judge_accuracy(to_pil(held), [s for _, s in self.heldout])
        if self.clip is not None:
            row["clip_score"] = float(self.clip(images, self.prompts).mean())
        row["seconds"] = {"generate": round(t_gen - t0, 2), "features": round(t_feat - t_gen, 2),
                          "metrics": round(t_metrics - t_feat, 2), "total": round(time.time() - t0, 2)}
        return row, images[:keep]

    def labels_for(self, pipe) -> list[str] | None:
        """A class-conditional model draws each reference image's class (its subfolder), or says it cannot."""
        if not getattr(pipe, "class_names", None):
            return None
        if self.classes is None:
            raise ValueError("this model is class-conditional: evaluate it against a folder of class folders "
                             "(--reference DIR with DIR/<class name>/*.png), so every sample gets a class")
        return self.classes

    def memorization(self, images: Tensor) -> dict:
        """Nearest training images of generated ones, in pixel space and in the feature space."""
        cfg = self.cfg
        cache = _cache_dir(cfg.cache_dir)
        n_fresh = max(100, min(1000, cfg.n_reference))
        out = {}
        for space, extractor in (("pixels", PixelFeatures(self.size)), ("features", self.extractor)):
            train = cached_features(extractor, f"shapes-train-s{self.size}-n{cfg.train_images}-seed{cfg.train_seed}",
                                    lambda: shapes_images(cfg.train_images, self.size, cfg.train_seed), cache,
                                    cfg.batch_size)
            fresh = cached_features(extractor, f"shapes-train-s{self.size}-n{n_fresh}-seed{FRESH_SEED}",
                                    lambda: shapes_images(n_fresh, self.size, FRESH_SEED), cache, cfg.batch_size)
            result = memorization(extract(extractor, images, cfg.batch_size), train, fresh, space=space)
            out[space] = {k: v for k, v in result.items() if k not in ("nearest_index", "nearest_distance")}
            out[space]["nearest_index_first"] = result["nearest_index"][:cfg.grid_images]
        return out


def _settings(cfg: EvalConfig) -> list[tuple[str, int, float]]:
    """Steps sweep for each sampler at base_guidance, then the guidance sweep; no setting twice."""
    out = [(s, n, cfg.base_guidance) for s in cfg.samplers for n in cfg.steps]
    out += [(cfg.base_sampler, cfg.base_steps, g) for g in cfg.guidance]
    return list(dict.fromkeys(out))


def run_eval(cfg: EvalConfig, pipe=None, extractor: FeatureExtractor | None = None) -> dict:
    """Evaluate ``cfg.model`` (or ``pipe``) over the sweeps; write ``report.json`` and ``report.html`` into ``cfg.out``."""
    from latentdiff.eval.report import write_html
    from latentdiff.pipeline import load

    pipe = pipe or load(cfg.model)
    size = pipe.default_size
    t0 = time.time()
    evaluator = Evaluator(cfg, size, extractor)
    rows, grids = [], {}
    settings = _settings(cfg)
    for i, (sampler, steps, guidance) in enumerate(settings):
        row, kept = evaluator.setting(pipe, sampler, steps, guidance, keep=cfg.grid_images)
        rows.append(row)
        grids[f"{sampler}|{steps}|{guidance}"] = kept
        evaluator.log(f"[{i + 1}/{len(settings)}] {sampler} steps={steps} guidance={guidance}: FID {row['fid']:.3f} "
                      f"KID {row['kid']['mean']:.4f} judge(held-out, all) "
                      f"{row.get('judge_heldout', {}).get('all_correct', float('nan')):.3f} ({row['seconds']['total']} s)")
    report = {"model": str(cfg.model), "config": _jsonable(asdict(cfg)), "extractor": evaluator.extractor.name,
              "image_size": size, "settings": rows}
    if cfg.reference:
        report["reference"] = {"folder": str(cfg.reference), "n": len(evaluator.reference),
                               "cache_hit": evaluator.cache_hit, "resize": RESIZE_POLICY}
    if cfg.memorization and not cfg.reference:  # nearest training images: the shapes training set only
        base = (cfg.base_sampler, cfg.base_steps, cfg.base_guidance)
        images = generate(pipe, evaluator.prompts, steps=base[1], sampler=base[0], guidance=base[2], seed=cfg.seed,
                          batch_size=cfg.batch_size)
        report["memorization"] = {"setting": {"sampler": base[0], "steps": base[1], "guidance": base[2]},
                                  **evaluator.memorization(images)}
    if cfg.train_log:
        report["training"] = read_hook_log(cfg.train_log)
    report["seconds"] = round(time.time() - t0, 1)
    out = Path(cfg.out)
    write_json(out / "report.json", report)
    write_html(out / "report.html", report, grids)
    evaluator.log(f"wrote {out / 'report.json'} and {out / 'report.html'}")
    return report


def shapes_reference_key(size: int, n: int) -> str:
    """The feature-cache key of the shapes reference set of ``n`` images at ``size``."""
    return f"shapes-train-s{size}-n{n}-seed{REFERENCE_SEED}"


def evaluate_samples(cfg: EvalConfig, extractor: FeatureExtractor | None = None,
                     log: Callable[[str], None] | None = None) -> dict:
    """Already generated images (``cfg.samples``) against the reference folder (or the shapes set).

    Writes ``report.json`` and ``report.html`` into ``cfg.out``. Sizes follow ``folders.RESIZE_POLICY``;
    too few images for a requested metric is an error that says how many it needs.
    """
    from latentdiff.eval.report import write_samples_html

    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    which = tuple(cfg.metrics)
    extractor = extractor or make_extractor(cfg.extractor, cfg.feature_path or None)
    files = image_files(cfg.samples, "samples")
    size = sample_size(files, cfg.image_size)
    n_ref = len(image_files(cfg.reference, "reference")) if cfg.reference else cfg.n_reference
    check_counts({"generated": len(files), "reference": n_ref}, which, extractor, cfg.pr_k)
    cache = _cache_dir(cfg.cache_dir)
    if cfg.reference:
        real, hit = reference_features(extractor, cfg.reference, size, cache, cfg.batch_size, log)
        reference = {"folder": str(cfg.reference), "resize": RESIZE_POLICY, "cache_hit": hit}
    else:
        real = cached_features(extractor, shapes_reference_key(size, cfg.n_reference),
                               lambda: shapes_images(cfg.n_reference, size, REFERENCE_SEED), cache, cfg.batch_size)
        reference = {"shapes": {"n": cfg.n_reference, "seed": REFERENCE_SEED}}
    fake = extract(extractor, image_batches(files, None, cfg.batch_size, log), cfg.batch_size)
    figures = distribution_metrics(real, fake, kid_subset=cfg.kid_subset, kid_subsets=cfg.kid_subsets,
                                   pr_k=cfg.pr_k, seed=cfg.seed, which=which)
    report = {"samples": str(cfg.samples), "reference": {**reference, "n": len(real)}, "extractor": extractor.name,
              "image_size": size, "n_samples": len(fake), **figures, "config": _jsonable(asdict(cfg)),
              "seconds": round(time.time() - t0, 1)}
    out = Path(cfg.out)
    write_json(out / "report.json", report)
    grid = list(image_batches(files[:cfg.grid_images], None, max(1, cfg.grid_images), log))
    grid = torch.cat(grid) if grid else torch.empty(0, 3, size, size)
    write_samples_html(out / "report.html", report, grid)
    log(f"wrote {out / 'report.json'} and {out / 'report.html'}")
    return report


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# --- during training ---------------------------------------------------------------------------------


def read_hook_log(path: str | os.PathLike) -> list[dict]:
    """The rows an eval hook appended (one JSON object per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no eval-hook log at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_eval_hook(every: int, n_samples: int, *, log_path: str | os.PathLike | None = None,
                   extractor: FeatureExtractor | None = None, extractor_kind: str = "shapes",
                   feature_path: str = "", n_reference: int = 1000, n_judge: int = 32, steps: int = 20,
                   sampler: str = "dpmpp_2m", guidance: float = 4.0, seed: int = 0, cache_dir: str = "",
                   batch_size: int = 64) -> Callable[[int, object], dict | None]:
    """A training hook ``hook(step, pipeline)``: every ``every`` steps, a fixed-budget evaluation logged with the step.

    Same prompts, seeds and reference set at every call, so the figures move only with the model. Each
    evaluation is appended to ``log_path`` (JSON lines; ``latentdiff eval --set train_log=PATH`` plots it)
    and returned; other steps return None. The reference features are computed once, on the first call.
    """
    if every < 1:
        raise ValueError(f"every must be a positive number of steps, got {every}")
    cfg = EvalConfig(extractor=extractor_kind, feature_path=feature_path, n_samples=n_samples,
                     n_reference=n_reference, n_judge=n_judge, seed=seed, cache_dir=cache_dir,
                     batch_size=batch_size, memorization=False)
    state: dict = {}

    def hook(step: int, pipeline) -> dict | None:
        if step % every:
            return None
        if "evaluator" not in state:
            state["evaluator"] = Evaluator(cfg, pipeline.default_size, extractor=extractor, log=lambda m: None)
        row, _ = state["evaluator"].setting(pipeline, sampler, steps, guidance)
        row = {"step": int(step), **row}
        if log_path is not None:
            append_jsonl(log_path, row)  # one line per evaluation, appended like metrics.jsonl
        return row

    return hook
