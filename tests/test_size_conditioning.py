"""SDXL-style size and crop conditioning: size ids in the latent cache, in the training cond, and at generation."""

import json

import numpy as np
import pytest
import torch
from data_helpers import record_train_conds, tiny_autoencoder
from PIL import Image

from latentdiff.cli import main
from latentdiff.conditioning.sizes import size_embedding, size_ids
from latentdiff.config import from_dict, to_dict
from latentdiff.data.buckets import make_buckets
from latentdiff.data.cache import LatentCache, build_cache
from latentdiff.data.folder import ImageFolder
from latentdiff.data.shapes import ShapesDataset
from latentdiff.pipeline import load
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 16), (80, 16), (40, 40), (36, 36), (64, 16), (44, 44)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}_{w}x{h}.png")
    (root / "data").mkdir()
    for p in root.glob("*.png"):
        p.rename(root / "data" / p.name)
    ae = tiny_autoencoder(root / "ae")
    build_cache(ae, ImageFolder(root / "data", 32, verbose=False), root / "cache", quiet=True, image_size=32,
                buckets=make_buckets(32 * 32, 16, 4.0), source={"autoencoder": str(root / "ae")})
    build_cache(ae, ShapesDataset(4, size=16, seed=0), root / "shapes_cache", quiet=True,
                source={"autoencoder": str(root / "ae")})
    return root


def _cfg(root, out, **kw):
    base = {**TRAIN_PRESETS["shapes-test"], "model": "shapes-tiny", "sample_every": 0, "save_every": 100,
            "tensorboard": False, "lr": 3e-3, "size_conditioning": True, "size_embed_dim": 8}
    cfg = TrainConfig(out=str(root / out), cache=str(root / "cache"))
    return from_dict(TrainConfig, {**to_dict(cfg), **base, **kw}, "test")


def test_the_cache_records_original_size_crop_and_target(sized):
    cache = LatentCache(sized / "cache")
    by_key = {m["key"]: cache.size_ids[i].tolist() for i, m in enumerate(cache.meta)}
    assert by_key["0_64x16.png"] == [16, 64, 0, 0, 16, 64]  # exactly its bucket: no crop
    assert by_key["1_80x16.png"] == [16, 80, 0, 8, 16, 64]  # 80 -> 64 wide: 8 pixels cut on each side
    assert by_key["2_40x40.png"] == [40, 40, 0, 0, 32, 32]  # scaled down whole
    assert by_key["3_36x36.png"] == [36, 36, 0, 0, 32, 32]
    assert LatentCache(sized / "shapes_cache").size_ids is None  # rendered at their size: nothing to record


def test_size_embedding_matches_diffusers_add_time_proj():
    from diffusers.models.embeddings import Timesteps

    ids = torch.tensor([[1024, 768, 0, 16, 1024, 1024], [512, 512, 8, 0, 256, 512]])
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)  # SDXL's add_time_proj
    want = proj(ids.flatten()).reshape(2, -1)  # how UNet2DConditionModel embeds add_time_ids
    assert torch.allclose(size_embedding(ids, 256), want, atol=1e-5)


def test_size_ids_reach_the_network_and_generation_uses_them(sized, monkeypatch):
    seen = record_train_conds(monkeypatch)
    folder = train_denoiser(_cfg(sized, "run", steps=3))
    cache = LatentCache(sized / "cache")
    for step, cond in enumerate(seen):
        idx = cache.batch_indices(step, 4, 0)
        assert cond.vector.shape == (len(idx), 32 + 6 * 8)  # pooled text (32) + 6 ids x 8 features
        assert torch.allclose(cond.vector[:, 32:], size_embedding(cache.size_ids[idx], 8))
    assert json.loads((folder / "model_index.json").read_text())["size_conditioning"] == {"embed_dim": 8}
    pipe = load(folder)
    assert pipe.size_embed_dim == 8 and pipe.denoiser.network.config.vector_dim == 32 + 48
    kw = dict(steps=2, sampler="euler", guidance=2.0, output="pt")  # noqa: C408
    plain = pipe.generate("a picture", **kw)
    assert torch.equal(plain, pipe.generate("a picture", original_size=(32, 32), **kw))  # the default
    assert not torch.allclose(plain, pipe.generate("a picture", original_size=(256, 256), crop_top_left=(40, 0), **kw))
    assert size_ids(2, 32, 64).tolist() == [[32, 64, 0, 0, 32, 64]] * 2
    main(["generate", "a picture", "--model", str(folder), "--steps", "2", "--original-size", "256", "256",
          "--crop-top-left", "40", "0", "-o", str(sized / "cli.png"), "--sampler", "euler", "--guidance", "2"])
    from latentdiff.images import read_parameters

    assert read_parameters(sized / "cli.png")["original_size"] == [256, 256]
    want = pipe.generate("a picture", steps=2, sampler="euler", schedule=None, guidance=2.0, original_size=(256, 256),
                         crop_top_left=(40, 0), output="np")[0]
    assert np.array_equal(np.asarray(Image.open(sized / "cli.png").convert("RGB")), want)


def test_size_conditioning_refusals(sized):
    with pytest.raises(ValueError, match="holds no original sizes and crops"):
        train_denoiser(_cfg(sized, "bad", steps=1, cache=str(sized / "shapes_cache")))
    with pytest.raises(ValueError, match="even number"):
        train_denoiser(_cfg(sized, "bad2", steps=1, size_embed_dim=7))
    pipe = load(train_denoiser(_cfg(sized, "plain", steps=1, size_conditioning=False)))
    with pytest.raises(ValueError, match="no size conditioning"):
        pipe.generate("x", steps=1, original_size=(64, 64), output="pt")


def test_dit_takes_size_conditioning_too(sized):
    pipe = load(train_denoiser(_cfg(sized, "dit", steps=1, model="dit-tiny")))
    assert pipe.denoiser.network.config.vector_dim == 32 + 48
    assert pipe.generate("x", steps=1, sampler="euler", height=16, width=64, output="pt").shape == (1, 3, 16, 64)


def test_convert_keeps_the_size_conditioning(sized, tmp_path):
    """read_our_folder -> save_latentdiff is lossless: the converted folder still takes size ids."""
    from latentdiff.interop.convert import convert

    folder = train_denoiser(_cfg(sized, "to_convert", steps=1))
    convert(folder, tmp_path / "converted")
    index = json.loads((tmp_path / "converted" / "model_index.json").read_text())
    assert index["size_conditioning"] == {"embed_dim": 8}
    kw = dict(steps=2, sampler="euler", guidance=2.0, original_size=(256, 256), output="pt")  # noqa: C408
    assert torch.equal(load(tmp_path / "converted").generate("x", **kw), load(folder).generate("x", **kw))
