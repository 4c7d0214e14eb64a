"""Images held in memory for autoencoder training, from a folder or tar shards: centre crops, random crops, buckets.

The autoencoder trains on pixels (there is no latent cache to stream from), so the images are decoded
once, each to the size it trains at, and kept as uint8 within a memory budget; a data set that does not
fit is refused with what to change. Three ways to bring an image of any size to the training size ``S``:

- ``"center"``: resized (Lanczos) to cover ``S x S`` and centre-cropped, as ``latentdiff cache`` does;
- ``"random"``: resized so the shorter side is ``S`` (aspect kept) and, every step, an ``S x S`` window at an
  offset drawn from the sample's own generator, so a resumed run crops exactly what an uninterrupted one would;
- buckets: each image resize-cropped to its nearest aspect-ratio bucket (``data.buckets``), items numbered
  bucket after bucket, and every batch drawn from one bucket by ``BucketBatches`` (as the latent cache does).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from latentdiff.data.buckets import BucketBatches, batch_indices, make_buckets, nearest_bucket
from latentdiff.data.folder import resize_center_crop

CROPS = ("center", "random")


def shorter_side_to(image: Image.Image, side: int) -> Image.Image:
    """Resize (Lanczos) so the shorter side is ``side``, keeping the aspect ratio."""
    w, h = image.size
    scale = side / min(w, h)
    return image.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.LANCZOS)


def to_uint8_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def same_shape_batches(images: Sequence[Tensor], batch_size: int) -> list[Tensor]:
    """Consecutive images of one shape stacked into batches of at most ``batch_size``."""
    out: list[list[Tensor]] = []
    for image in images:
        if out and len(out[-1]) < batch_size and out[-1][0].shape == image.shape:
            out[-1].append(image)
        else:
            out.append([image])
    return [torch.stack(b) for b in out]


class PixelSet:
    """Decoded training images: ``batch(indices, generators)`` gives (B, 3, H, W) in [-1, 1], one shape per batch.

    ``len`` and ``[i]["image"]`` work as for the other data sets (an item at its stored size: ``S x S``
    centred for random crops), so previews and latent statistics read it the same way.
    """

    def __init__(self, items: Iterable[dict], size: int, crop: str = "center",
                 buckets: list[tuple[int, int]] | None = None, budget_gib: float = 2.0, source: str = "the data"):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if buckets is not None and crop != "center":
            raise ValueError("buckets resize each image to its bucket: use crop = 'center' with buckets = true")
        self.size, self.crop, self.buckets = size, crop, buckets
        groups: dict[int, list[Tensor]] = {}
        total = 0
        for item in items:
            image = item["image"]
            if not isinstance(image, Image.Image):
                raise TypeError(f"random crops and buckets need PIL images of their own size (a folder or tar "
                                f"shards), not {type(image).__name__} from {source}: set crop = 'center', buckets = false")
            b = nearest_bucket(*image.size, buckets) if buckets is not None else 0
            if buckets is not None:
                image = resize_center_crop(image, buckets[b])
            else:
                image = resize_center_crop(image, size) if crop == "center" else shorter_side_to(image, size)
            pixels = to_uint8_tensor(image)
            total += pixels.numel()
            if total > budget_gib * 2**30:
                raise ValueError(f"the images of {source} take more than preload_gib = {budget_gib} GiB decoded at "
                                 f"{size} px; autoencoder training keeps them in memory: raise preload_gib, lower "
                                 "image_size, or train on a subset of the shards")
            groups.setdefault(b, []).append(pixels)
        if not groups:
            raise ValueError(f"no usable images in {source}")
        order = sorted(groups)  # bucket index order, as the latent cache stores them
        self.bucket_sizes = [buckets[b] if buckets is not None else (size, size) for b in order]
        self.items = [im for b in order for im in groups[b]]  # (3, h, w) uint8 each
        self.sizes = [len(groups[b]) for b in order]
        self.offsets = torch.tensor([0] + self.sizes[:-1]).cumsum(0)
        self._order: BucketBatches | None = None  # the bucketed batch order, made for the first batch size asked

    @property
    def bucketed(self) -> bool:
        return self.buckets is not None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._crop(self.items[index], None).float().div(127.5).sub(1.0)}

    def _crop(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        """The ``S x S`` window of a random-crop item (centred without a generator); other items as stored."""
        if self.crop != "random":
            return image
        h, w = image.shape[-2:]
        s = self.size
        if generator is None:
            top, left = (h - s) // 2, (w - s) // 2
        else:
            top = int(torch.randint(h - s + 1, (1,), generator=generator))
            left = int(torch.randint(w - s + 1, (1,), generator=generator))
        return image[:, top:top + s, left:left + s]

    def batch(self, indices: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """Images of ``indices`` as float (B, 3, H, W) in [-1, 1]; random crops drawn from ``generators``."""
        gens = generators or [None] * len(indices)
        crops = [self._crop(self.items[i], g) for i, g in zip(indices.tolist(), gens)]
        shapes = {c.shape for c in crops}
        if len(shapes) != 1:
            raise ValueError(f"a batch must hold images of one shape (one bucket); got {sorted(shapes)}")
        return torch.stack(crops).float().div(127.5).sub(1.0)

    def batch_indices(self, step: int, batch_size: int, seed: int) -> Tensor:
        """The global batch of ``step``: a pure function of (seed, step); from one bucket when bucketed."""
        if not self.bucketed:
            return batch_indices(step, batch_size, len(self), seed)
        if self._order is None or (self._order.batch_size, self._order.seed) != (batch_size, seed):
            self._order = BucketBatches(self.sizes, batch_size, seed)
        return self._order.global_batch(step)


def uses_pixel_set(data: str, crop: str, buckets: bool) -> bool:
    """Whether autoencoder training reads ``data`` through a :class:`PixelSet` (tar shards, random crops, buckets)."""
    from latentdiff.data.tars import is_tar_source

    return data not in ("shapes", "skimage") and (is_tar_source(data) or crop != "center" or buckets)


def open_pixel_set(data: str, size: int, *, crop: str = "center", buckets: bool = False, bucket_area: int = 0,
                   bucket_step: int = 8, bucket_max_aspect: float = 4.0, min_size: int = 8, budget_gib: float = 2.0,
                   quiet: bool = False) -> PixelSet:
    """A folder of images or tar shards decoded for autoencoder training (see the module docstring)."""
    from tqdm import tqdm

    from latentdiff.data.folder import ImageFolder, print_skipped
    from latentdiff.data.tars import TarShards, is_tar_source

    if data in ("shapes", "skimage"):
        raise ValueError(f"random crops and buckets need images of their own size (a folder or tar shards), not the "
                         f"built-in {data!r} set: set crop = 'center' and buckets = false")
    if is_tar_source(data):
        source = TarShards(data, min_size=min_size, verbose=not quiet)
        items = iter(source)
    else:
        source = ImageFolder(data, size, min_size=min_size, verbose=not quiet)
        items = (source.record(i) for i in range(len(source)))
    sizes = make_buckets(bucket_area or size * size, bucket_step, bucket_max_aspect) if buckets else None
    progress = tqdm(items, desc=f"decoding {Path(data).name}", disable=quiet or not sys.stderr.isatty(),
                    file=sys.stderr)  # a bar on a terminal; nothing in a log file
    try:
        return PixelSet(progress, size, crop, sizes, budget_gib, source=data)
    finally:
        if quiet:  # quiet silences progress, never which files were left out
            print_skipped(source.skipped, data)
