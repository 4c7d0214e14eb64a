"""The run engine (``train.run``) under a third loop: a toy regression written the way the autoencoder and
denoiser loops are. The loop owns its config keys, data, model and loss; resume (bitwise), SIGTERM and Ctrl-C,
checkpoints, post-hoc EMA snapshots, the log, sample grids, callbacks and the dry run come from the engine."""

import json
import signal
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from latentdiff.config import build_config
from latentdiff.data.buckets import batch_indices
from latentdiff.train.distributed import per_sample, sample_generators
from latentdiff.train.engine import Callback
from latentdiff.train.run import Run, RunConfig, processes


@dataclass
class ToyConfig(RunConfig):
    """A loop's config: the shared keys from RunConfig, a re-declared default, its own keys."""

    out: str = "runs/toy"  # run folder
    dim: int = 4  # input and output width
    num_items: int = 40  # data set size
    noise: float = 0.1  # input noise, drawn per sample from its own generator


class ToyData:
    """Inputs and targets of a fixed linear map; ``batch_indices`` and ``bucketed`` as every data source has."""

    bucketed = False

    def __init__(self, cfg: ToyConfig):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(cfg.num_items, cfg.dim, generator=g)
        self.y = self.x @ torch.randn(cfg.dim, cfg.dim, generator=g)

    def batch_indices(self, step: int, batch_size: int, seed: int) -> Tensor:
        return batch_indices(step, batch_size, len(self.x), seed)


def train_toy(cfg: ToyConfig, callbacks: list[Callback] | None = None, on_loss=None):
    """Setup -> build -> loop -> loss -> step -> EMA -> log -> save, on the engine."""
    with processes(cfg) as ctx:
        # Setup.
        run = Run(cfg, ctx, callbacks)
        data = ToyData(cfg)
        # Build.
        run.seed()
        model = nn.Sequential(nn.Linear(cfg.dim, 16), nn.Dropout(0.2), nn.Linear(16, cfg.dim))  # dropout: global RNG
        run.build(model)
        # Loop.
        with run.guard():
            for step in run.steps():
                idx, chunks = run.batch(data, step)

                def loss_fn(positions: Tensor, step: int = step, idx: Tensor = idx) -> Tensor:
                    gens = sample_generators(cfg.seed, step, positions)
                    noise = per_sample(gens, lambda g: torch.randn(1, cfg.dim, generator=g))
                    if on_loss is not None:
                        on_loss(step)
                    x, y = data.x[idx[positions]], data.y[idx[positions]]
                    return ((model(x + cfg.noise * noise) - y) ** 2).mean(1)  # (b,)

                loss, grad_norm = run.step(step, chunks, loss_fn)
                run.log(step, loss, grad_norm, mean_abs_weight=model[0].weight.detach().abs().mean())
                run.samples(step, lambda ema, n: draw(ema, run.folder / "samples" / f"{n}.txt"))
                run.save(step)
        if cfg.dry_run:
            return run.dry_run_report()
        # Save.
        return run.finish()


def draw(ema: nn.Module, path) -> None:
    """The loop's "sample grid": the EMA model's output spread on the data."""
    path.parent.mkdir(exist_ok=True)
    path.write_text(str(float(ema(ToyData(ToyConfig()).x).std())))


def config(tmp_path, name: str, **kw) -> ToyConfig:
    settings = {"out": str(tmp_path / name), "steps": 6, "batch_size": 8, "grad_accum": 2, "warmup_steps": 2,
                "lr": 1e-2, "log_every": 1, "sample_every": 3, "save_every": 2, "keep_last": 2, "posthoc_every": 2,
                "quiet": True, "tensorboard": False}
    return build_config(ToyConfig, {"fast": settings}, "fast", None, kw)


def assert_same_run(a, b) -> None:
    for rel in ["checkpoints/step_0000006/model.safetensors", "checkpoints/step_0000006/ema.safetensors",
                "checkpoints/step_0000006/optimizer.safetensors", "checkpoints/step_0000006/posthoc_1.safetensors",
                "posthoc_ema/ema_0.0500_0000006.safetensors"]:
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x), rel


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    ema = train_toy(config(root, "ref"))
    return root / "ref", ema


def test_a_third_loop_gets_the_run_folder_log_samples_and_checkpoints(reference):
    run, ema = reference
    assert isinstance(ema, nn.Sequential) and not ema.training
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000004", "step_0000006"]
    assert sorted(p.name for p in (run / "checkpoints" / "step_0000006").iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.json", "optimizer.safetensors",
        "posthoc_0.safetensors", "posthoc_1.safetensors", "state.json"]
    state = json.loads((run / "checkpoints" / "step_0000006" / "state.json").read_text())
    assert state["step"] == 6 and state["config"]["dim"] == 4 and state["config"]["batch_size"] == 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert list(rows[0])[:5] == ["step", "loss", "mean_abs_weight", "grad_norm", "lr"]
    assert rows[0]["lr"] == pytest.approx(5e-3) and all(r["grad_norm"] > 0 for r in rows)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["3.txt", "6.txt"]
    assert len(list((run / "posthoc_ema").iterdir())) == 6  # 2 tracks x steps 2, 4, 6


def test_ctrl_c_then_resume_is_bitwise_the_uninterrupted_run(reference, tmp_path):
    def interrupt(step, ema):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit, match=r"interrupted at step 5: the last checkpoint .*step_0000004 is intact"):
        train_toy(config(tmp_path, "run"), callbacks=[Callback(every=5, fn=interrupt)])
    train_toy(config(tmp_path, "run", resume=True))
    assert_same_run(reference[0], tmp_path / "run")


def test_sigterm_checkpoints_exits_and_resumes_bitwise(reference, tmp_path):
    def preempt(step):
        if step == 2:  # during the third step: it finishes, is saved, and the run exits
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(SystemExit, match=r"SIGTERM at step 3: checkpoint \S+step_0000003 written"):
        train_toy(config(tmp_path, "run", save_every=100), on_loss=preempt)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the engine's handler is gone again
    train_toy(config(tmp_path, "run", resume=True))
    assert_same_run(reference[0], tmp_path / "run")


def test_the_dry_run_times_steps_and_writes_nothing(tmp_path):
    report = train_toy(config(tmp_path, "dry", dry_run=True, dry_run_steps=3, steps=1000))
    assert not (tmp_path / "dry").exists()
    assert report["steps_timed"] == 2 and report["fits"] is True and report["batch_size"] == 8

    def out_of_memory(step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    report = train_toy(config(tmp_path, "dry", dry_run=True), on_loss=out_of_memory)
    assert report["fits"] is False and "out of memory" in report["error"] and not (tmp_path / "dry").exists()
