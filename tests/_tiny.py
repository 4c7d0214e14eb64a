"""Tiny training inputs shared by the training-engine tests: a random autoencoder and a 16-image latent cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentdiff.components import save_autoencoder
from latentdiff.data.cache import build_cache
from latentdiff.data.shapes import ShapesDataset
from latentdiff.models.autoencoder import PRESETS, AutoencoderKL

REPO = Path(__file__).resolve().parents[1]


def make_tiny_cache(root: Path) -> Path:
    """A cache of 16 shapes images (32 px) encoded by an untrained ``shapes-demo`` autoencoder."""
    torch.manual_seed(0)
    ae = AutoencoderKL(PRESETS["shapes-demo"])
    save_autoencoder(root / "ae", ae)
    return build_cache(ae, ShapesDataset(16, size=32, seed=0), root / "cache",
                       source={"autoencoder": str(root / "ae")}, quiet=True)


def tiny_model_folder(path: Path, size: int = 16, seed: int = 0, dit: bool = False) -> Path:
    """A random model folder: factor-2 autoencoder, 2-level U-Net with self-attention (``dit``: a 2-block DiT of
    patch 2, its zero-initialized layers made non-zero, as a trained DiT's), hashed text encoder."""
    from latentdiff.components import DenoiserSpec, build_denoiser
    from latentdiff.conditioning.text import TextEncoderConfig, build_text_encoder
    from latentdiff.models.autoencoder import AutoencoderConfig
    from latentdiff.models.dit import DiTConfig
    from latentdiff.models.unet import UNetConfig
    from latentdiff.train.denoiser import save_model_folder

    torch.manual_seed(seed)
    ae = AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8))
    spec = DenoiserSpec(unet=UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                        attention_levels=(1,), num_heads=2, context_dim=16, vector_dim=16,
                                        norm_groups=8))
    if dit:
        spec = DenoiserSpec(network="dit", dit=DiTConfig(sample_size=size // 2, patch_size=2, hidden_size=32, depth=2,
                                                         num_heads=2, context_dim=16, vector_dim=16))
    text = build_text_encoder(TextEncoderConfig(dim=16, vocab_size=64, num_layers=1, num_heads=2))
    denoiser = build_denoiser(spec)
    if dit:  # an untrained DiT's output layer is zero: nothing behind it would get a gradient
        with torch.no_grad():
            for p in denoiser.network.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return save_model_folder(path, denoiser, text, spec, ae, size)


def train_video(image_model: Path, out: Path, *extra: str) -> Path:
    """A ``moving-shapes-test`` train-video run of ``image_model`` (temporal heads of 8 channels) -> its model folder."""
    from latentdiff.cli import main

    main(["train-video", "--preset", "moving-shapes-test", "--out", str(out), "--set", f"model={image_model}",
          "--set", "temporal_head_dim=8", *extra])
    return out / "model"


def tiny_audio_model(root: Path) -> Path:
    """train-vae and train-audio's test presets (16 mel bands, 16-frame clips of 0.256 s); returns the model folder."""
    from latentdiff.cli import main

    main(["train-vae", "--preset", "tones-test", "--out", str(root / "vae")])
    main(["train-audio", "--preset", "tones-test", "--out", str(root / "run"), "--set",
          f"autoencoder={root / 'vae' / 'autoencoder'}"])
    return root / "run" / "model"


def env(**extra) -> dict:
    """The environment of a training subprocess: this checkout first on the path, 2 threads."""
    out = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    return out


def cli(args: list[str], cwd: Path, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latentdiff.cli", *args], cwd=cwd, env=env(**extra_env),
                          capture_output=True, text=True, timeout=300, check=False)


def overrides(d: dict) -> list[str]:
    return [a for k, v in d.items() for a in ("--set", f"{k}={v}")]


def assert_same_training(a: dict, b: dict, before: dict) -> None:
    """Two runs' weights agree to float tolerance: the difference is tiny next to what the last step changed
    (Adam's normalized steps turn summation-order noise in tiny gradients into visible, but small, changes)."""
    import torch

    assert a.keys() == b.keys()
    keys = [k for k in a if a[k].is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys])
    moved = torch.cat([(a[k] - before[k]).flatten() for k in keys])
    assert diff.abs().max() < 2e-4, diff.abs().max()
    assert diff.norm() < 0.02 * moved.norm(), (diff.norm(), moved.norm())


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are overhead-bound; one thread avoids oversubscribing a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
