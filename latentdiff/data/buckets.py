"""Aspect-ratio buckets (as in kohya's trainers and SDXL): images trained at their own shape, batches from one bucket.

A bucket set covers the aspect ratios from ``1 / max_aspect`` to ``max_aspect`` with sizes (H, W) that
are multiples of ``step`` and hold at most ``area`` pixels, as close to it as the step allows. Each
image goes to the bucket whose aspect ratio is nearest in log space (so 2:1 and 1:2 are equally far
from 1:1) and is resized to cover it and centre-cropped.

Batches come from :class:`BucketBatches`: per epoch, every bucket is shuffled and cut into global
batches, the batches of all buckets are shuffled together, and under DDP rank ``r`` takes its slice of
each global batch. The order is a pure function of (seed, epoch), so a resumed run reads what an
uninterrupted one would, and every sample is read exactly once per epoch across all ranks. Without buckets
the order is ``batch_indices``: a fresh seeded permutation per epoch.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> Tensor:
    """The data indices of ``step``: each epoch is a fresh seeded permutation, so a resumed run
    reads exactly what an uninterrupted one would."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // n, positions % n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out


def make_buckets(area: int, step: int, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """Bucket sizes (height, width), multiples of ``step``, at most ``area`` pixels, sorted by aspect (W / H)."""
    if step < 1 or area < step * step:
        raise ValueError(f"bucket area {area} must hold at least one step x step square (step {step})")
    if max_aspect < 1:
        raise ValueError(f"bucket max_aspect must be >= 1, got {max_aspect}")
    sizes = set()
    for width in range(step, area // step + 1, step):
        height = (area // width) // step * step  # the tallest bucket of this width within the area
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes, key=lambda hw: (hw[1] / hw[0], hw[0] * hw[1]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``width / height`` (in log space; ties: larger area)."""
    target = math.log(width / height)
    return min(range(len(buckets)),
               key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - target), -buckets[i][0] * buckets[i][1]))


def most_square(buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket nearest 1:1 (the size sample grids are drawn at)."""
    return nearest_bucket(1, 1, buckets)


class BucketBatches:
    """The batch order over bucketed data: each batch from one bucket, each sample once per epoch, DDP-aware.

    ``bucket_sizes[b]`` samples of bucket ``b`` have the global indices ``offsets[b] ..
    offsets[b] + bucket_sizes[b] - 1`` (buckets stored one after another). A global batch holds
    ``batch_size * world_size`` samples; a bucket of ``n`` samples gives ``ceil(n / global)`` batches of
    near-equal size (never fewer samples than ranks, so no rank idles), and rank ``r`` takes the
    ``r``-th of ``world_size`` near-equal slices. Every rank sees the same number of steps per epoch.
    """

    def __init__(self, bucket_sizes: list[int], batch_size: int, seed: int, world_size: int = 1, rank: int = 0):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        small = [(b, n) for b, n in enumerate(bucket_sizes) if 0 < n < world_size]
        if small:
            raise ValueError(
                f"bucket(s) {small} (index, samples) hold fewer samples than the {world_size} ranks, so some rank "
                "would get an empty batch: re-cache with fewer buckets (a larger bucket_step or a smaller "
                "bucket_max_aspect), or train on fewer ranks")
        if sum(bucket_sizes) == 0:
            raise ValueError("no samples in any bucket")
        self.sizes = list(bucket_sizes)
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.batch_size, self.seed, self.world_size, self.rank = batch_size, seed, world_size, rank
        global_size = batch_size * world_size
        # Batches per bucket: ceil(n / global), but never so many that a batch has fewer samples than ranks.
        self.batches_per_bucket = [max(1, min(-(-n // global_size), n // world_size)) if n else 0 for n in self.sizes]
        self.batches_per_epoch = sum(self.batches_per_bucket)

    def __len__(self) -> int:
        return self.batches_per_epoch

    @lru_cache(maxsize=2)  # noqa: B019 -- the sampler lives as long as the run; two epochs are enough
    def epoch(self, epoch: int) -> list[Tensor]:
        """The global batches of ``epoch`` in order (global indices), the same on every rank."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for offset, n, k in zip(self.offsets, self.sizes, self.batches_per_bucket):
            if n:
                perm = torch.randperm(n, generator=gen) + offset
                batches.extend(torch.tensor_split(perm, k))
        order = torch.randperm(len(batches), generator=gen).tolist()
        return [batches[i] for i in order]

    def global_batch(self, step: int) -> Tensor:
        """Every rank's samples of training step ``step`` (global indices)."""
        epoch, position = divmod(step, self.batches_per_epoch)
        return self.epoch(epoch)[position]

    def __call__(self, step: int) -> Tensor:
        """This rank's samples of training step ``step``."""
        return torch.tensor_split(self.global_batch(step), self.world_size)[self.rank]

    def bucket_of(self, index: int) -> int:
        """The bucket holding global index ``index``."""
        for b in range(len(self.sizes) - 1, -1, -1):
            if index >= self.offsets[b]:
                return b
        raise IndexError(index)
