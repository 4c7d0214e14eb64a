"""Extra colours of the shapes set (``extra_colors``: never in the default data) and the judge reading them."""

import numpy as np
import pytest

from latentdiff.data.judge import score
from latentdiff.data.shapes import (
    ALL_COLORS,
    COLORS,
    EXTRA_COLORS,
    ShapesDataset,
    _pairs,
    extra_color_prompts,
    parse_caption,
    render,
)


def test_default_data_unchanged_and_orange_only_when_asked():
    plain, asked = ShapesDataset(200, size=32), ShapesDataset(200, size=32, extra_colors=("orange",))
    assert "orange" not in COLORS and "orange" in EXTRA_COLORS
    assert _pairs("train") == _pairs("train", ())  # the default vocabulary's pairs, in their order
    assert not any("orange" in plain[i]["caption"] for i in range(200))
    orange = [i for i in range(200) if any(o.color == "orange" for o in asked[i]["scene"].objects)]
    assert len(orange) > 40  # about one object in five
    assert all("orange" in asked[i]["caption"] for i in orange)
    with pytest.raises(ValueError, match="unknown extra colours"):
        ShapesDataset(4, extra_colors=("pink",))


def test_judge_reads_orange_with_the_extended_palette():
    data = ShapesDataset(120, size=32, seed=3, extra_colors=("orange",))
    items = [data[i] for i in range(120)]
    got = score([it["image"] for it in items], [it["scene"] for it in items], colors=ALL_COLORS)
    assert got["color"] >= 0.97
    prompts = extra_color_prompts(24, color="orange")
    assert all("orange" in c and parse_caption(c) == s for c, s in prompts)
    images = [render(s, 32, seed=i) for i, (_, s) in enumerate(prompts)]
    assert score(images, [s for _, s in prompts], colors=ALL_COLORS)["color"] >= 0.95
    default = score(images, [s for _, s in prompts])  # the default judge has no word for it
    assert default["color"] < 0.6
    assert np.asarray(images).std() > 0


def test_extra_share_sets_how_often_objects_take_the_extra_colour():
    from latentdiff.data.shapes import sample_scene

    def share(value: float, n: int = 600) -> float:
        rng = np.random.default_rng(5)
        colors = [o.color for _ in range(n) for o in sample_scene(rng, extra_colors=("orange",),
                                                                   extra_share=value).objects]
        return float(np.mean([c == "orange" for c in colors]))

    assert 0.16 < share(0.0) < 0.24  # the default: the 3 orange pairs among 15, one object in five
    assert 0.45 < share(0.5) < 0.55 and share(1.0) == 1.0
    data = ShapesDataset(60, size=32, seed=1, extra_colors=("orange",))
    same = ShapesDataset(60, size=32, seed=1, extra_colors=("orange",), extra_share=0.0)
    assert all(data[i]["caption"] == same[i]["caption"] for i in range(60))  # 0 draws as before, draw for draw
    rng = np.random.default_rng(2)
    held = sample_scene(rng, "heldout", extra_colors=("orange",), extra_share=1.0)  # the held-out object stays
    assert (held.objects[0].color, held.objects[0].shape) in _pairs("heldout")
    with pytest.raises(ValueError, match="extra_share is a probability in \\[0, 1\\] for data with extra_colors"):
        ShapesDataset(4, extra_share=0.5)
    with pytest.raises(ValueError, match="extra_share is a probability"):
        ShapesDataset(4, extra_colors=("orange",), extra_share=1.5)
