"""A judge for `shapes` images, no learned model: reads shapes, colours, sizes and positions back from pixels.

Background = the median border colour. Each pixel is unmixed against every named colour
(pixel = background + alpha * (colour - background)); pixels with alpha >= 0.5 are foreground, so a blurred
edge is cut at half coverage. Connected foreground components (4-neighbour, labelled with numpy) are the
objects; specks are dropped. Per object: colour = nearest named colour of the mean of its core pixels;
shape = nearest prototype in (bounding-box fill, share of area in the upper half); size from the area;
position from the centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latentdiff.data.shapes import (
    BACKGROUNDS,
    COLORS,
    SIZE_RADIUS,
    Scene,
    ShapeObject,
    ShapesDataset,
)

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], np.float64)  # (K, 3)
_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_PALETTE = np.array([BACKGROUNDS[b] for b in _BACKGROUND_NAMES], np.float64)

# Shape prototypes: (fill of the bounding box, share of the area in the box's upper half).
SHAPE_PROTOTYPES = {
    "circle": (np.pi / 4, 0.5),
    "square": (0.97, 0.5),
    "triangle": (0.5, 0.25),
}  # square: a pixel grid rounds its corners
SHAPE_WEIGHTS = np.array([1.0, 4.0])  # the upper-half share survives blur better than the fill
RAMP = 0.2  # alpha below this reads as 0 and above 1 - RAMP as 1 when measuring an object
SIZE_THRESHOLD = float(np.sqrt(SIZE_RADIUS["small"] * SIZE_RADIUS["large"]))  # half-size, canvas fraction
CENTER_THRESHOLD = 0.15  # a centroid this close to the middle (in x and y, canvas fraction) is "center"
MIN_AREA = 0.004  # components below this share of the canvas are specks (a small triangle is ~0.013)


@dataclass
class Detection:
    """One object read from an image, with the measurements behind each reading."""

    shape: str  # nearest of SHAPE_PROTOTYPES
    color: str  # nearest named colour of the core pixels' mean
    size: str  # "small" or "large"
    position: str  # region of the centroid
    area: float  # soft area (sum of alpha), canvas fraction
    centroid: tuple[float, float]  # (x, y), canvas fraction, y down
    fill: float  # soft area / soft bounding-box area
    upper: float  # share of the area above the bounding box's middle
    rgb: tuple[float, float, float]  # mean colour of the core pixels

    def as_object(self) -> ShapeObject:
        """The reading as a ShapeObject."""
        return ShapeObject(self.shape, self.color, self.size, self.position)


def _as_uint8_image(image) -> np.ndarray:
    """Accept uint8 (H, W, 3), float tensor (3, H, W) in [-1, 1], or a PIL image; return float (H, W, 3) 0..255."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        return (
            ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5)
            .permute(1, 2, 0)
            .numpy()
            .astype(np.float64)
        )
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a numpy image must be (H, W, 3), got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(
            f"a numpy image must be uint8 0..255, got {array.dtype} (pass floats as a torch tensor)"
        )
    return array.astype(np.float64)


def _label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask (0 = background, 1..n), by min-label propagation."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        new = np.where(mask, neighbours, big)
        # Pointer jumping: take the label of the pixel our label names (same component, smaller or equal).
        jumped = new.ravel()[np.minimum(new, h * w) - 1]
        new = np.where(mask, np.minimum(new, jumped), big)
        if np.array_equal(new, labels):
            break
        labels = new
    values, dense = np.unique(np.where(mask, labels, 0), return_inverse=True)
    return dense.reshape(h, w) + (values[0] != 0)  # 0 stays background, components become 1..n


def _palette(colors: dict[str, tuple[int, int, int]] | None) -> tuple[tuple[str, ...], np.ndarray]:
    """Names and (K, 3) RGB of the colours a judge reads (default: the data set's COLORS)."""
    if colors is None:
        return _COLOR_NAMES, _PALETTE
    return tuple(colors), np.array(list(colors.values()), np.float64)


def _unmix(pixels: np.ndarray, background: np.ndarray, palette: np.ndarray = _PALETTE) -> np.ndarray:
    """Per pixel, alpha in pixel = background + alpha * (colour - background) for the best-fitting named colour."""
    offset = pixels - background  # (H, W, 3)
    direction = palette - background  # (K, 3)
    norm2 = np.maximum((direction**2).sum(-1), 1e-6)  # (K,)
    alpha = np.clip(offset @ direction.T / norm2, 0.0, 1.0)  # (H, W, K)
    residual = ((offset[..., None, :] - alpha[..., None] * direction) ** 2).sum(-1)  # (H, W, K)
    best = residual.argmin(-1)  # (H, W)
    return np.take_along_axis(alpha, best[..., None], -1)[..., 0]


def _position(x: float, y: float) -> str:
    """Region of a centroid in canvas fractions."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < CENTER_THRESHOLD:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def detect(image, colors: dict[str, tuple[int, int, int]] | None = None) -> tuple[str, list[Detection]]:
    """Background name and the objects found in one image; ``colors``: the named colours to read (default
    COLORS; e.g. ``shapes.ALL_COLORS`` to read the extra colours too)."""
    names, palette = _palette(colors)
    pixels = _as_uint8_image(image)
    h, w, _ = pixels.shape
    if min(h, w) < 16:
        raise ValueError(f"image must be at least 16x16 pixels, got {h}x{w}")
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    background = np.median(border, axis=0)
    background_name = _BACKGROUND_NAMES[int(((_BACKGROUND_PALETTE - background) ** 2).sum(-1).argmin())]

    alpha = _unmix(pixels, background, palette)  # (H, W) in [0, 1]
    labels = _label_components(alpha >= 0.5)
    # Grow each component by one pixel so its soft edge (alpha < 0.5) counts toward its area and extent.
    padded = np.pad(labels, 1)
    grown = np.where(
        labels > 0,
        labels,
        np.maximum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]),
    )

    detections = []
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    canvas = float(h * w)
    for k in range(1, int(labels.max()) + 1):
        core_mask = labels == k
        if core_mask.sum() < max(4.0, MIN_AREA * canvas):
            continue
        # Soft coverage of this object; the ramp zeroes faint noise and saturates the interior, and keeps
        # 0.5 at 0.5 so straight blurred edges stay where they were.
        a = np.where(grown == k, np.clip((alpha - RAMP) / (1 - 2 * RAMP), 0.0, 1.0), 0.0)  # (H, W)
        area = a.sum()
        cx, cy = (a * xs).sum() / area, (a * ys).sum() / area
        width, height = a.max(axis=0).sum(), a.max(axis=1).sum()  # soft extents
        fill = area / max(width * height, 1e-6)
        rows = np.nonzero(a.max(axis=1) > 0)[0]
        top = rows[0] + (1 - a[rows[0]].max())  # soft top edge, in pixels
        middle = top + height / 2
        row_mass = a.sum(axis=1)
        upper = (row_mass * np.clip(middle - np.arange(h), 0, 1)).sum() / area
        feature = np.array([fill, upper])
        shape = min(
            SHAPE_PROTOTYPES, key=lambda s: np.sum(SHAPE_WEIGHTS * (feature - SHAPE_PROTOTYPES[s]) ** 2)
        )
        # Colour: mean of the object's most opaque pixels, nearest named colour.
        core = a >= max(0.5, np.quantile(a[core_mask], 0.5))
        rgb = pixels[core].mean(0)
        color = names[int(((palette - rgb) ** 2).sum(-1).argmin())]
        # Size: half-size of the shape whose area this is, relative to the canvas side.
        half = np.sqrt(area / (4 * SHAPE_PROTOTYPES[shape][0])) / np.sqrt(canvas)
        size = "small" if half < SIZE_THRESHOLD else "large"
        detections.append(
            Detection(
                shape=shape,
                color=color,
                size=size,
                position=_position(cx / w, cy / h),
                area=area / canvas,
                centroid=(cx / w, cy / h),
                fill=float(fill),
                upper=float(upper),
                rgb=tuple(float(v) for v in rgb),
            )
        )
    return background_name, detections


def judge(image, colors: dict[str, tuple[int, int, int]] | None = None) -> Scene:
    """Read a Scene back from an image: uint8 (H, W, 3), float tensor (3, H, W) in [-1, 1], or PIL (``colors``:
    as ``detect``)."""
    background, detections = detect(image, colors)
    return Scene(tuple(d.as_object() for d in detections), background)


_ATTRIBUTES = ("color", "shape", "size", "position")


def _match(target: tuple[ShapeObject, ...], predicted: tuple[ShapeObject, ...]) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of target to predicted objects by number of agreeing attributes."""
    agree = [
        (sum(getattr(t, a) is not None and getattr(t, a) == getattr(p, a) for a in _ATTRIBUTES), -i, -j)
        for i, t in enumerate(target)
        for j, p in enumerate(predicted)
    ]
    pairs, used_t, used_p = [], set(), set()
    for _, i, j in sorted(agree, reverse=True):  # most agreement first, then by index
        if -i not in used_t and -j not in used_p:
            pairs.append((-i, -j))
            used_t.add(-i)
            used_p.add(-j)
    return pairs


def score(images, scenes, colors: dict[str, tuple[int, int, int]] | None = None) -> dict:
    """Judge images against target scenes; per-attribute accuracy in [0, 1], plus n.

    color / shape / size / position: share of target objects (with that attribute stated) read correctly,
    an unmatched target object counting as wrong; count: share of images with the right number of objects;
    background: share of images (with a stated background) read correctly; all_correct: share of images
    right on everything stated; objects_correct: share of target objects right on every stated attribute
    (per-object accuracy, for scenes of several objects). Attributes a target leaves unstated (None) are not scored.
    ``colors``: the named colours the judge reads (default COLORS).
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    images, scenes = list(images), list(scenes)
    if len(images) != len(scenes):
        raise ValueError(f"got {len(images)} images but {len(scenes)} scenes")
    if not images:
        raise ValueError("score needs at least one image")
    hits = {a: 0 for a in _ATTRIBUTES}
    totals = {a: 0 for a in _ATTRIBUTES}
    count_hits = background_hits = background_total = all_hits = objects_hits = objects_total = 0
    for image, target in zip(images, scenes):
        predicted = judge(image, colors)
        right = len(predicted.objects) == len(target.objects)
        count_hits += right
        if target.background is not None:
            background_total += 1
            background_hits += predicted.background == target.background
            right &= predicted.background == target.background
        matched = dict(_match(target.objects, predicted.objects))
        for i, t in enumerate(target.objects):
            p = predicted.objects[matched[i]] if i in matched else None
            objects_total += 1
            objects_hits += p is not None and all(getattr(t, a) in (None, getattr(p, a)) for a in _ATTRIBUTES)
            for a in _ATTRIBUTES:
                if getattr(t, a) is None:
                    continue
                ok = p is not None and getattr(p, a) == getattr(t, a)
                totals[a] += 1
                hits[a] += ok
                right &= ok
        all_hits += right
    n = len(images)
    out = {a: hits[a] / totals[a] if totals[a] else float("nan") for a in _ATTRIBUTES}
    out["count"] = count_hits / n
    out["background"] = background_hits / background_total if background_total else float("nan")
    out["all_correct"] = all_hits / n
    out["objects_correct"] = objects_hits / objects_total if objects_total else float("nan")
    out["n"] = n
    return out


def validate(n: int = 500, size: int = 64, seed: int = 0, max_objects: int = 3, split: str = "train") -> dict:
    """The judge's accuracy on rendered ground truth (ShapesDataset images against their own scenes)."""
    data = ShapesDataset(n, size=size, seed=seed, split=split, max_objects=max_objects)
    items = [data[i] for i in range(n)]
    return score([item["image"] for item in items], [item["scene"] for item in items])
