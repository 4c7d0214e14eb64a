"""``latentdiff eval-vae``: how well a saved autoencoder reconstructs held-out images (PSNR, SSIM, rFID, a grid).

Held-out data by source:

- ``shapes``: fresh rendered images from a seed training never uses (training draws seed 0 onwards);
  rFID through the shapes feature net (``latentdiff train-features``);
- ``skimage``: PSNR / SSIM on the three held-out photographs whole (``data.natural.skimage_heldout``),
  rFID and the grid on ``num_images`` random crops of those same photographs (three images are no
  distribution); rFID through the FID Inception, whose weight file must be on disk;
- a folder: its images (resized and cropped by ``ImageFolder`` to ``image_size``), all three measures.

The measures come from ``eval.reconstruction`` (PSNR, SSIM, the real / reconstruction pairing of rFID) and the
Frechet distance from ``eval.metrics``; the feature extractor from ``eval.features``. With fewer images than
feature dimensions + 1 the covariance is singular: rFID is still computed (biased) and the report says so.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from latentdiff.config import COUNT, IMAGE_SIDE, at_least, bounds

HELDOUT_SEED = 1_000_003  # shapes: a data seed no training run uses (train-vae's default seed is 0)


@dataclass
class VAEEvalConfig:
    """``latentdiff eval-vae``: reconstruction quality of an autoencoder on held-out images."""

    model: str = "runs/vae/autoencoder"  # autoencoder folder, or a model folder holding autoencoder/
    data: str = "shapes"  # "shapes", "skimage" or a folder of held-out images
    out: str = "runs/vae_eval"  # folder for report.json and grid.png
    num_images: int = 256  # shapes: images rendered; skimage: crops for rFID; folder: at most this many
    image_size: int = 64  # pixels (shapes, skimage crops, folder images)
    max_side: int = 256  # skimage: the held-out photographs are shrunk to fit this
    extractor: str = "auto"  # rFID features: "auto" (shapes net for shapes, else inception), "shapes",
    #                          "inception", "inception-tf1", "dinov2" or "none" (no rFID)
    feature_path: str = ""  # extractor weights: shapes-net folder, Inception .pth, DINOv2 folder ("" = default)
    batch_size: int = 32  # images per forward pass
    grid_images: int = 8  # originals (top row) and reconstructions (bottom row) in grid.png

    BOUNDS = bounds({"num_images": COUNT, "image_size": IMAGE_SIDE, "max_side": IMAGE_SIDE, "batch_size": COUNT,
                     "grid_images": at_least(0)})


def _load_autoencoder(path: str):
    from latentdiff.components import load_autoencoder

    folder = Path(path)
    if (folder / "autoencoder").is_dir() and not (folder / "config.json").is_file():
        folder = folder / "autoencoder"  # a model folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no autoencoder at {path}: pass an autoencoder folder (train-vae's OUT/autoencoder) "
                                "or a model folder that holds autoencoder/")
    return load_autoencoder(folder)


def _datasets(cfg: VAEEvalConfig, factor: int):
    """(batches for PSNR / SSIM, a data set for rFID and the grid) of the held-out images."""
    from latentdiff.train.latent_stats import image_batches

    if cfg.image_size % factor:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the autoencoder's factor {factor}")
    if cfg.data == "skimage":
        from latentdiff.data.natural import SKIMAGE_HELDOUT, RandomCrops, load_skimage, skimage_heldout

        photos = skimage_heldout(multiple=max(16, factor), max_side=cfg.max_side)  # different sizes: one per batch
        crops = RandomCrops([load_skimage(n) for n in SKIMAGE_HELDOUT], cfg.image_size, cfg.num_images, seed=0)
        return photos, crops
    from latentdiff.data import make_image_dataset

    seed = HELDOUT_SEED if cfg.data == "shapes" else 0
    dataset = make_image_dataset(cfg.data, cfg.num_images, cfg.image_size, seed)
    if len(dataset) == 0:
        raise ValueError(f"no images in {cfg.data}")
    return list(image_batches(dataset, cfg.num_images, cfg.batch_size)), dataset


def _extractor(cfg: VAEEvalConfig):
    from latentdiff.eval.features import make_extractor

    kind = cfg.extractor
    if kind == "auto":
        kind = "shapes" if cfg.data == "shapes" else "inception"
    if kind == "none":
        return None
    try:
        return make_extractor(kind, cfg.feature_path or None)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (eval-vae: give the weights with --feature-path, or skip rFID with "
                                "--extractor none)") from e


def evaluate_vae(cfg: VAEEvalConfig) -> dict:
    """Measure, write ``cfg.out``/report.json and grid.png, and return the report."""
    from latentdiff.eval.metrics import fid
    from latentdiff.eval.reconstruction import reconstruction_fid, reconstruction_metrics
    from latentdiff.io import write_json
    from latentdiff.train.latent_stats import image_batches
    from latentdiff.train.vae import save_reconstructions

    extractor = _extractor(cfg)  # first: a missing weight file stops us before any work
    ae = _load_autoencoder(cfg.model).eval()
    batches, dataset = _datasets(cfg, ae.factor)
    report = {"config": asdict(cfg), "factor": ae.factor, "latent_channels": ae.latent_channels,
              **reconstruction_metrics(ae, batches)}
    n = min(cfg.num_images, len(dataset))
    if extractor is not None:
        print(f"rFID: {extractor.name} features of {n} images and their reconstructions", file=sys.stderr)
        biased = n <= extractor.dim
        report["rfid"] = reconstruction_fid(ae, image_batches(dataset, n, cfg.batch_size), extractor,
                                            functools.partial(fid, min_samples=2 if biased else None))
        report.update(rfid_extractor=extractor.name, rfid_images=n, rfid_feature_dim=extractor.dim,
                      rfid_biased=biased)
        if biased:
            print(f"warning: rFID from {n} images in {extractor.dim} dimensions (fewer than dim + 1) is biased; "
                  "raise num_images", file=sys.stderr)
    out = Path(cfg.out)
    grid = torch.cat(list(image_batches(dataset, min(cfg.grid_images, n), cfg.grid_images)))
    with torch.no_grad():
        save_reconstructions(ae, grid, out / "grid.png")
    report["grid"] = str(out / "grid.png")
    write_json(out / "report.json", report)
    return report
