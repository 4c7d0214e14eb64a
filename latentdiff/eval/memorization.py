"""Memorization and duplicates: nearest training images of generated samples, near-copies, duplicate pairs.

Latent diffusion models can reproduce training images (Carlini et al. 2023; Somepalli et al. 2023).
Here that is measured, in pixel space or in any feature space:

- ``nearest_training``: for each generated sample, its nearest training images and the distances.
- ``memorization``: flags a sample as a near-copy when it is closer to a training image than almost every
  fresh real image is: the threshold is the ``quantile`` (default 1%) of the nearest-training distances of
  held-out real images of the same distribution, so a model that does not copy flags about that share,
  and one that copies flags far more. A fixed ``threshold`` can be given instead.
- ``find_duplicates``: pairs of a data set closer than a threshold (pixel RMSE on a 0..1 scale by default).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from latentdiff.eval.metrics import _sq_distances, as_features

DUPLICATE_RMSE = 0.02  # pixel RMSE on a 0..1 scale (about 5 of 255 levels): a near-duplicate


def pixels(images: Tensor, size: int | None = None) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, 3*H*W) in [0, 1], area-resized to size x size when given."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return x.flatten(1).double().numpy()


def nearest_training(queries, training, k: int = 1, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Distances (N, k) and indices (N, k) of each query's k nearest training points, nearest first."""
    q, t = as_features(queries, "queries"), as_features(training, "training features")
    if q.shape[1] != t.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions but training features {t.shape[1]}; "
                         "use one feature space (or one image size) for both")
    if not 1 <= k <= len(t):
        raise ValueError(f"k must be in 1..{len(t)} (the training set size), got {k}")
    dist, idx = np.empty((len(q), k)), np.empty((len(q), k), np.int64)
    for start in range(0, len(q), chunk):
        d = _sq_distances(q[start:start + chunk], t)  # (c, M)
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < len(t) else np.tile(np.arange(len(t)), (len(d), 1))
        order = np.take_along_axis(d, part, 1).argsort(1)
        best = np.take_along_axis(part, order, 1)
        idx[start:start + chunk] = best
        dist[start:start + chunk] = np.sqrt(np.take_along_axis(d, best, 1))
    return dist, idx


def memorization(generated, training, fresh_real=None, *, quantile: float = 0.01,
                 threshold: float | None = None, space: str = "features") -> dict:
    """Nearest training image of every generated sample, and which ones are near-copies.

    ``fresh_real``: real images of the training distribution that are not in the training set; the
    threshold is the ``quantile`` of their nearest-training distances. Or pass ``threshold`` directly.
    """
    if threshold is None:
        if fresh_real is None:
            raise ValueError("memorization needs fresh_real (held-out real samples, to calibrate the near-copy "
                             "threshold) or an explicit threshold")
        fresh = as_features(fresh_real, "fresh real features")
        need = int(np.ceil(1 / quantile)) if quantile > 0 else 1
        if len(fresh) < need:
            raise ValueError(f"calibrating a {quantile:.0%} quantile needs at least {need} fresh real samples, "
                             f"got {len(fresh)}")
        fresh_d, _ = nearest_training(fresh, training)
        threshold = float(np.quantile(fresh_d[:, 0], quantile))
        rule = f"nearest-training distance below the {quantile:.1%} quantile of {len(fresh)} fresh real samples'"
    else:
        rule = "nearest-training distance below the given threshold"
    dist, idx = nearest_training(generated, training)
    flagged = dist[:, 0] <= threshold
    return {
        "space": space, "rule": rule, "threshold": threshold,
        "expected_rate_without_copying": quantile if fresh_real is not None else None,
        "near_copy_rate": float(flagged.mean()), "near_copies": [int(i) for i in np.nonzero(flagged)[0]],
        "nearest_index": [int(i) for i in idx[:, 0]], "nearest_distance": [float(d) for d in dist[:, 0]],
        "distance_median": float(np.median(dist[:, 0])), "n": len(dist),
    }


def find_duplicates(features, threshold: float | None = None, chunk: int = 1024, rmse: bool = True) -> dict:
    """Pairs (i < j) of one set closer than ``threshold``, and the groups they form.

    With ``rmse`` (pixel rows from :func:`pixels`), distances are root-mean-square per value, and the
    default threshold is ``DUPLICATE_RMSE``; otherwise plain Euclidean distances and a threshold is required.
    """
    x = as_features(features)
    if threshold is None:
        if not rmse:
            raise ValueError("find_duplicates in a feature space needs an explicit threshold")
        threshold = DUPLICATE_RMSE
    scale = np.sqrt(x.shape[1]) if rmse else 1.0
    pairs = []
    for start in range(0, len(x), chunk):
        d = np.sqrt(_sq_distances(x[start:start + chunk], x)) / scale  # (c, N)
        rows, cols = np.nonzero(d <= threshold)
        for r, c in zip(rows + start, cols):
            if r < c:
                pairs.append((int(r), int(c), float(d[r - start, c])))
    parent = list(range(len(x)))  # union-find over the pairs

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in sorted({i for p in pairs for i in p[:2]}):
        groups.setdefault(root(i), []).append(i)
    return {"threshold": threshold, "metric": "pixel RMSE (0..1)" if rmse else "euclidean", "n": len(x),
            "pairs": pairs, "groups": sorted(groups.values()), "duplicate_images": sum(len(g) - 1 for g in groups.values())}
