"""APG, autoguidance and PAG through Pipeline.generate and the CLI, on a random tiny model with a guide/."""

from __future__ import annotations

import shutil

import pytest
import torch
from _tiny import one_thread, tiny_model_folder  # noqa: F401 (autouse)

from latentdiff import cli
from latentdiff.images import read_parameters
from latentdiff.model_index import GenerationSettings, ModelIndex
from latentdiff.pipeline import load

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random model folder (U-Net with self-attention) whose guide/ is a copy of itself, and one whose guide/ is
    another random model."""
    root = tmp_path_factory.mktemp("guid")
    same = tiny_model_folder(root / "same")
    shutil.copytree(same, root / "guide_copy")
    shutil.move(root / "guide_copy", same / "guide")
    other = tiny_model_folder(root / "other", seed=1)
    tiny_model_folder(other / "guide", seed=2)
    return same, other


def test_autoguidance_with_the_model_itself_as_guide_is_the_conditional_prediction(folder):
    pipe = load(folder[0])
    auto = pipe.generate(PROMPT, steps=3, guidance=3.0, guidance_method="autoguidance", output="pt")
    plain = pipe.generate(PROMPT, steps=3, guidance=1.0, output="pt")
    torch.testing.assert_close(auto, plain)
    other = load(folder[1])
    assert not torch.allclose(other.generate(PROMPT, steps=3, guidance=3.0, guidance_method="autoguidance",
                                             output="pt"), other.generate(PROMPT, steps=3, guidance=1.0, output="pt"))


def test_apg_and_pag_change_the_image_and_stay_deterministic(folder):
    pipe = load(folder[0])
    base = pipe.generate(PROMPT, steps=3, guidance=4.0, output="pt")
    apg = pipe.generate(PROMPT, steps=3, guidance=4.0, guidance_method="apg", output="pt")
    pag = pipe.generate(PROMPT, steps=3, guidance=4.0, pag_scale=2.0, output="pt")
    assert not torch.allclose(base, apg) and not torch.allclose(base, pag)
    torch.testing.assert_close(pag, pipe.generate(PROMPT, steps=3, guidance=4.0, pag_scale=2.0, output="pt"))
    torch.testing.assert_close(base, pipe.generate(PROMPT, steps=3, guidance=4.0, output="pt"))  # nothing stuck


def test_the_index_recommends_a_method_and_bad_ones_are_named(folder, tmp_path):
    pipe = load(folder[0])
    pipe.index = ModelIndex(sample_size=16, generation=GenerationSettings(guidance_method="apg", pag_scale=1.5))
    use = pipe.settings()
    assert (use.guidance_method, use.pag_scale) == ("apg", 1.5)
    with pytest.raises(ValueError, match="unknown guidance method 'fancy'"):
        pipe.generate(PROMPT, steps=2, guidance_method="fancy")
    pipe.guide = None
    with pytest.raises(ValueError, match="autoguidance needs a guide"):
        pipe.generate(PROMPT, steps=2, guidance_method="autoguidance")


def test_cli_takes_the_methods_and_records_them(folder, tmp_path):
    out = tmp_path / "x.png"
    cli.main(["generate", PROMPT, "--model", str(folder[1]), "--steps", "2", "--guidance-method", "autoguidance",
              "--pag-scale", "1.0", "-o", str(out)])
    params = read_parameters(out)
    assert params["guidance_method"] == "autoguidance" and params["pag_scale"] == 1.0
