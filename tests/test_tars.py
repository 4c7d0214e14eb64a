"""Webdataset-style tar shards made in the test: grouping by key, captions and labels, damage skipped and named."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from data_helpers import tiny_autoencoder
from PIL import Image

from latentdiff.data.cache import CacheConfig, LatentCache, cache_dataset
from latentdiff.data.tars import TarShards, expand_shards, is_tar_source, split_key


def _png(w: int, h: int, seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tars")
    _write_tar(root / "shard-000000.tar", [
        ("s/0000.jpg", _png(32, 24, 0, "JPEG")), ("s/0000.txt", b"a noisy picture"), ("s/0000.cls", b"1"),
        ("s/0001.png", _png(20, 40, 1)), ("s/0001.json", json.dumps({"caption": "from json", "label": 0}).encode()),
        ("s/0002.jpg", b"\xff\xd8 not really a jpeg"), ("s/0002.txt", b"broken image"), ("s/0002.cls", b"0"),
        ("s/0003.txt", b"a caption without an image"),
        ("s/0004.png", _png(16, 16, 4)), ("s/0004.cls", b"2"),
        ("s/0005.png", _png(4, 4, 5)), ("s/0005.cls", b"2"),
    ])
    _write_tar(root / "shard-000001.tar.gz", [
        ("a.b.png", _png(24, 24, 6)), ("a.b.txt", b"dotted key"), ("a.b.cls", b"0"),  # key "a", ext "b.png"
        ("c.png", _png(24, 24, 7)), ("c.txt", b"second"), ("c.cls", b"1"),
    ], mode="w:gz")
    _write_tar(root / "shard-000002.tar", [(f"{k}.{e}", d) for k in ("x", "y", "z")
                                           for e, d in (("png", _png(24, 24, ord(k))), ("cls", b"1"))])
    data = (root / "shard-000002.tar").read_bytes()
    (root / "shard-000002.tar").write_bytes(data[: data.index(b"z.png") + 700])  # cut inside z.png
    return root


def test_samples_grouped_by_key_with_captions_labels_and_damage_named(shards, capsys):
    ds = TarShards(str(shards), min_size=8)
    items = list(ds)
    got = {it["key"]: (it["caption"], it["label"], it["image"].size) for it in items}
    assert got == {
        "shard-000000.tar:s/0000": ("a noisy picture", 1, (32, 24)),
        "shard-000000.tar:s/0001": ("from json", 0, (20, 40)),
        "shard-000000.tar:s/0004": ("", 2, (16, 16)),
        "shard-000001.tar.gz:a": ("dotted key", 0, (24, 24)),
        "shard-000001.tar.gz:c": ("second", 1, (24, 24)),
        "shard-000002.tar:x": ("", 1, (24, 24)),
        "shard-000002.tar:y": ("", 1, (24, 24)),
    }
    assert all(it["image"].mode == "RGB" for it in items)
    skipped = dict(ds.skipped)
    assert "UnidentifiedImageError" in skipped["shard-000000.tar:s/0002"]
    assert "no image member" in skipped["shard-000000.tar:s/0003"]
    assert "too small" in skipped["shard-000000.tar:s/0005"]
    assert "damaged shard" in skipped[str(shards / "shard-000002.tar")]
    assert "incomplete" in skipped["shard-000002.tar:z"]
    assert ds.missing_captions == 3
    err = capsys.readouterr().err
    assert "skipped shard-000000.tar:s/0002" in err and "3 of 7 sample(s)" in err


def test_streaming_reads_one_shard_after_another(shards):
    it = iter(TarShards(str(shards), verbose=False))
    first = next(it)  # nothing beyond the first shard has been opened yet
    assert first["key"] == "shard-000000.tar:s/0000"


def test_shard_specs_and_key_rules(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="shard-000001.tar$"):
        expand_shards(str(shards / "shard-{000000..000002}.tar"))  # 000001 is a .tar.gz
    assert [p.name for p in expand_shards(str(shards / "shard-{000000..000000}.tar"))] == ["shard-000000.tar"]
    assert [p.name for p in expand_shards(str(shards / "*.tar"))] == ["shard-000000.tar", "shard-000002.tar"]
    assert len(expand_shards(str(shards))) == 3
    with pytest.raises(FileNotFoundError, match="no tar shards"):
        expand_shards(str(tmp_path))
    assert is_tar_source(str(shards)) and is_tar_source("x/s-{0..9}.tar") and not is_tar_source(str(tmp_path))
    assert split_key("dir/0001.seg.JPG") == ("dir/0001", "seg.jpg")
    with pytest.raises(ValueError, match="'empty' or 'filename'"):
        TarShards(str(shards), missing_caption="class")


def test_cache_from_tar_shards(shards, tmp_path):
    tiny_autoencoder(tmp_path / "ae")
    cfg = CacheConfig(autoencoder=str(tmp_path / "ae"), out=str(tmp_path / "cache"), data=str(shards),
                      image_size=16, batch_size=4, missing_caption="filename")
    cache = LatentCache(cache_dataset(cfg, quiet=True))
    assert len(cache) == 7 and cache.mean.shape == (7, 4, 8, 8)
    assert cache.labels.tolist() == [1, 0, 2, 0, 1, 1, 1]
    assert cache.captions[2] == "0004" and cache.captions[5] == "x"  # filename-derived where missing
    bucketed = LatentCache(cache_dataset(CacheConfig(**{**cfg.__dict__, "buckets": True, "bucket_step": 4,
                                                        "out": str(tmp_path / "b")}), quiet=True))
    assert len(bucketed) == 7 and [b["num_items"] for b in bucketed.info["buckets"]] == [1, 5, 1]  # tall, square, wide


def test_check_data_reads_tar_shards(shards):
    from latentdiff.data.health import check_data

    r = check_data(str(shards), min_size=8)
    assert sorted(n for n, _ in r.corrupt) == sorted([
        "shard-000000.tar:s/0002", "shard-000000.tar:s/0003", str(shards / "shard-000002.tar"), "shard-000002.tar:z"])
    assert r.tiny == [("shard-000000.tar:s/0005", 4, 4)]
    assert sorted(r.missing_captions) == ["shard-000000.tar:s/0004", "shard-000000.tar:s/0005",
                                          "shard-000002.tar:x", "shard-000002.tar:y"]
    assert r.files == 12 and sum(r.sizes.values()) == 8 and r.exact_duplicates == []
