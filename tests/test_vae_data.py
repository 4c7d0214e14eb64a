"""`latentdiff train-vae` on tar shards, with random crops and with aspect-ratio buckets (data/pixels.py)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import main
from latentdiff.data.buckets import make_buckets, nearest_bucket
from latentdiff.data.folder import image_to_tensor, resize_center_crop
from latentdiff.data.pixels import PixelSet, open_pixel_set, shorter_side_to, uses_pixel_set
from latentdiff.train.distributed import sample_generators

SIZES = [(32, 24), (20, 40), (48, 16), (24, 24), (40, 30), (16, 44)]  # (w, h): wide, tall, square


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two webdataset shards of 6 images each, of the sizes above, with captions."""
    root = tmp_path_factory.mktemp("vae_tars")
    for s in range(2):
        with tarfile.open(root / f"part-{s:03d}.tar", "w") as tar:
            for i, (w, h) in enumerate(SIZES):
                for name, data in ((f"{s}{i:03d}.png", _png(_image(w, h, 10 * s + i))),
                                   (f"{s}{i:03d}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def _items(n=6):
    return [{"image": _image(w, h, i)} for i, (w, h) in enumerate(SIZES[:n])]


def test_center_and_random_crops():
    centre = PixelSet(_items(), 16, "center")
    for i, item in enumerate(_items()):
        assert torch.allclose(centre[i]["image"], image_to_tensor(resize_center_crop(item["image"], 16)), atol=1e-6)
    rand = PixelSet(_items(), 16, "random")
    idx = torch.arange(6)
    a = rand.batch(idx, sample_generators(0, 5, idx))
    b = rand.batch(idx, sample_generators(0, 5, idx))
    c = rand.batch(idx, sample_generators(0, 6, idx))
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)  # a pure function of the step
    # Each crop is a window of the image resized to a 16-pixel shorter side, at the offset its generator drew.
    for i, item in enumerate(_items()):
        full = image_to_tensor(shorter_side_to(item["image"], 16))
        g = sample_generators(0, 5, idx)[i]
        h, w = full.shape[-2:]
        top, left = int(torch.randint(h - 15, (1,), generator=g)), int(torch.randint(w - 15, (1,), generator=g))
        assert torch.allclose(a[i], full[:, top:top + 16, left:left + 16], atol=1e-6)


def test_buckets_put_every_image_in_its_nearest_bucket_and_batch_by_bucket():
    buckets = make_buckets(32 * 32, 16, 4.0)
    data = PixelSet(_items(), 32, buckets=buckets)
    want = sorted(buckets[nearest_bucket(w, h, buckets)] for w, h in SIZES)
    assert sorted(tuple(data[i]["image"].shape[-2:]) for i in range(len(data))) == want
    seen = []
    order = [data.batch_indices(step, 2, seed=3) for step in range(12)]
    per_epoch = data._order.batches_per_epoch
    for batch in order[:per_epoch]:
        assert data.batch(batch).shape[0] == len(batch)  # one shape per batch, or batch() refuses
        seen += batch.tolist()
    assert sorted(seen) == list(range(6))  # every image once per epoch
    with pytest.raises(ValueError, match="use crop = 'center' with buckets"):
        PixelSet(_items(), 32, "random", buckets=buckets)


def test_refusals():
    assert not uses_pixel_set("shapes", "center", False) and uses_pixel_set("photos/", "random", False)
    with pytest.raises(ValueError, match="need images of their own size"):
        open_pixel_set("shapes", 16, crop="random")
    with pytest.raises(ValueError, match="raise preload_gib"):
        PixelSet(_items(), 16, budget_gib=1e-6, source="x")
    with pytest.raises(ValueError, match="crop must be one of"):
        PixelSet(_items(), 16, "middle")


@pytest.mark.parametrize("extra", [[], ["--set", "crop=random"],
                                   ["--set", "buckets=true", "--set", "bucket_area=1024", "--set", "bucket_step=16"]])
def test_train_vae_reads_tar_shards(shards, tmp_path, capsys, extra):
    out = tmp_path / "run"
    main(["train-vae", "--preset", "shapes-test", "--data", str(shards), "--out", str(out), "--set", "image_size=16",
          "--set", "tensorboard=false", "--set", "stats_images=12", *extra])
    assert (out / "autoencoder" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert str(out / "autoencoder") in capsys.readouterr().out


def test_random_crops_resume_exactly(shards, tmp_path):
    """Killed after step 2 and resumed: the same weights as the uninterrupted run (crops are per-sample draws)."""
    import shutil

    from safetensors.torch import load_file

    args = ["--preset", "shapes-test", "--data", str(shards), "--set", "image_size=16", "--set", "tensorboard=false",
            "--set", "crop=random", "--set", "lr_schedule=constant", "--set", "stats_images=4", "--steps", "3"]
    main(["train-vae", *args, "--out", str(tmp_path / "a")])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "autoencoder")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_0000002")
    main(["train-vae", *args, "--out", str(tmp_path / "b"), "--resume"])
    a, b = (load_file(str(tmp_path / r / "autoencoder" / "model.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
