"""Which demo settings buy judge accuracy? Trains one autoencoder or denoiser variant and prints one JSON row.

The demo must finish in 15 minutes on 2 CPU cores, so its settings were chosen by running variants of each
stage side by side (many processes in parallel, a few threads each) and reading the judge:

    # autoencoder variants: the judge on round trips of 200 held-out scenes (the ceiling for generation)
    python benchmarks/demo_ablation.py vae base
    python benchmarks/demo_ablation.py vae c8 m.latent_channels=8
    python benchmarks/demo_ablation.py vae b32 m.base_channels=32
    python benchmarks/demo_ablation.py vae s1800 steps=1800
    # denoiser variants on the cache of one autoencoder: the judge on generated held-out / training prompts
    python benchmarks/demo_ablation.py cache runs/abl/vae/c8/autoencoder runs/abl/cache-c8
    python benchmarks/demo_ablation.py train base runs/abl/cache-c8 model='"shapes-tiny"'
    python benchmarks/demo_ablation.py train noattn runs/abl/cache-c8 batch_size=128 lr=0.002 steps=1200

Keys are the stage's config keys (``latentdiff train-vae --help`` / ``latentdiff train --help``), values JSON;
``m.KEY=VALUE`` changes a field of the model preset the demo uses (``shapes-demo``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time


def _split(args: list[str]) -> tuple[dict, dict]:
    over, model = {}, {}
    for kv in args:
        key, value = kv.split("=", 1)
        value = json.loads(value)
        value = tuple(value) if isinstance(value, list) else value
        (model if key.startswith("m.") else over)[key.removeprefix("m.")] = value
    return over, model


def vae(name: str, args: list[str]) -> dict:
    from latentdiff.components import load_autoencoder
    from latentdiff.config import build_config
    from latentdiff.data.shapes import heldout_prompts
    from latentdiff.eval.judging import autoencoder_ceiling
    from latentdiff.models.autoencoder import PRESETS
    from latentdiff.train.vae import VAE_PRESETS, VAETrainConfig, train_vae

    over, model = _split(args)
    PRESETS["ablation"] = dataclasses.replace(PRESETS["shapes-demo"], **model)
    cfg = build_config(VAETrainConfig, VAE_PRESETS, "shapes-demo", None,
                       {"model": "ablation", "out": f"runs/abl/vae/{name}", "quiet": True, **over})
    t = time.time()
    folder = train_vae(cfg)
    seconds = time.time() - t
    ceiling = autoencoder_ceiling(load_autoencoder(folder), heldout_prompts(200, seed=0), cfg.image_size)
    return {"variant": name, "train_s": round(seconds), **{k: round(v, 3) for k, v in ceiling.items()
                                                           if isinstance(v, float)}}


def cache(autoencoder: str, out: str) -> dict:
    from latentdiff.config import build_config
    from latentdiff.data.cache import CACHE_PRESETS, CacheConfig, cache_dataset

    cfg = build_config(CacheConfig, CACHE_PRESETS, "shapes-demo", None,
                       {"autoencoder": autoencoder, "out": out, "image_size": 32})
    return {"cache": str(cache_dataset(cfg, quiet=True))}


def train(name: str, cache_dir: str, args: list[str]) -> dict:
    from latentdiff.config import build_config
    from latentdiff.data.shapes import heldout_prompts, train_prompts
    from latentdiff.eval.judging import score_prompts
    from latentdiff.models.unet import PRESETS
    from latentdiff.pipeline import load
    from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser

    over, model = _split(args)
    PRESETS["ablation"] = dataclasses.replace(PRESETS[over.pop("model", "shapes-demo")], **model)
    cfg = build_config(TrainConfig, TRAIN_PRESETS, "shapes-demo", None,
                       {"model": "ablation", "out": f"runs/abl/train/{name}", "cache": cache_dir, "quiet": True,
                        "sample_every": 0, **over})
    t = time.time()
    pipe = load(train_denoiser(cfg))
    row = {"variant": name, "train_s": round(time.time() - t)}
    for guidance in (4.0, 8.0):
        for split, prompts in (("heldout", heldout_prompts(48, seed=0)), ("train", train_prompts(48, seed=0))):
            scores, _ = score_prompts(pipe, prompts, steps=20, sampler="dpmpp_2m", guidance=guidance, seed=0)
            row[f"{split}@cfg{guidance:g}"] = {k: round(v, 2) for k, v in scores.items() if isinstance(v, float)}
    return row


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    if what == "vae":
        print(json.dumps(vae(rest[0], rest[1:])))
    elif what == "cache":
        print(json.dumps(cache(rest[0], rest[1])))
    elif what == "train":
        print(json.dumps(train(rest[0], rest[1], rest[2:])))
    else:
        sys.exit(__doc__)
