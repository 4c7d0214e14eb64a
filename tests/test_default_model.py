"""The bundled default model: loads with no path, draws what held-out prompts ask, refuses a broken install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import latentdiff
from latentdiff.data.judge import judge
from latentdiff.data.shapes import parse_caption
from latentdiff.default import FOLDER, MANIFEST, verify

# Held-out (colour, shape) pairs, in template words and in words people write; the judge must read every
# attribute of every image right. Fixed seeds: deterministic on a CPU. (Written before the model was trained,
# not picked from its successes; the model's measured rate is in latentdiff/default/README.md.)
PROMPTS = [
    "a large green circle on the left on a black background",
    "a small blue square at the top on a white background",
    "a large red triangle in the center on a gray background",
    "a big violet triangle in the middle on a grey background",
    "a tiny yellow square to the right against a white background",
    "a big cyan triangle near the bottom on a black background",
]


@pytest.fixture(scope="module")
def pipe():
    return latentdiff.load()


def test_default_model_draws_held_out_prompts_right(pipe):
    images = pipe.generate(PROMPTS, seed=0)
    for prompt, image in zip(PROMPTS, images):
        assert judge(np.asarray(image)) == parse_caption(prompt), prompt


def test_default_model_scores_on_held_out_prompts_as_measured(pipe):
    """48 held-out prompts, half paraphrased: all attributes right on at least 0.70 of them (the model card's
    256-prompt figures are 0.81 and 0.80; 0.70 is two standard errors of 48 prompts below them)."""
    from latentdiff.data.shapes import heldout_prompts
    from latentdiff.eval.judging import score_prompts

    prompts = heldout_prompts(24, seed=5) + heldout_prompts(24, seed=6, phrasing="paraphrase")
    scores, _ = score_prompts(pipe, prompts, steps=None, sampler=None, guidance=None, seed=0, batch=48)
    assert scores["color"] >= 0.95 and scores["position"] >= 0.95 and scores["size"] >= 0.95, scores
    assert scores["all_correct"] >= 0.70, scores


def test_load_default_is_load_without_a_path(pipe):
    again = latentdiff.load("default")
    a = again.generate(PROMPTS[0], seed=3, output="pt")
    b = pipe.generate(PROMPTS[0], seed=3, output="pt")
    assert (a == b).all()


def test_broken_install_is_named_not_replaced(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(FOLDER, folder)
    weights = folder / "denoiser" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"denoiser/model\.safetensors.*reinstall"):
        verify(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"denoiser/model\.safetensors is missing.*reinstall"):
        verify(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="bundled default model is missing"):
        verify(folder)


def test_wheel_ships_the_default_model(tmp_path):
    """The package data is in a built wheel (not only in the source tree), and loads from an install of it."""
    root = FOLDER.parents[2]
    if not (root / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    pytest.importorskip("setuptools", minversion="77", reason="building the wheel needs setuptools >= 77")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(root)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("latentdiff-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"latentdiff/default/model/{p.relative_to(FOLDER).as_posix()}" for p in FOLDER.rglob("*")
               if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = ("import latentdiff, sys; assert latentdiff.__file__.startswith(sys.argv[1]), latentdiff.__file__; "
            "latentdiff.load().generate('a small red circle on the left', steps=2)")
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, env={"PYTHONPATH": str(target)},
                   cwd=tmp_path)
