"""Training an inpainting model by our own command: random masks (boxes, the scenes' object boxes, fully masked),
the masked image's latents as concat channels, saved as an ordinary model folder that ``latentdiff.load`` reads
and inpaints with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import make_tiny_cache, one_thread  # noqa: F401 (one_thread: autouse)
from data_helpers import record_train_conds
from PIL import Image

import latentdiff
from latentdiff.cli import main
from latentdiff.data.masks import box_mask, random_mask
from latentdiff.data.shapes import ShapesDataset, object_boxes, render
from latentdiff.model_index import ModelIndex


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_tiny_cache(tmp_path_factory.mktemp("inpaint"))


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """A 3-step inpainting model from the command, and the Conds its loss received."""
    out = tmp_path_factory.mktemp("inpaint_run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        seen = record_train_conds(mp)
        main(["train", "--preset", "shapes-inpaint-test", "--cache", str(cache), "--out", str(out)])
    return out / "model", seen


def test_object_boxes_hold_their_objects():
    """Wherever the jitter puts an object, its box covers every pixel the object paints."""
    data = ShapesDataset(40, size=32, seed=3)
    for i in range(40):
        scene = data[i]["scene"]
        for obj, box in zip(scene.objects, object_boxes(scene)):
            alone = type(scene)((obj,), scene.background)
            for seed in range(3):
                painted = np.any(render(alone, 32, seed=seed) != render(type(scene)((), scene.background), 32), -1)
                assert not np.any(painted & ~box_mask(box, 32, 32)[0, 0].numpy().astype(bool)), (obj, box)


def test_random_masks_mix_full_object_and_box_masks():
    boxes = [(0.1, 0.1, 0.4, 0.4)]
    masks = [random_mask(torch.Generator().manual_seed(s), 32, 32, boxes) for s in range(400)]
    full = sum(bool(m.all()) for m in masks)
    objects = sum(torch.equal(m, box_mask(boxes[0], 32, 32)) for m in masks)
    assert 0.17 < full / 400 < 0.33 and 0.28 < objects / 400 < 0.47  # 0.25 and 0.75 * 0.5
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks)
    assert all(0 < m.mean() < 1 for m in masks if not m.all())


def test_train_inpaint_cli_end_to_end(trained, tmp_path):
    folder, seen = trained
    # What the network was trained on: (mask, masked latents) of SD inpainting's layout, masks 0 / 1.
    concat = seen[0].concat
    assert concat is not None and concat.shape[1:] == (9, 8, 8)
    assert set(concat[:, 0].unique().tolist()) <= {0.0, 1.0}
    assert ModelIndex.read(folder).concat == "inpaint"
    pipe = latentdiff.load(folder)
    assert pipe.concat_inputs == "inpaint" and pipe.denoiser.network.config.concat_channels == 9
    image = Image.fromarray(render(ShapesDataset(1, size=32, seed=5)[0]["scene"], 32, seed=0))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    out = pipe.generate("a large red circle in the center", image=image, mask=mask, steps=3, output="np")
    assert out.shape == (1, 32, 32, 3)
    kept = mask == 0
    assert np.array_equal(out[0][kept], np.asarray(image)[kept])  # pasted back outside the mask
    with pytest.raises(ValueError, match="inpainting model"):
        pipe.generate("a red circle", steps=2)
    # Text-to-image on it: a blank image under an all-white mask, as its fully masked training samples were.
    assert pipe.generate("a red circle", steps=2, output="np", **pipe.blank_canvas()).shape == (1, 32, 32, 3)
    # And the CLI inpaints with it.
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image.save(tmp_path / "in.png")
    main(["generate", "a red circle", "--model", str(folder), "--image", str(tmp_path / "in.png"), "--mask",
          str(tmp_path / "mask.png"), "--steps", "2", "-o", str(tmp_path / "out.png")])
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_inpaint_needs_a_unet(cache, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "shapes-inpaint-test", "--cache", str(cache), "--out", str(tmp_path / "run"),
              "--set", "model=dit-tiny"])
    assert "inpaint needs a U-Net" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists()


def test_init_from_a_text_to_image_model_starts_as_that_model(cache, tmp_path):
    """``init=FOLDER``: the inpainting U-Net starts with the text-to-image model's weights and zero weights on its
    concat channels, so it denoises exactly as that model did, whatever the mask (SD inpainting's start)."""
    import dataclasses

    from latentdiff.components import build_denoiser, load_denoiser
    from latentdiff.train.denoiser import init_from_model

    main(["train", "--preset", "shapes-test", "--cache", str(cache), "--out", str(tmp_path / "plain")])
    plain = tmp_path / "plain" / "model"
    source, spec = load_denoiser(plain / "denoiser")
    channels = spec.unet.in_channels
    inpaint = build_denoiser(dataclasses.replace(spec, unet=dataclasses.replace(spec.unet, concat_channels=channels + 1)))
    init_from_model(inpaint.network, None, str(plain), "eps")
    assert not inpaint.network.conv_in.weight[:, channels:].any()
    cond = latentdiff.load(plain).text_encoder(["a red circle", "a blue square"])
    x, sigma = torch.randn(2, channels, 8, 8), torch.tensor([0.5, 3.0])
    concat = torch.randn(2, channels + 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(inpaint(x, sigma, dataclasses.replace(cond, concat=concat)), source(x, sigma, cond),
                              atol=1e-5)
    # Through the command; a source of another parameterization is refused by name.
    main(["train", "--preset", "shapes-inpaint-test", "--cache", str(cache), "--out", str(tmp_path / "inp"),
          "--set", f"init={plain}"])
    assert (tmp_path / "inp" / "model" / "model_index.json").is_file()
    with pytest.raises(ValueError, match="is a eps model; this run trains flow"):
        init_from_model(inpaint.network, None, str(plain), "flow")


def test_inpaint_compare_benchmark_on_tiny_models(trained, tmp_path):
    """benchmarks/inpaint_compare.py's measurement, on a 3-step inpainting model and a random text-to-image one."""
    import sys

    from _tiny import REPO, tiny_model_folder

    sys.path.insert(0, str(REPO / "benchmarks"))
    from inpaint_compare import cases, evaluate, psnr_outside

    cases_ = cases(3, 32)
    for caption, image, mask, target in cases_:
        assert len(target.objects) == 1 and target.objects[0].color in caption and image.shape == (32, 32, 3)
        assert 0 < (mask > 0).mean() < 0.5
    image, mask = cases_[0][1], cases_[0][2]
    assert psnr_outside(image, image, mask) == float("inf")
    off = np.where(mask[..., None] == 0, image.astype(int) - 5 * (image > 127) + 5 * (image <= 127), 0)
    assert psnr_outside(off.astype(np.uint8), image, mask) == pytest.approx(10 * np.log10(255 ** 2 / 25))
    blend = latentdiff.load(tiny_model_folder(tmp_path / "t2i", size=32))
    for pipe, method in ((blend, "latent blending"), (latentdiff.load(trained[0]), "own concat inputs")):
        r = evaluate(pipe, cases_, steps=2, t2i_prompts=2)
        assert r["method"] == method and r["n"] == 3 and np.isfinite(r["psnr_outside"])
        assert 0 <= r["objects_correct"] <= 1 and 0 <= r["t2i_objects_correct"] <= 1
