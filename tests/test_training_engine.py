"""The training step: gradient accumulation and gradient checkpointing train the same weights; the dry
run reports without writing; the evaluation hook is called; a checkpoint of another model is refused."""

import re

import numpy as np
import pytest
import torch
from _tiny import assert_same_training, make_tiny_cache
from safetensors.torch import load_file

from latentdiff.cli import main
from latentdiff.config import build_config
from latentdiff.pipeline import Pipeline
from latentdiff.train import denoiser as denoiser_module
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser
from latentdiff.train.distributed import (
    Context,
    micro_batches,
    rank_indices,
    rank_positions,
    sample_generators,
)
from latentdiff.train.engine import Callback


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_tiny_cache(tmp_path_factory.mktemp("engine"))


def config(cache, out, **kw) -> TrainConfig:
    return build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None,
                        {"cache": str(cache), "out": str(out), "sample_every": 0, "steps": 2, "batch_size": 4,
                         "caption_dropout": 0.5, "save_every": 1, "keep_last": 3, **kw})


def weights(run, step: int = 2) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train_denoiser(config(cache, out))
    return weights(out), weights(out, 1)


@pytest.mark.parametrize("change", [{"grad_accum": 4}, {"gradient_checkpointing": True}, {"channels_last": True},
                                    pytest.param({"grad_accum": 2}, marks=pytest.mark.slow)])
def test_accumulation_and_checkpointing_train_the_same_weights(cache, reference, tmp_path, change):
    """k micro-batches of B/k train what one batch of B trains; recomputed activations and the memory layout
    of the convolutions (channels-last) change nothing."""
    train_denoiser(config(cache, tmp_path / "run", **change))
    assert_same_training(weights(tmp_path / "run"), reference[0], before=reference[1])


def test_the_split_of_the_global_batch():
    assert rank_positions(8, Context(rank=1, world=2)).tolist() == [4, 5, 6, 7]
    assert [c.tolist() for c in micro_batches(torch.arange(4, 8), 2)] == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="divisible by the number of processes 3"):
        rank_positions(8, Context(rank=0, world=3))
    with pytest.raises(ValueError, match="divisible by grad_accum 3"):
        micro_batches(torch.arange(4), 3)
    ranks = [rank_indices(5, 8, 20, 0, Context(rank=r, world=2)) for r in range(2)]
    from latentdiff.data.buckets import batch_indices

    assert torch.equal(torch.cat(ranks), batch_indices(5, 8, 20, 0))  # the ranks cover the global batch once
    # A sample's random stream depends only on (seed, step, position).
    a = sample_generators(0, 3, torch.tensor([5]))[0]
    b = sample_generators(0, 3, torch.tensor([1, 5]))[1]
    assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))
    c = sample_generators(0, 4, torch.tensor([5]))[0]
    assert not torch.equal(torch.randn(3, generator=sample_generators(0, 3, torch.tensor([5]))[0]),
                           torch.randn(3, generator=c))


def test_dry_run_reports_and_writes_nothing(cache, tmp_path, capsys):
    report = train_denoiser(config(cache, tmp_path / "run", dry_run=True, dry_run_steps=3, steps=1000))
    assert not (tmp_path / "run").exists()
    assert report["fits"] is True and report["steps_timed"] == 2 and report["step_time_s"] > 0
    assert report["eta_hours"] == pytest.approx(report["step_time_s"] * 1000 / 3600, rel=0.01)
    assert 0 < report["peak_memory_gib"] < report["memory_capacity_gib"]
    # The CLI prints the same report as JSON.
    main(["train", "--preset", "shapes-test", "--cache", str(cache), "--out", str(tmp_path / "cli"), "--dry-run",
          "--set", "dry_run_steps=2"])
    assert '"fits": true' in capsys.readouterr().out


def test_dry_run_says_when_it_does_not_fit(cache, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(denoiser_module, "denoising_loss", out_of_memory)
    report = train_denoiser(config(cache, tmp_path / "run", dry_run=True))
    assert report["fits"] is False and "out of memory" in report["error"]
    assert "grad_accum" in report["advice"] and "gradient_checkpointing" in report["advice"]


def test_evaluation_hook_gets_a_pipeline_of_the_ema_weights(cache, tmp_path):
    calls = []

    def hook(step, pipe):
        assert isinstance(pipe, Pipeline)
        image = pipe.generate("a red circle", steps=2, seed=0, output="np")
        calls.append((step, image.shape))

    train_denoiser(config(cache, tmp_path / "run", steps=4), callbacks=[Callback(every=2, fn=hook)])
    assert calls == [(2, (1, 32, 32, 3)), (4, (1, 32, 32, 3))]


def test_eval_every_logs_the_evaluation_with_the_step(cache, tmp_path):
    """``eval_every`` wires latentdiff.eval's hook into training: eval.jsonl gets FID/KID/judge per step."""
    import json

    from latentdiff.eval.shapes_net import ShapesNetConfig, train_shapes_net

    net = train_shapes_net(tmp_path / "net", ShapesNetConfig(steps=2, num_images=16, batch_size=8, feature_dim=8,
                                                            width=8), quiet=True)
    run = tmp_path / "run"
    train_denoiser(config(cache, run, steps=2, eval_every=2, eval_samples=12, eval_features=str(net)))
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]
    assert np.isfinite(rows[0]["fid"]) and np.isfinite(rows[0]["kid"]["mean"])
    # The logged figures are those of the EMA weights at step 2, i.e. of the saved model evaluated again.
    from latentdiff.eval.run import make_eval_hook
    from latentdiff.pipeline import load

    again = json.loads(json.dumps(make_eval_hook(2, 12, feature_path=str(net))(2, load(run / "model"))))
    assert {k: v for k, v in rows[0].items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}


def test_resume_with_another_model_configuration_names_the_mismatch(cache, tmp_path, capsys):
    train_denoiser(config(cache, tmp_path / "run", steps=2))
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "shapes-test", "--cache", str(cache), "--out", str(tmp_path / "run"), "--resume",
              "--set", "text_encoder.dim=64", "--set", "steps=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"refusing a partial load: checkpoint model.*wrong shape", err), err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000002"  # nothing lost


def test_metrics_go_to_jsonl_and_to_tensorboard_when_installed(tmp_path, monkeypatch):
    import json
    import sys
    import types

    from latentdiff.train.common import MetricsLog

    scalars = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, folder):
            self.folder = folder

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLog(tmp_path / "metrics.jsonl", total_steps=10, quiet=True, batch_size=8,
                     tensorboard_dir=tmp_path / "tb")
    log.log(0, loss=0.5)
    log.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["step"] == 1 and record["loss"] == 0.5
    assert record["images_per_s"] == pytest.approx(8 * record["steps_per_s"], rel=0.01)
    assert ("train/loss", 0.5, 1) in scalars and scalars[-1] == "closed"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: skipped silently
    log = MetricsLog(tmp_path / "m2.jsonl", total_steps=10, quiet=True, tensorboard_dir=tmp_path / "tb2")
    log.log(0, loss=0.25)
    log.close()
    assert log.tb is None and (tmp_path / "m2.jsonl").exists()
