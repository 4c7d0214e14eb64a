"""The bucketed latent cache (one shard set per bucket), labels from class folders, and training on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_helpers import tiny_autoencoder
from PIL import Image

from latentdiff.cli import main
from latentdiff.config import build_config
from latentdiff.data.buckets import make_buckets, nearest_bucket
from latentdiff.data.cache import CacheConfig, LatentCache, cache_dataset
from latentdiff.data.folder import image_to_tensor, resize_center_crop
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser

# Image sizes (w, h): wide, square and tall ones, in two class folders.
SHAPES = {"wide": [(64, 32), (90, 40), (60, 31)], "square": [(40, 40), (33, 35), (50, 48), (20, 21)],
          "tall": [(30, 64), (16, 40)]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    rng = np.random.default_rng(0)
    for cls, sizes in SHAPES.items():
        (root / "images" / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / cls / f"{i}.png")
            (root / "images" / cls / f"{i}.txt").write_text(f"a {cls} picture number {i}")
    ae = tiny_autoencoder(root / "ae")
    cfg = CacheConfig(autoencoder=str(root / "ae"), out=str(root / "cache"), data=str(root / "images"),
                      image_size=16, batch_size=3, shard_size=2, buckets=True, bucket_step=4, class_folders=True)
    cache_dataset(cfg, quiet=True)
    return {"root": root, "ae": ae, "cfg": cfg}


def test_every_image_is_in_exactly_one_bucket_at_its_nearest_aspect(setup):
    cache = LatentCache(setup["cfg"].out)
    info = cache.info
    buckets = make_buckets(16 * 16, 4)
    assert info["bucketed"] and info["num_items"] == len(cache) == 9
    keys = [m["key"] for m in cache.meta]
    assert sorted(keys) == sorted(f"{c}/{i}.png" for c, s in SHAPES.items() for i in range(len(s)))
    seen = []
    for b, bucket in enumerate(info["buckets"]):
        h, w = bucket["size"]
        assert bucket["latent_shape"] == [4, h // 2, w // 2] and cache.means[b].shape[1:] == (4, h // 2, w // 2)
        assert all(len(json.loads((cache.folder / f"{s}.json").read_text())) <= 2 for s in bucket["shards"])
        for m in cache.meta[int(cache.offsets[b]): int(cache.offsets[b]) + bucket["num_items"]]:
            oh, ow = m["original_size"]
            assert buckets[nearest_bucket(ow, oh, buckets)] == (h, w)
            seen.append(m["key"])
    assert sorted(seen) == sorted(keys)  # each item listed under exactly one bucket
    assert len(info["buckets"]) >= 3  # wide, square and tall images do not share one bucket
    assert set(info["shards"]) == {s for b in info["buckets"] for s in b["shards"]}


def test_cached_latents_are_the_posterior_of_the_bucket_crop(setup):
    cache = LatentCache(setup["cfg"].out)
    root = setup["root"] / "images"
    for b, bucket in enumerate(cache.info["buckets"]):
        i = int(cache.offsets[b])
        meta = cache.meta[i]
        with Image.open(root / meta["key"]) as im:
            x = image_to_tensor(resize_center_crop(im.convert("RGB"), tuple(bucket["size"])))
        with torch.no_grad():
            post = setup["ae"].encode_posterior(x[None])
        torch.testing.assert_close(cache.means[b][0], post.mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.stds[b][0], post.logvar[0].mul(0.5).exp(), atol=1e-5, rtol=1e-5)


def test_class_labels_and_names_are_stored_with_the_cache(setup):
    cache = LatentCache(setup["cfg"].out)
    assert cache.class_names == ["square", "tall", "wide"]
    labels = {m["key"]: int(label) for m, label in zip(cache.meta, cache.labels)}
    assert all(labels[k] == cache.class_names.index(k.split("/")[0]) for k in labels)


def test_batches_come_from_one_bucket_and_cover_the_cache(setup):
    cache = LatentCache(setup["cfg"].out)
    gen = torch.Generator().manual_seed(0)
    shapes, seen = set(), []
    for step in range(30):
        idx = cache.batch_indices(step, 2, seed=0)
        raw, captions = cache.sample(idx, gen)
        assert raw.shape[0] == len(captions) == len(idx)
        shapes.add(tuple(raw.shape[1:]))
        seen.append(idx)
    assert len(shapes) >= 3  # variable latent sizes from batch to batch
    per_epoch = len(cache._samplers[(2, 0, 0, 1)])
    assert sorted(torch.cat(seen[:per_epoch]).tolist()) == list(range(len(cache)))
    with pytest.raises(ValueError, match="one bucket"):
        cache.sample(torch.arange(len(cache)), gen)
    with pytest.raises(ValueError, match="not divisible by the network's down factor 8"):
        cache.check_divisible(8)


def test_latentdiff_train_on_a_bucketed_cache(setup, tmp_path, capsys):
    main(["train", "--preset", "shapes-test", "--cache", setup["cfg"].out, "--out", str(tmp_path / "run"),
          "--steps", "4", "--set", "sample_every=0", "--set", "batch_size=2"])
    assert (tmp_path / "run" / "model" / "denoiser" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    # A bucket step that the U-Net cannot halve is refused before training starts.
    bad = CacheConfig(**{**setup["cfg"].__dict__, "bucket_step": 2, "out": str(tmp_path / "cache2")})
    cache_dataset(bad, quiet=True)
    cfg = build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None,
                       {"cache": bad.out, "out": str(tmp_path / "run2"), "sample_every": 0})
    with pytest.raises(ValueError, match="not divisible by the network's down factor 2"):
        train_denoiser(cfg)


def test_buckets_refuse_the_built_in_shapes_set(setup, tmp_path):
    cfg = CacheConfig(autoencoder=str(setup["root"] / "ae"), out=str(tmp_path / "c"), data="shapes", num_images=4,
                      image_size=16, buckets=True, bucket_step=4)
    with pytest.raises(ValueError, match="buckets need images of their own size"):
        cache_dataset(cfg, quiet=True)
    with pytest.raises(ValueError, match="multiple of the autoencoder's factor 2"):
        cache_dataset(CacheConfig(**{**cfg.__dict__, "data": str(setup["root"] / "images"), "bucket_step": 3}))


@pytest.mark.parametrize("bucketed", [True, False])
def test_ranks_split_each_global_batch_of_the_cache(setup, tmp_path, bucketed):
    """Two simulated ranks: together they read the single-process global batch; an epoch covers the cache once."""
    if bucketed:  # buckets of one image cannot feed two ranks: refused, naming them
        with pytest.raises(ValueError, match=r"fewer samples than the 2 ranks"):
            LatentCache(setup["cfg"].out).batch_indices(0, 2, seed=5, rank=0, world_size=2)
    # bucketed: one square bucket (max aspect 1) holding all 9 images; or no buckets at all.
    change = {"bucket_max_aspect": 1.0} if bucketed else {"buckets": False}
    cache = LatentCache(cache_dataset(CacheConfig(**{**setup["cfg"].__dict__, **change, "out": str(tmp_path / "c")}),
                                      quiet=True))
    assert cache.bucketed == bucketed and len(cache) == 9
    seen = []
    for step in range(5):
        parts = [cache.batch_indices(step, 2, seed=5, rank=r, world_size=2) for r in range(2)]
        assert all(len(p) >= 1 for p in parts)
        assert len({cache.bucket_of(torch.cat(parts))}) == 1  # both ranks in one bucket at every step
        if not bucketed:  # one process with the global batch reads the same items
            assert torch.equal(torch.cat(parts), cache.batch_indices(step, 4, seed=5))
        seen.append(torch.cat(parts))
    if bucketed:
        steps = len(cache._samplers[(2, 5, 0, 2)])  # 9 items, 3 buckets, global batch 4: at most 5 steps
        assert steps <= 5 and sorted(torch.cat(seen[:steps]).tolist()) == list(range(len(cache)))
