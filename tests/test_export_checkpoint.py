"""`latentdiff export-checkpoint`: a checkpoint's EMA weights as a model folder (the weak guide of autoguidance)."""

from __future__ import annotations

import pytest
import torch
from _tiny import make_tiny_cache, one_thread  # noqa: F401 (autouse)

from latentdiff import cli
from latentdiff.config import build_config
from latentdiff.pipeline import load
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None,
                       {"cache": str(make_tiny_cache(root)), "out": str(root / "run"), "steps": 4, "save_every": 2,
                        "keep_last": 3, "sample_every": 0})
    train_denoiser(cfg)
    return root / "run"


def test_the_last_checkpoint_exports_to_the_model_folder_and_an_early_one_differs(run, tmp_path):
    final = load(run / "model").generate("a red circle", steps=3, output="pt")
    cli.main(["export-checkpoint", str(run / "checkpoints" / "step_0000004"), "-o", str(tmp_path / "last")])
    torch.testing.assert_close(load(tmp_path / "last").generate("a red circle", steps=3, output="pt"), final,
                               rtol=0, atol=0)
    cli.main(["export-checkpoint", str(run / "checkpoints" / "step_0000002"), "-o", str(tmp_path / "early")])
    early = load(tmp_path / "early").generate("a red circle", steps=3, output="pt")
    assert not torch.equal(early, final)


def test_a_live_run_exports_from_its_own_config_and_a_template_gives_the_same(run, tmp_path):
    """No finished model folder needed (the run may still be training); a template of the same configuration
    gives the same weights."""
    from latentdiff.train.posthoc_export import export_checkpoint

    own = export_checkpoint(run / "checkpoints" / "step_0000002", tmp_path / "own")
    templated = export_checkpoint(run / "checkpoints" / "step_0000002", tmp_path / "tpl", template=run / "model")
    a = load(own).generate("a red circle", steps=3, output="pt")
    torch.testing.assert_close(a, load(templated).generate("a red circle", steps=3, output="pt"), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no model folder"):
        export_checkpoint(run / "checkpoints" / "step_0000002", tmp_path / "x", template=tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "y")
