"""Exact resume: a run killed (SIGKILL) at a (seeded) random step, or pre-empted (SIGTERM), then resumed, ends
bitwise identical to a run that was never interrupted; only the last ``keep_last`` checkpoints stay."""

import random
import re
import signal
import subprocess
import sys
import time

import pytest
from _tiny import cli, env, make_tiny_cache, overrides
from safetensors.torch import load_file

STEPS = 12
KILL_SEED = 0  # the kill step is drawn from it, so a failure reruns at the same step
SETTINGS = {"steps": STEPS, "batch_size": 4, "log_every": 1, "sample_every": 0, "keep_last": 2,
            "posthoc_every": 3, "caption_dropout": 0.5}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cache = make_tiny_cache(root)
    ref = cli(["train", "--preset", "shapes-test", "--cache", str(cache), "--out", "ref",
               *overrides({**SETTINGS, "save_every": 4})], root)
    assert ref.returncode == 0, ref.stderr
    return root, cache


def start(root, cache, out: str, save_every: int) -> subprocess.Popen:
    args = ["train", "--preset", "shapes-test", "--cache", str(cache), "--out", out,
            *overrides({**SETTINGS, "save_every": save_every})]
    return subprocess.Popen([sys.executable, "-m", "latentdiff.cli", *args], cwd=root, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(proc: subprocess.Popen, metrics, n: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, f"training ended early: {proc.stderr.read()[-2000:]}"
        time.sleep(0.02)
    raise TimeoutError("training did not reach the step in time")


def assert_bitwise_same(a, b) -> None:
    for rel in ["model/denoiser/model.safetensors", "model/text_encoder/model.safetensors",
                f"checkpoints/step_{STEPS:07d}/optimizer.safetensors",
                f"checkpoints/step_{STEPS:07d}/posthoc_0.safetensors",
                f"posthoc_ema/ema_0.0500_{STEPS:07d}.safetensors"]:
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys(), rel
        assert all(x[k].equal(y[k]) for k in x), f"{rel} differs"


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(setup):
    root, cache = setup
    kill_after = random.Random(KILL_SEED).randrange(5, STEPS - 2)  # a checkpoint exists after step 4
    proc = start(root, cache, "killed", save_every=2)
    wait_for_lines(proc, root / "killed" / "metrics.jsonl", kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = cli(["train", "--preset", "shapes-test", "--cache", str(cache), "--out", "killed", "--resume",
                   *overrides({**SETTINGS, "save_every": 2})], root)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resumed from .*step_\d{7} at step \d+", resumed.stderr)
    assert_bitwise_same(root / "ref", root / "killed")
    kept = sorted(p.name for p in (root / "killed" / "checkpoints").glob("step_*"))
    assert kept == [f"step_{STEPS - 2:07d}", f"step_{STEPS:07d}"], (kill_after, kept)
    assert not list((root / "killed" / "checkpoints").glob(".*"))  # no half-written checkpoint left behind


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(setup):
    root, cache = setup
    proc = start(root, cache, "preempted", save_every=1000)  # no periodic checkpoint: only SIGTERM's
    wait_for_lines(proc, root / "preempted" / "metrics.jsonl", 6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    match = re.search(r"SIGTERM at step (\d+): checkpoint (\S+) written; continue with --resume", err)
    assert match and "Traceback" not in err, err
    step = int(match.group(1))
    assert 6 <= step < STEPS
    assert (root / "preempted" / "checkpoints" / "latest").read_text() == f"step_{step:07d}"
    resumed = cli(["train", "--preset", "shapes-test", "--cache", str(cache), "--out", "preempted", "--resume",
                   *overrides({**SETTINGS, "save_every": 1000})], root)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_same(root / "ref", root / "preempted")
