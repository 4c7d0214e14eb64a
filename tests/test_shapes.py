"""The built-in shapes data set: vocabulary, rendering, captions and their parser, splits, determinism."""

import itertools

import numpy as np
import pytest
import torch

from latentdiff.data import shapes
from latentdiff.data.shapes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption,
    heldout_prompts,
    parse_caption,
    render,
    sample_scene,
    train_prompts,
)


def _scenes(n, split="train", max_objects=3, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, max_objects) for _ in range(n)]


def test_vocabulary_is_well_separated():
    assert set(COLORS).isdisjoint(BACKGROUNDS)
    rgb = {**COLORS, **BACKGROUNDS}
    for a, b in itertools.combinations(rgb, 2):
        assert np.linalg.norm(np.subtract(rgb[a], rgb[b])) > 120, (a, b)


def test_scene_is_canonical_and_validated():
    a = ShapeObject("circle", "red", "small", "left")
    b = ShapeObject("square", "blue", "large", "right")
    assert Scene((a, b), "black") == Scene((b, a), "black")
    with pytest.raises(ValueError, match="unknown color"):
        ShapeObject("circle", "pink", "small", "left")
    with pytest.raises(ValueError, match="unknown background"):
        Scene((a,), "red")


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_render_sizes(size):
    scene = Scene(
        (ShapeObject("triangle", "yellow", "large", "left"), ShapeObject("circle", "blue", "small", "right")),
        "gray",
    )
    image = render(scene, size=size, seed=3)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == BACKGROUNDS["gray"]
    assert (np.abs(image.astype(int) - COLORS["yellow"]).sum(-1) == 0).any()  # a solid interior


def test_render_is_seeded_and_sizes_differ():
    scene = Scene((ShapeObject("square", "red", "small", "center"),), "black")
    assert np.array_equal(render(scene, seed=1), render(scene, seed=1))
    assert not np.array_equal(render(scene, seed=1), render(scene, seed=2))  # jitter
    area = {
        z: (render(Scene((ShapeObject("square", "red", z, "center"),), "black"))[..., 0] > 110).mean()
        for z in SIZES
    }
    assert 3.5 < area["large"] / area["small"] < 4.5  # twice the side


def test_render_rejects_bad_scenes():
    with pytest.raises(ValueError, match="unstated"):
        render(Scene((ShapeObject("circle", "red"),), "black"))
    twice = ShapeObject("circle", "red", "small", "left")
    with pytest.raises(ValueError, match="distinct positions"):
        render(Scene((twice, ShapeObject("square", "red", "small", "left")), "black"))


def test_objects_never_touch():
    rng = np.random.default_rng(0)
    for scene in _scenes(300):
        positions = [o.position for o in scene.objects]
        assert len(set(positions)) == len(positions)
        assert shapes._apart(list(scene.objects), shapes._place(scene, rng))


def test_dataset_items_and_determinism():
    data = ShapesDataset(12, size=32, seed=5)
    forward = [data[i] for i in range(12)]
    backward = [ShapesDataset(12, size=32, seed=5)[i] for i in reversed(range(12))][::-1]
    for a, b in zip(forward, backward):
        assert (
            torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["scene"] == b["scene"]
        )
    item = forward[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    other = ShapesDataset(12, size=32, seed=6)
    assert any(other[i]["caption"] != forward[i]["caption"] for i in range(12))
    assert {len(x["scene"].objects) for x in forward} <= {1, 2, 3}
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset(4, split="test")


def test_heldout_pairs_never_in_train():
    train = _scenes(3000, "train")
    seen = {(o.color, o.shape) for s in train for o in s.objects}
    assert seen.isdisjoint(HELDOUT_PAIRS)
    assert seen == {(c, s) for c in COLORS for s in SHAPES} - HELDOUT_PAIRS  # every other pair shows up
    heldout = _scenes(500, "heldout")
    assert all(any((o.color, o.shape) in HELDOUT_PAIRS for o in s.objects) for s in heldout)
    singles = _scenes(300, "heldout", max_objects=1)
    assert all(
        len(s.objects) == 1 and (s.objects[0].color, s.objects[0].shape) in HELDOUT_PAIRS for s in singles
    )
    # Every colour and every shape is still seen in training, just not in the held-out pairs.
    assert {c for c, _ in seen} == set(COLORS) and {s for _, s in seen} == set(SHAPES)


def test_captions_round_trip():
    rng = np.random.default_rng(1)
    for scene in _scenes(500, seed=2):
        text = caption(scene, rng)
        parsed = parse_caption(text)
        assert parsed is not None, text
        assert parsed.objects == scene.objects, text
        assert parsed.background in (None, scene.background), text
        assert (parsed.background is None) == (scene.background not in text), text
        assert parse_caption(caption(scene, rng, background=True)) == scene


def test_every_template_and_phrase_parses():
    scene = Scene(tuple(ShapeObject("circle", "red", "small", p) for p in ("left", "right", "top")), "white")
    rng = np.random.default_rng(0)
    texts = {caption(scene, rng) for _ in range(400)}
    for template in shapes._TEMPLATES_WITH_BACKGROUND + shapes._TEMPLATES_WITHOUT_BACKGROUND:
        prefix = template.split("{objs}")[0].format(bg="white")
        assert any(t.startswith(prefix) for t in texts), template
    assert any(t.startswith("three small red circles, one") for t in texts)
    for position, phrases in shapes._POSITION_PHRASES.items():
        for phrase in phrases:
            parsed = parse_caption(f"a large blue triangle {phrase}")
            assert parsed.objects == (ShapeObject("triangle", "blue", "large", position),)


def test_parse_user_prompts():
    assert parse_caption("a large red circle on the left") == Scene(
        (ShapeObject("circle", "red", "large", "left"),)
    )
    two = parse_caption("Two yellow triangles on a black background.")
    assert two == Scene((ShapeObject("triangle", "yellow"),) * 2, "black")
    mixed = parse_caption("a green circle in the center and a red square on the right")
    assert mixed.objects == (
        ShapeObject("circle", "green", None, "center"),
        ShapeObject("square", "red", None, "right"),
    )
    assert parse_caption("a big blue square on grey") == Scene(
        (ShapeObject("square", "blue", "large"),), "gray"
    )
    assert parse_caption("a cat on a sofa") is None
    assert parse_caption("a red blue circle") is None  # contradictory
    assert parse_caption("two red circles on the left") is None  # one position for two objects


def test_prompt_sets():
    held = heldout_prompts(20, seed=0)
    assert held == heldout_prompts(20, seed=0) and held != heldout_prompts(20, seed=1)
    for text, scene in held:
        assert len(scene.objects) == 1 and (scene.objects[0].color, scene.objects[0].shape) in HELDOUT_PAIRS
        assert parse_caption(text) == scene and scene.complete
    for text, scene in train_prompts(20):
        assert (scene.objects[0].color, scene.objects[0].shape) not in HELDOUT_PAIRS
        assert parse_caption(text) == scene
    assert {s.objects[0].position for _, s in heldout_prompts(60)} == set(POSITIONS)


def test_paraphrased_prompts_parse_back_and_keep_their_scenes():
    """People's words (tiny, big, violet, grey, centre, other orders) parse to the same scene as the templates."""
    from latentdiff.data.shapes import PHRASINGS, heldout_prompts, parse_caption

    for objects in (1, 2, 3):
        template = heldout_prompts(64, phrasing="template", objects=objects)
        para = heldout_prompts(64, phrasing="paraphrase", objects=objects)
        assert [s for _, s in template] == [s for _, s in para]  # the words change, not the scenes
        assert all(len(s.objects) == objects for _, s in para)
        for text, scene in template + para:
            assert parse_caption(text) == scene, text
    words = " ".join(c for c, _ in heldout_prompts(64, phrasing="paraphrase")).split()
    assert {"tiny", "big", "violet", "grey"} <= set(words)
    assert not {"tiny", "big", "violet", "grey", "centre"} & set(
        " ".join(c for c, _ in heldout_prompts(64, phrasing="template")).split())
    with pytest.raises(ValueError, match="phrasing"):
        heldout_prompts(4, phrasing="shouting")
    assert "mixed" in PHRASINGS


def test_geometry_fits_the_canvas_and_every_object_is_readable_at_32_pixels():
    """Every object stays on the canvas with its jitter, and the judge reads rendered scenes perfectly at 32 px."""
    from latentdiff.data.judge import score
    from latentdiff.data.shapes import ANCHORS, JITTER, SIZE_RADIUS, heldout_prompts, render, train_prompts

    r = max(SIZE_RADIUS.values())
    for x, y in ANCHORS.values():
        assert r + JITTER <= min(x, y) and max(x, y) + r + JITTER <= 1
    for prompts in (heldout_prompts(100), train_prompts(100), heldout_prompts(50, objects=2)):
        images = [render(s, 32, seed=i) for i, (_, s) in enumerate(prompts)]
        assert score(images, [s for _, s in prompts])["all_correct"] == 1.0


def test_attribute_dropout_leaves_out_one_word_per_object_and_nothing_at_zero():
    """Training captions may leave out an object's size, colour or shape word; at 0 they are unchanged."""
    from latentdiff.data.shapes import COLORS, SHAPES, SIZES, ShapesDataset

    plain, same = ShapesDataset(40, 32), ShapesDataset(40, 32, attribute_dropout=0.0)
    assert [plain[i]["caption"] for i in range(40)] == [same[i]["caption"] for i in range(40)]
    data = ShapesDataset(60, 32, max_objects=1, phrasing="template", attribute_dropout=1.0)
    for i in range(60):
        words = data[i]["caption"].replace(",", " ").split()
        o = data[i]["scene"].objects[0]
        stated = [o.size in words, o.color in words, o.shape in words]
        assert sum(stated) == 2, data[i]["caption"]
        assert ("shape" in words) == (not stated[2])
        assert not {*SIZES, *COLORS, *SHAPES} - {o.size, o.color, o.shape} & set(words)
    with pytest.raises(ValueError, match="attribute_dropout"):
        ShapesDataset(4, 32, attribute_dropout=2.0)
