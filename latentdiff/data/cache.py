"""The latent cache: a data set encoded once into shards of posterior mean and log-variance.

Layout of a cache folder::

    cache.json                 what was encoded, by which autoencoder, latent shape, shard list
    shard_00000.safetensors    mean, logvar: (N, C, h, w) float32, raw (un-normalized) latent space
    shard_00000.json           captions and attributes (scenes) of the same N items

Training draws a fresh sample ``mean + exp(logvar / 2) * eps`` from the posterior every step and
normalizes it with the autoencoder's own scale and shift, so the cache stays valid if those change.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from latentdiff.io import atomic_folder, write_json, write_safetensors


@dataclass
class CacheConfig:
    """What ``latentdiff cache`` encodes, and where it writes."""

    autoencoder: str = "runs/vae/autoencoder"  # autoencoder component folder (from train-vae)
    out: str = "runs/cache"  # cache folder to write
    data: str = "shapes"  # "shapes" (built in) or a folder of images
    num_images: int = 10000  # shapes: number of images to encode
    image_size: int = 64  # pixels; must be divisible by the autoencoder's factor
    split: str = "train"  # shapes: "train" or "heldout"
    seed: int = 0  # shapes: data set seed
    batch_size: int = 64  # images encoded per batch
    shard_size: int = 8192  # items per shard file


CACHE_PRESETS: dict[str, dict] = {
    "shapes": {},
    "shapes-demo": {"image_size": 32, "num_images": 10000},
    "shapes-test": {"num_images": 64, "shard_size": 40},
}


def _scene_to_json(scene) -> dict | None:
    return dataclasses.asdict(scene) if scene is not None else None


@torch.no_grad()
def build_cache(autoencoder, dataset, out: str | Path, batch_size: int = 64, shard_size: int = 8192,
                source: dict | None = None, quiet: bool = False) -> Path:
    """Encode ``dataset`` (items with image, caption, scene) into a cache folder, atomically."""
    from tqdm import tqdm

    out = Path(out)
    autoencoder.eval()
    n = len(dataset)
    if n == 0:
        raise ValueError("the data set to cache is empty")
    shards = []
    progress = tqdm(total=n, desc="caching", disable=quiet, file=sys.stderr)
    with atomic_folder(out) as tmp:
        for shard_start in range(0, n, shard_size):
            shard_end = min(n, shard_start + shard_size)
            means, logvars, meta = [], [], []
            for start in range(shard_start, shard_end, batch_size):
                items = [dataset[i] for i in range(start, min(shard_end, start + batch_size))]
                posterior = autoencoder.encode_posterior(torch.stack([it["image"] for it in items]))
                means.append(posterior.mean.float().cpu())
                logvars.append(posterior.logvar.float().cpu())
                meta.extend({"caption": it["caption"], "scene": _scene_to_json(it["scene"])} for it in items)
                progress.update(len(items))
            name = f"shard_{len(shards):05d}"
            write_safetensors(tmp / f"{name}.safetensors", {"mean": torch.cat(means), "logvar": torch.cat(logvars)})
            write_json(tmp / f"{name}.json", meta)
            shards.append(name)
        progress.close()
        latent_shape = list(posterior.mean.shape[1:])
        write_json(tmp / "cache.json", {
            "format": "latentdiff-latent-cache", "num_items": n, "shards": shards,
            "latent_shape": latent_shape, "source": source or {},
        })
    return out


def cache_dataset(cfg: CacheConfig, quiet: bool = False) -> Path:
    """``latentdiff cache``: load the autoencoder, build the data set, encode it into ``cfg.out``."""
    from latentdiff.components import load_autoencoder
    from latentdiff.data import make_image_dataset

    autoencoder = load_autoencoder(cfg.autoencoder)
    if cfg.image_size % autoencoder.factor:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the autoencoder's factor "
                         f"{autoencoder.factor}")
    dataset = make_image_dataset(cfg.data, cfg.num_images, cfg.image_size, cfg.seed, cfg.split)
    source = {"autoencoder": str(Path(cfg.autoencoder).resolve()), "data": cfg.data, "split": cfg.split,
              "seed": cfg.seed, "image_size": cfg.image_size}
    return build_cache(autoencoder, dataset, cfg.out, cfg.batch_size, cfg.shard_size, source=source, quiet=quiet)


class LatentCache:
    """A cache folder loaded into memory: ``sample(indices, generator)`` gives raw latents and captions."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        info_path = self.folder / "cache.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path} is missing: run `latentdiff cache` to build a latent cache first")
        self.info = json.loads(info_path.read_text())
        means, logvars, self.meta = [], [], []
        for name in self.info["shards"]:
            tensors = load_file(str(self.folder / f"{name}.safetensors"))
            means.append(tensors["mean"])
            logvars.append(tensors["logvar"])
            self.meta.extend(json.loads((self.folder / f"{name}.json").read_text()))
        self.mean = torch.cat(means)  # (N, C, h, w)
        self.std = torch.cat(logvars).mul(0.5).exp()  # (N, C, h, w)
        if len(self.mean) != self.info["num_items"] or len(self.meta) != len(self.mean):
            raise ValueError(f"latent cache {self.folder} is incomplete: rebuild it with `latentdiff cache`")
        self.captions = [m["caption"] for m in self.meta]

    def __len__(self) -> int:
        return len(self.mean)

    @property
    def autoencoder_path(self) -> str | None:
        return self.info.get("source", {}).get("autoencoder")

    def sample(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """Draw one posterior sample for each index: (raw latents (B, C, h, w), captions)."""
        mean, std = self.mean[indices], self.std[indices]
        eps = torch.randn(mean.shape, generator=generator)
        return mean + std * eps, [self.captions[i] for i in indices.tolist()]
