"""The shapes judge: near-perfect on rendered truth, robust to mild blur and noise, and wrong when it should be."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from latentdiff.data.judge import _label_components, detect, judge, score, validate
from latentdiff.data.shapes import Scene, ShapeObject, ShapesDataset, parse_caption, render, to_tensor

ATTRIBUTES = ("color", "shape", "size", "position", "count", "background", "all_correct")


@pytest.mark.parametrize("max_objects", [1, 3])
def test_validate_on_rendered_truth(max_objects):
    result = validate(n=300, size=64, seed=11, max_objects=max_objects)
    assert result["n"] == 300
    for key in ATTRIBUTES:
        assert result[key] >= 0.98, (key, result)


def test_validate_heldout_split():
    result = validate(n=100, size=64, seed=3, split="heldout")
    assert result["all_correct"] >= 0.98, result


def test_mild_blur_and_noise():
    data = ShapesDataset(100, size=64, seed=4)
    rng = np.random.default_rng(0)
    images, scenes = [], []
    for i in range(len(data)):
        item = data[i]
        image = ((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.7)), np.float64)
        images.append(np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8))
        scenes.append(item["scene"])
    result = score(images, scenes)
    assert result["all_correct"] >= 0.95, result


def test_inputs_uint8_tensor_and_pil_agree():
    scene = Scene(
        (ShapeObject("triangle", "cyan", "large", "bottom"), ShapeObject("square", "red", "small", "top")),
        "white",
    )
    image = render(scene, size=64, seed=0)
    assert judge(image) == scene
    assert judge(to_tensor(image)) == scene
    assert judge(Image.fromarray(image)) == scene
    assert score(torch.stack([to_tensor(image)] * 2), [scene] * 2)["all_correct"] == 1.0
    with pytest.raises(ValueError, match="uint8"):
        judge(image.astype(np.float32))


def test_wrong_prompt_is_scored_wrong():
    red_circle = render(Scene((ShapeObject("circle", "red", "large", "left"),), "black"), seed=0)
    result = score([red_circle], [parse_caption("a blue square")])
    assert (
        result["color"] == 0 and result["shape"] == 0 and result["count"] == 1 and result["all_correct"] == 0
    )
    assert np.isnan(result["size"]) and np.isnan(result["position"])  # unstated, so not scored
    result = score([red_circle], [parse_caption("a small red circle on the right on a white background")])
    assert result["color"] == 1 and result["shape"] == 1
    assert result["size"] == 0 and result["position"] == 0 and result["background"] == 0


def test_blank_and_extra_objects_fail_count():
    blank = np.zeros((64, 64, 3), np.uint8)
    assert judge(blank) == Scene((), "black")
    result = score([blank], [parse_caption("a large red circle on the left")])
    assert result["count"] == 0 and result["color"] == 0 and result["all_correct"] == 0
    two = render(
        Scene(
            (ShapeObject("circle", "red", "small", "left"), ShapeObject("circle", "red", "small", "right")),
            "gray",
        ),
        seed=1,
    )
    assert score([two], [parse_caption("two red circles")])["all_correct"] == 1
    assert score([two], [parse_caption("a red circle")])["count"] == 0


def test_detect_ignores_specks_and_reports_measurements():
    image = render(Scene((ShapeObject("square", "green", "large", "center"),), "black"), seed=0)
    image[2, 2] = image[60, 5] = (255, 0, 0)  # single-pixel specks
    background, detections = detect(image)
    assert background == "black" and len(detections) == 1
    d = detections[0]
    assert d.fill > 0.95 and abs(d.upper - 0.5) < 0.02 and abs(d.centroid[0] - 0.5) < 0.05


def test_label_components():
    mask = np.zeros((6, 6), bool)
    mask[0:2, 0:2] = True
    mask[2, 2] = True  # touches the first block only diagonally: separate under 4-connectivity
    mask[4:6, 1:6] = True
    mask[3, 5] = True
    labels = _label_components(mask)
    assert labels.max() == 3 and (labels[~mask] == 0).all()
    assert len({labels[0, 0], labels[2, 2], labels[5, 1]}) == 3 and labels[3, 5] == labels[5, 1]
    assert _label_components(np.ones((3, 3), bool)).max() == 1
    assert _label_components(np.zeros((3, 3), bool)).max() == 0


def test_score_validates_inputs():
    with pytest.raises(ValueError, match="images but"):
        score([np.zeros((32, 32, 3), np.uint8)], [])
    with pytest.raises(ValueError, match="at least one"):
        score([], [])
