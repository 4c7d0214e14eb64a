"""A small CNN that reads shapes scenes, whose penultimate layer is the shapes-domain feature space.

Trained by latentdiff on rendered shapes (train and held-out splits) to predict, for each of the five
position regions, the shape (or none), colour and size of the object there, and the background. Its
``feature_dim``-wide penultimate activations are what shapes-domain FID / KID / precision-recall compare:
a space where the attributes the judge reads are what separates images. Inputs of any size are resized
to ``input_size`` (area-averaged), so one net serves 32- and 64-pixel models.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentdiff.config import from_dict
from latentdiff.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, ShapesDataset
from latentdiff.io import (
    atomic_folder,
    file_digest,
    load_component_weights,
    read_component_config,
    save_component,
)

# Per position: shape (none + 3), colour (none + 6), size (none + 2); then the background.
_GROUPS = [(p, "shape", 1 + len(SHAPES)) for p in POSITIONS] + [(p, "color", 1 + len(COLORS)) for p in POSITIONS] \
    + [(p, "size", 1 + len(SIZES)) for p in POSITIONS] + [(None, "background", len(BACKGROUNDS))]
_VOCAB = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "background": tuple(BACKGROUNDS)}


@dataclass
class ShapesNetConfig:
    """The network and how it was trained."""

    input_size: int = 32  # images are resized to this many pixels
    width: int = 32  # channels of the first convolution (doubling twice)
    feature_dim: int = 64  # penultimate width: the feature space
    steps: int = 800  # optimizer steps
    batch_size: int = 64  # images per step
    num_images: int = 4500  # rendered training images (2/3 train split, 1/3 held-out split)
    lr: float = 2e-3  # Adam learning rate (cosine decay)
    seed: int = 0  # data and initialization seed


def default_path() -> Path:
    """Where ``train-features`` writes and the eval looks by default (env LATENTDIFF_SHAPES_NET overrides)."""
    return Path(os.environ.get("LATENTDIFF_SHAPES_NET", Path.home() / ".cache" / "latentdiff" / "shapes_net"))


class ShapesNet(nn.Module):
    """Three strided convolutions -> feature_dim features -> one logit group per attribute."""

    def __init__(self, config: ShapesNetConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.convs = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.SiLU(),  # /2
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),  # /4
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),  # /8
        )
        side = config.input_size // 8
        self.proj = nn.Linear(4 * w * side * side, config.feature_dim)
        self.heads = nn.Linear(config.feature_dim, sum(n for _, _, n in _GROUPS))
        # Set after training to the features' RMS on rendered images, so features() has RMS ~1: FID and the
        # KID kernel (x . y / D + 1)^3 then see numbers of the scale they were designed for.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, feature_dim), scaled to unit RMS on rendered images."""
        return self.hidden(images) / self.feature_scale

    def hidden(self, images: Tensor) -> Tensor:
        """The penultimate activations the heads read (unscaled)."""
        size = self.config.input_size
        x = images.float()
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area")
        x = self.convs(x)  # (B, 4w, size/8, size/8)
        return F.silu(self.proj(x.flatten(1)))  # (B, feature_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.heads(self.hidden(images))  # (B, total logits)


def scene_labels(scene: Scene) -> list[int]:
    """Class indices, one per logit group (0 = no object in that region)."""
    at = {o.position: o for o in scene.objects}
    labels = []
    for position, attr, _ in _GROUPS:
        if attr == "background":
            labels.append(_VOCAB["background"].index(scene.background))
        else:
            o = at.get(position)
            labels.append(0 if o is None else 1 + _VOCAB[attr].index(getattr(o, attr)))
    return labels


def _loss_and_accuracy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over the groups, and per-group accuracy."""
    loss, hits, start = 0.0, [], 0
    for g, (_, _, n) in enumerate(_GROUPS):
        part = logits[:, start:start + n]
        loss = loss + F.cross_entropy(part, labels[:, g])
        hits.append((part.argmax(1) == labels[:, g]).float().mean())
        start += n
    return loss, torch.stack(hits)


def _render_set(n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """n images (2/3 train split, 1/3 held-out) and their labels."""
    n_held = n // 3
    parts = [ShapesDataset(n - n_held, size=size, seed=seed, split="train"),
             ShapesDataset(n_held, size=size, seed=seed, split="heldout")]
    items = [d[i] for d in parts for i in range(len(d))]
    images = torch.stack([it["image"] for it in items])
    labels = torch.tensor([scene_labels(it["scene"]) for it in items])
    return images, labels


def train_shapes_net(out: str | os.PathLike, config: ShapesNetConfig | None = None, quiet: bool = False) -> Path:
    """Train the shapes feature net and write it to ``out`` (config.json + model.safetensors)."""
    cfg = config or ShapesNetConfig()
    if cfg.input_size % 8:
        raise ValueError(f"input_size must be a multiple of 8, got {cfg.input_size}")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    images, labels = _render_set(cfg.num_images, cfg.input_size, cfg.seed)
    val_images, val_labels = _render_set(600, cfg.input_size, cfg.seed + 1000)
    net = ShapesNet(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.steps):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
        x = images[idx]
        x = x + 0.05 * torch.randn(x.shape, generator=generator)  # mild noise: generated images are not clean
        loss, _ = _loss_and_accuracy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not quiet and (step + 1) % 200 == 0:
            print(f"shapes net step {step + 1}/{cfg.steps} loss {loss.item():.3f}", file=sys.stderr)
    net.eval()
    with torch.no_grad():
        _, acc = _loss_and_accuracy(net(val_images), val_labels)
        net.feature_scale.fill_(net.hidden(val_images).pow(2).mean().sqrt())
    accuracy = {"per_group_mean": round(float(acc.mean()), 4), "worst_group": round(float(acc.min()), 4)}
    out = Path(out)
    with atomic_folder(out) as tmp:
        save_component(tmp, net, {"type": "ShapesNet", "config": dataclasses.asdict(cfg),
                                  "validation_accuracy": accuracy, "train_seconds": round(time.time() - t0, 1)})
    if not quiet:
        print(f"shapes net: validation accuracy {accuracy} in {time.time() - t0:.0f} s -> {out}", file=sys.stderr)
    return out


def load_shapes_net(folder: str | os.PathLike) -> tuple[ShapesNet, str]:
    """The trained net (eval mode) and a digest of its weights, or an error that says how to make one."""
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no shapes feature net at {folder}; train one (about a minute) with "
                                f"`latentdiff train-features --out {folder}`, or point LATENTDIFF_SHAPES_NET "
                                "or --feature-path at one")
    cfg = read_component_config(folder, "ShapesNet", "a shapes feature net")
    net = ShapesNet(from_dict(ShapesNetConfig, cfg, f"{folder}/config.json"))
    load_component_weights(net, folder, "shapes feature net")
    return net.eval(), file_digest(folder / "model.safetensors")


def label_accuracy(net: ShapesNet, n: int = 300, size: int = 32, seed: int = 12345) -> float:
    """Mean per-group accuracy of the net on freshly rendered images (a health check)."""
    images, labels = _render_set(n, size, seed)
    with torch.no_grad():
        _, acc = _loss_and_accuracy(net(images), labels)
    return float(np.mean(acc.numpy()))
