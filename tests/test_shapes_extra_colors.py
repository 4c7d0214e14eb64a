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
