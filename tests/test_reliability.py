"""Issue 15, reliability: every bad input gets a clear error before work starts, nothing is lost, nothing writes
garbage. One test per class of bad input, each a family of cases through the real command line in one subprocess
(``_cli_batch.py``, which can also make the file system answer "read-only", "disk full", "permission denied"):
exit status != 0, one ``error:`` line naming the key or the file, no traceback, nothing written or changed.
Then the crash-safety corners of checkpoints (a kill between the two renames of a re-save) and file modes."""


import pytest
import torch
from test_model_index import _folder

from latentdiff.config import build_config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random 32 px model folder (factor-2 autoencoder) and a scratch folder outside the watched tree."""
    root = tmp_path_factory.mktemp("reliable")
    return _folder(root / "model"), root, tmp_path_factory.mktemp("scratch")


def test_large_requests_are_made_in_batches_with_the_same_images(model, monkeypatch):
    from latentdiff import pipeline

    pipe = pipeline.load(model[0])
    whole = pipe.generate(["a red circle", "a blue square"], num_images=3, steps=2, output="pt")
    working, _ = pipe.memory_estimate(32, 32)
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 2 * working)
    assert pipe.batch_size(6, 32, 32) == 2
    batched = pipe.generate(["a red circle", "a blue square"], num_images=3, steps=2, output="pt")
    assert torch.equal(whole, batched)


def test_bounds_are_declared_once_and_inherited():
    from latentdiff.config import bounds_of
    from latentdiff.train.denoiser import TrainConfig
    from latentdiff.train.run import RunConfig

    assert set(bounds_of(RunConfig)) < set(bounds_of(TrainConfig))  # a loop adds its own to the engine's
    with pytest.raises(ValueError, match=r"preset 'p': keep_last = 0 is not allowed: keep_last must be >= 1"):
        build_config(TrainConfig, {"p": {"keep_last": 0}}, "p", None, {})
    assert build_config(TrainConfig, {}, None, None, {"sample_every": 0}).sample_every == 0
