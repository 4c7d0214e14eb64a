"""`python -m latentdiff.default.build`: fp16 copy, guide, recommended settings, manifest; verify() refuses damage."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import one_thread, tiny_model_folder  # noqa: F401 (autouse)

from latentdiff.default import MANIFEST, verify
from latentdiff.default.build import main as build_main
from latentdiff.pipeline import load


def test_build_writes_a_half_precision_folder_that_loads_and_recommends(tmp_path):
    source, guide, out = tiny_model_folder(tmp_path / "src"), tiny_model_folder(tmp_path / "guide", seed=1), tmp_path / "bundle"
    build_main([str(source), "--guide", str(guide), "--out", str(out), "--generation", "guidance=3.5",
                "--generation", "guidance_method=autoguidance", "--generation", "steps=12"])
    assert verify(out) == out
    from safetensors.torch import load_file

    weights = load_file(out / "denoiser" / "model.safetensors")
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    pipe = load(out)
    use = pipe.settings()
    assert (use.guidance, use.guidance_method, use.steps) == (3.5, "autoguidance", 12)
    assert pipe.guide is not None
    # fp16 weights: the same images as the fp32 source, to fp16 rounding of the weights.
    full = load(source).generate("a red circle", steps=3, guidance=1.0, output="pt")
    half = pipe.generate("a red circle", steps=3, guidance=1.0, output="pt")
    assert (full - half).abs().max() < 0.05
    manifest = json.loads((out / MANIFEST).read_text())
    assert "guide/denoiser/model.safetensors" in manifest and "model_index.json" in manifest


def test_build_refuses_what_is_not_a_model_folder_and_a_bad_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a latentdiff model folder"):
        build_main([str(tmp_path), "--out", str(tmp_path / "out")])
    source = tiny_model_folder(tmp_path / "src")
    with pytest.raises(ValueError, match="steps"):
        build_main([str(source), "--out", str(tmp_path / "out"), "--generation", "steps=many"])
    assert not (tmp_path / "out").exists()  # nothing half-written
