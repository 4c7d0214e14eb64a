"""Aspect-ratio buckets: the bucket set, nearest-aspect assignment, and the DDP-aware batch order (ranks simulated)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from latentdiff.data.buckets import BucketBatches, make_buckets, most_square, nearest_bucket


def test_bucket_set_for_a_target_area_and_step():
    buckets = make_buckets(1024 * 1024, 64, max_aspect=4.0)
    assert len(set(buckets)) == len(buckets)
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert h * w <= 1024 * 1024
        assert max(h / w, w / h) <= 4.0
        assert (w, h) in buckets  # every landscape bucket has its portrait twin
        # As close to the area as the step allows: one more step of height would not fit.
        assert (h + 64) * w > 1024 * 1024 or (w + 64) * h > 1024 * 1024
    assert (1024, 1024) in buckets and buckets[most_square(buckets)] == (1024, 1024)
    # SDXL's published training buckets at this area and step are in the set.
    assert {(896, 1152), (832, 1216), (768, 1344), (640, 1536)} <= set(buckets)
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects)
    with pytest.raises(ValueError, match="at least one step x step"):
        make_buckets(100, 16)


def test_each_image_goes_to_the_bucket_of_nearest_aspect():
    buckets = make_buckets(64 * 64, 16)
    for h, w in buckets:  # an image with a bucket's exact aspect goes to a bucket of that aspect
        got = buckets[nearest_bucket(w * 3, h * 3, buckets)]
        assert got[1] * h == got[0] * w
    for w, h in [(3000, 200), (200, 3000), (640, 480), (480, 640), (1000, 1001)]:
        i = nearest_bucket(w, h, buckets)
        dist = [abs(math.log((bw / bh) / (w / h))) for bh, bw in buckets]
        assert dist[i] == min(dist)
    assert buckets[nearest_bucket(640, 480, buckets)] == buckets[::-1][nearest_bucket(480, 640, buckets[::-1])][::-1]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_every_sample_once_per_epoch_across_ranks_each_batch_from_one_bucket(world_size, batch_size):
    sizes = [37, 4, 0, 16, 5, 130]  # awkward counts: primes, fewer than a batch, an empty bucket
    ranks = [BucketBatches(sizes, batch_size, seed=3, world_size=world_size, rank=r) for r in range(world_size)]
    steps = len(ranks[0])
    assert all(len(s) == steps for s in ranks)  # every rank takes the same number of steps: no DDP hang
    for epoch in range(2):
        seen = Counter()
        for step in range(epoch * steps, (epoch + 1) * steps):
            parts = [s(step) for s in ranks]
            glob = ranks[0].global_batch(step)
            assert torch.equal(torch.cat(parts), glob)  # rank r holds the r-th slice of the global batch
            assert all(len(p) >= 1 for p in parts) and max(map(len, parts)) - min(map(len, parts)) <= 1
            assert len({ranks[0].bucket_of(int(i)) for i in glob}) == 1  # one bucket per batch
            seen.update(glob.tolist())
        assert sorted(seen) == list(range(sum(sizes))) and set(seen.values()) == {1}
    # A bucket of n samples gives ceil(n / global batch) batches (fewer only where ranks would idle).
    assert steps <= sum(-(-n // (batch_size * world_size)) for n in sizes)


def test_order_is_a_pure_function_of_seed_and_step():
    a, b = BucketBatches([10, 7, 20], 4, seed=1), BucketBatches([10, 7, 20], 4, seed=1)
    steps = len(a)
    order = [a(s).tolist() for s in range(3 * steps)]
    assert [b(s).tolist() for s in reversed(range(3 * steps))][::-1] == order  # any access order, same batches
    assert order[:steps] != order[steps: 2 * steps]  # reshuffled each epoch
    assert [BucketBatches([10, 7, 20], 4, seed=2)(s).tolist() for s in range(steps)] != order[:steps]


def test_a_bucket_smaller_than_the_number_of_ranks_is_refused():
    with pytest.raises(ValueError, match=r"\(1, 3\).*fewer samples than the 4 ranks"):
        BucketBatches([10, 3], 2, seed=0, world_size=4, rank=0)
    with pytest.raises(ValueError, match="rank"):
        BucketBatches([10], 2, seed=0, world_size=2, rank=2)
