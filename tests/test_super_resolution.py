"""Super-resolution, LDM style: a denoiser conditioned on the low-res image at the latent's size (folded by
space-to-depth when it is larger), trained by our own command, run by ``latentdiff upscale``; the benchmark script
on a tiny model."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from _tiny import REPO, make_tiny_cache, one_thread, tiny_model_folder  # noqa: F401 (one_thread: autouse)
from data_helpers import record_train_conds
from PIL import Image

import latentdiff
from latentdiff.cli import main
from latentdiff.conditioning.concat import downsample, low_res_channels, low_res_concat
from latentdiff.images import read_parameters
from latentdiff.model_index import ModelIndex


@pytest.fixture(scope="module")
def sr_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    cache = make_tiny_cache(root)
    main(["train", "--preset", "shapes-sr-test", "--cache", str(cache), "--out", str(root / "run")])
    return root / "run" / "model"


def test_low_res_folding_is_lossless_and_downsampling_is_bicubic():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    folded = low_res_concat(x, 2)
    assert folded.shape == (2, 12, 8, 8)
    assert torch.equal(torch.nn.functional.pixel_shuffle(folded, 2), x)  # every low-res pixel is there
    assert folded[0, ::4, 1, 2].tolist() == x[0, :, 2, 4].tolist()  # channels 4c: colour c at a cell's top left
    assert low_res_concat(x, 1) is x and low_res_channels(4, 4) == 3 and low_res_channels(4, 2) == 12
    flat = torch.full((1, 3, 32, 32), 0.25)
    assert torch.allclose(downsample(flat, 2), torch.full((1, 3, 16, 16), 0.25))
    with pytest.raises(ValueError, match="upscale 3 must divide the autoencoder's factor 4"):
        low_res_channels(4, 3)


def test_train_sr_and_upscale_end_to_end(sr_model, tmp_path, monkeypatch):
    index = ModelIndex.read(sr_model)
    assert index.concat == "low_res" and index.upscale == 2
    pipe = latentdiff.load(sr_model)
    assert pipe.denoiser.network.config.concat_channels == 12  # 16 px folded to the 8x8 latent: 3 x 2 x 2
    low = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    out = pipe.generate("", low_res=low, steps=2, output="np")
    assert out.shape == (1, 32, 32, 3)
    other = pipe.generate("", low_res=255 - low, steps=2, output="np")
    assert not np.array_equal(out, other)  # the low-res image reaches the network
    Image.fromarray(low).save(tmp_path / "low.png")
    main(["upscale", str(tmp_path / "low.png"), "-o", str(tmp_path / "up.png"), "--model", str(sr_model),
          "--steps", "2"])
    up = Image.open(tmp_path / "up.png")
    assert up.size == (32, 32) and read_parameters(tmp_path / "up.png")["upscale"].endswith("low.png")
    assert np.array_equal(np.asarray(up), out[0])  # the command is generate(low_res=...) with the same seed


def test_sr_training_sees_the_folded_low_res_image(tmp_path, monkeypatch):
    seen = record_train_conds(monkeypatch)
    cache = make_tiny_cache(tmp_path)
    main(["train", "--preset", "shapes-sr-test", "--cache", str(cache), "--out", str(tmp_path / "run"),
          "--set", "sample_every=0"])
    concat = seen[0].concat
    assert concat.shape[1:] == (12, 8, 8) and concat.abs().max() <= 1


def test_sr_model_inputs_are_checked(sr_model, tmp_path, capsys):
    pipe = latentdiff.load(sr_model)
    with pytest.raises(ValueError, match="super-resolution model: pass low_res="):
        pipe.generate("a red circle", steps=2)
    with pytest.raises(ValueError, match="upscales by 2: a 16x16 image gives 32x32, not the 64x64"):
        pipe.generate("", low_res=np.zeros((16, 16, 3), np.uint8), height=64, width=64, steps=2)
    plain = latentdiff.load(tiny_model_folder(tmp_path / "t2i"))
    with pytest.raises(ValueError, match="not a super-resolution model"):
        plain.generate("", low_res=np.zeros((8, 8, 3), np.uint8), steps=2)
    cache = make_tiny_cache(tmp_path)
    for sets, message in ((["upscale=2", "inpaint=true"], "inpaint and upscale train two different models"),
                          (["upscale=3"], "upscale 3 must divide the autoencoder's factor 4"),
                          (["judge_every=2"], "judge_every / eval_every score text-to-image")):
        with pytest.raises(SystemExit):
            main(["train", "--preset", "shapes-sr-test", "--cache", str(cache), "--out", str(tmp_path / "r"),
                  *[a for s in sets for a in ("--set", s)]])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "model").exists()


def test_sr_compare_benchmark_on_a_tiny_model(sr_model):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sr_compare import compare

    rows = compare(latentdiff.load(sr_model), n=4, steps=2, fid=False)
    assert [r["method"] for r in rows] == ["bicubic", "model"]
    bicubic = rows[0]
    assert 10 < bicubic["psnr"] < 60 and 0 < bicubic["ssim"] <= 1  # the shapes upscale well by bicubic
    assert all(np.isfinite(r["psnr"]) for r in rows)
