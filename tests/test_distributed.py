"""Two processes under torchrun (gloo on this CPU) train the same weights as one process with the same
global batch, for the denoiser (DDP and FSDP2) and the autoencoder (DDP); only rank 0 writes."""

import json
import subprocess
import sys

import pytest
from _tiny import REPO, assert_same_training, cli, env, make_tiny_cache, overrides
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_tiny_cache(tmp_path_factory.mktemp("dist"))


def torchrun(args: list[str], cwd, audit_dir) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "_audited_cli.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env(AUDIT_ROOT=str(cwd), AUDIT_OUT=str(audit_dir)),
                          capture_output=True, text=True, timeout=300, check=False)


def assert_same_runs(one, two, step: int) -> None:
    """Same weights to float tolerance, same losses, one metrics line a step."""
    def at(run, s):
        return load_file(str(run / "checkpoints" / f"step_{s:07d}" / "model.safetensors"))

    assert_same_training(at(one, step), at(two, step), before=at(one, step - 1))
    la = [json.loads(line)["loss"] for line in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["loss"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == step  # rank 1 wrote no second line
    assert la == pytest.approx(lb, rel=1e-4)


def tree(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_denoiser_two_processes_match_one(cache, tmp_path, strategy):
    sets = overrides({"sample_every": 2, "steps": 3, "batch_size": 4, "save_every": 2, "keep_last": 3,
                      "posthoc_every": 2, "distributed.strategy": strategy})
    single = cli(["train", "--preset", "shapes-test", "--cache", str(cache), "--out", "one", *sets], tmp_path)
    assert single.returncode == 0, single.stderr
    (tmp_path / "audit").mkdir()
    double = torchrun(["train", "--preset", "shapes-test", "--cache", str(cache), "--out", "two", *sets],
                      tmp_path, tmp_path / "audit")
    assert double.returncode == 0, double.stderr[-3000:]
    assert_same_runs(tmp_path / "one", tmp_path / "two", step=3)
    assert tree(tmp_path / "one") == tree(tmp_path / "two")  # samples, snapshots, checkpoints, model: once
    rank1 = json.loads((tmp_path / "audit" / "rank1.json").read_text())
    rank0 = json.loads((tmp_path / "audit" / "rank0.json").read_text())
    assert rank1 == [] and len(rank0) > 10, rank1[:5]


@pytest.mark.slow
def test_autoencoder_two_processes_match_one(tmp_path):
    sets = overrides({"steps": 3, "batch_size": 4, "image_size": 32, "model": "shapes-demo", "num_images": 16,
                      "stats_images": 8, "save_every": 2, "keep_last": 3, "sample_every": 2})
    single = cli(["train-vae", "--preset", "shapes-test", "--out", "one", *sets], tmp_path)
    assert single.returncode == 0, single.stderr
    (tmp_path / "audit").mkdir()
    double = torchrun(["train-vae", "--preset", "shapes-test", "--out", "two", *sets], tmp_path, tmp_path / "audit")
    assert double.returncode == 0, double.stderr[-3000:]
    assert_same_runs(tmp_path / "one", tmp_path / "two", step=3)
    assert tree(tmp_path / "one") == tree(tmp_path / "two")
    assert json.loads((tmp_path / "audit" / "rank1.json").read_text()) == []


@pytest.mark.slow
def test_fsdp_resume_reproduces_the_uninterrupted_checkpoint(cache, tmp_path):
    """FSDP2: resuming from step 2 writes a step-4 checkpoint bitwise equal to the uninterrupted one."""
    args = ["train", "--preset", "shapes-test", "--cache", str(cache), "--out", "run",
            *overrides({"sample_every": 0, "steps": 4, "save_every": 2, "keep_last": 5, "posthoc_every": 1,
                        "distributed.strategy": "fsdp"})]
    (tmp_path / "audit").mkdir()
    assert torchrun(args, tmp_path, tmp_path / "audit").returncode == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_0000004").rename(tmp_path / "uninterrupted")
    (checkpoints / "latest").write_text("step_0000002")
    resumed = torchrun([*args, "--resume"], tmp_path, tmp_path / "audit")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model", "ema", "optimizer", "posthoc_0", "posthoc_1"):
        a = load_file(str(tmp_path / "uninterrupted" / f"{name}.safetensors"))
        b = load_file(str(checkpoints / "step_0000004" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
