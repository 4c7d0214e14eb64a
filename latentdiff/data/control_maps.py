"""Condition maps for ControlNets, computed by our own code (numpy / torch): edges, layout and depth.

Each map is a uint8 RGB image (H, W, 3), what a ControlNet is trained on and what ``generate --control FILE.png``
reads back (as [0, 1] pixels, ``edit_inputs.read_control``).

- ``edges``: the Sobel gradient magnitude of the image's luminance (``sobel_edges``), white where it exceeds
  ``EDGE_THRESHOLD`` of the largest possible magnitude, black elsewhere; from any image.
- ``layout``: a segmentation map of a shapes scene (``layout_labels``): each object's silhouette filled with its
  label's colour (``LAYOUT_PALETTE[k]`` for the k-th object of the scene, 1-based; black background), where the
  object covers at least half a pixel. Shape, size and place come from the map; colour from the caption.
- ``depth``: a depth-like map of a shapes scene: background 0 (far), each object raised as a cone over its
  silhouette (1 at its centre, falling to half at its rim), large objects nearer (brighter) than small ones.

Layout and depth need the scene and its render seed (the jitter), which ``ShapesDataset`` items carry.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from latentdiff.data.shapes import SIZE_RADIUS, Scene, object_coverage

CONTROL_KINDS = ("edges", "layout", "depth")
EDGE_THRESHOLD = 0.1  # share of the largest Sobel magnitude (4 * sqrt(2) on [0, 1] pixels) that counts as an edge
LAYOUT_PALETTE = ((0, 0, 0), (255, 255, 255), (255, 128, 0), (0, 160, 255))  # background, objects 1..3
DEPTH_NEAR = {"small": 0.6, "large": 1.0}  # an object's peak brightness by size: large ones are nearer


def check_kind(kind: str) -> str:
    if kind not in CONTROL_KINDS:
        raise ValueError(f"unknown control kind {kind!r}: expected one of {', '.join(CONTROL_KINDS)}")
    return kind


def sobel_edges(image: Tensor, threshold: float = EDGE_THRESHOLD) -> Tensor:
    """Binary edges (H, W) bool of an image (3, H, W) in [-1, 1]: Sobel magnitude of its luminance > threshold."""
    gray = ((image.float() + 1) / 2 * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)  # (H, W) in [0, 1]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    grad = F.conv2d(F.pad(gray[None, None], (1, 1, 1, 1), mode="replicate"), kernels)[0]  # (2, H, W)
    magnitude = grad.pow(2).sum(0).sqrt() / (4 * 2**0.5)  # in [0, 1]
    return magnitude > threshold


def layout_labels(scene: Scene, size: int, seed: int) -> np.ndarray:
    """int64 (size, size): 0 background, k where the k-th object of the scene covers at least half the pixel."""
    labels = np.zeros((size, size), np.int64)
    for k, (_, _, coverage) in enumerate(object_coverage(scene, size, seed), start=1):
        labels[coverage >= 0.5] = k
    return labels


def depth_like(scene: Scene, size: int, seed: int) -> np.ndarray:
    """float (size, size) in [0, 1]: 0 far (background), objects as cones, large objects nearer."""
    depth = np.zeros((size, size))
    coords = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    for o, (cx, cy), coverage in object_coverage(scene, size, seed):
        r = SIZE_RADIUS[o.size] * (2**0.5 if o.shape != "circle" else 1.0)  # the centre-to-corner distance
        cone = 1 - 0.5 * np.clip(np.hypot(x - cx, y - cy) / r, 0, 1)
        depth = np.maximum(depth, coverage * cone * DEPTH_NEAR[o.size])
    return depth


def control_map(kind: str, image: Tensor, scene: Scene | None = None, seed: int | None = None) -> Tensor:
    """The ``kind`` map of one item as uint8 (3, H, W): from its image (3, H, W) in [-1, 1] (edges), or from its
    scene and render seed at the image's size (layout, depth)."""
    check_kind(kind)
    size = int(image.shape[-1])
    if kind == "edges":
        return sobel_edges(image).to(torch.uint8).mul(255).expand(3, -1, -1).contiguous()
    if scene is None or seed is None:
        raise ValueError(f"a {kind} map is drawn from a shapes scene and its render seed: use the built-in shapes "
                         "data (data = \"shapes\"), or control = \"edges\", which any image gives")
    if image.shape[-2] != size:
        raise ValueError(f"shapes images are square, got {tuple(image.shape[-2:])}")
    if kind == "layout":
        rgb = np.asarray(LAYOUT_PALETTE, np.uint8)[layout_labels(scene, size, seed)]  # (H, W, 3)
    else:
        rgb = np.repeat(np.rint(depth_like(scene, size, seed) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
