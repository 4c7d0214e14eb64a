"""Post-hoc EMA (Karras et al. 2024): the sigma_rel <-> gamma relation, the least-squares reconstruction
(exact for a stored profile, close to a directly computed power EMA for others), and the command."""

import json

import numpy as np
import pytest
import torch
from _tiny import make_tiny_cache
from safetensors.torch import load_file
from torch import nn

from latentdiff import load
from latentdiff.cli import main
from latentdiff.config import build_config
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser
from latentdiff.train.posthoc_ema import (
    PowerEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    profile_inner,
    reconstruct,
    save_snapshot,
    sigma_rel_to_gamma,
)


def test_sigma_rel_is_the_relative_std_of_the_discrete_power_ema():
    for sigma_rel in (0.05, 0.10, 0.2):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        # Weights the recursion ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t puts on each theta_tau.
        t = 20000
        taus = np.arange(1, t + 1, dtype=np.float64)
        betas = (1 - 1 / taus) ** (gamma + 1)
        w = (1 - betas) * np.concatenate([np.cumprod(betas[::-1])[::-1][1:], [1.0]])
        assert w.sum() == pytest.approx(1.0, abs=1e-9)
        mean = (w * taus).sum()
        std = np.sqrt((w * (taus - mean) ** 2).sum())
        assert std / t == pytest.approx(sigma_rel, rel=2e-3)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2 Sec. 3.1
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        sigma_rel_to_gamma(0.5)


def test_profile_inner_product_matches_numerical_integration():
    t_a, g_a, t_b, g_b = 700.0, 6.9, 1000.0, 16.9
    tau = np.linspace(0, t_a, 200001)
    p_a = (g_a + 1) * tau**g_a / t_a ** (g_a + 1)
    p_b = (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
    assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(np.trapezoid(p_a * p_b, tau), rel=1e-6)
    assert profile_inner(t_b, g_b, t_a, g_a) == pytest.approx(profile_inner(t_a, g_a, t_b, g_b), rel=1e-12)


def synthetic_run(folder, steps=1200, every=40):
    """A module whose weights follow a smooth drift plus noise; two power-EMA tracks with snapshots."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(8, 4)
    freq = torch.rand(4, 9, generator=g) * 6
    tracks = [PowerEMA(model, s) for s in (0.05, 0.10)]
    target = PowerEMA(model, 0.07)
    trajectory = []
    for t in range(1, steps + 1):
        with torch.no_grad():
            flat = torch.sin(t / steps * freq) * 3 + 0.3 * torch.randn(4, 9, generator=g)
            model.weight.copy_(flat[:, :8])
            model.bias.copy_(flat[:, 8])
        trajectory.append(flat)
        for ema in [*tracks, target]:
            ema.update(model, t)
        if t % every == 0:
            for ema in tracks:
                save_snapshot(folder, ema, t)
    return tracks, target, torch.stack(trajectory)


def test_reconstruction_is_exact_for_a_stored_profile_and_close_for_others(tmp_path):
    tracks, target, _ = synthetic_run(tmp_path)
    snapshots = list_snapshots(tmp_path)
    assert len(snapshots) == 60
    for ema in tracks:  # a target equal to a stored profile gives the stored weights
        state, coefs = reconstruct(snapshots, ema.sigma_rel)
        stored = ema.module.state_dict()
        assert all(torch.allclose(state[k], stored[k], atol=1e-5) for k in stored)
        assert np.abs(coefs).max() == pytest.approx(1.0, abs=1e-6) and np.abs(coefs).sum() == pytest.approx(1.0, abs=1e-5)
    state, _ = reconstruct(snapshots, 0.07)
    direct = target.module.state_dict()
    err = max((state[k] - direct[k]).abs().max() for k in direct)
    nearest = max((tracks[0].module.state_dict()[k] - direct[k]).abs().max() for k in direct)
    assert err < 1e-3 and err < nearest / 100, (err, nearest)
    # At an earlier step only the snapshots up to it are used.
    early, coefs = reconstruct(snapshots, 0.10, t=400)
    assert len(coefs) == 20
    stored_400 = load_file(str(tmp_path / "posthoc_ema" / "ema_0.1000_0000400.safetensors"))
    assert all(torch.allclose(early[k], stored_400[k], atol=1e-5) for k in stored_400)


def test_posthoc_ema_command_writes_a_loadable_model(tmp_path, capsys):
    cache = make_tiny_cache(tmp_path)
    cfg = build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None,
                       {"cache": str(cache), "out": str(tmp_path / "run"), "sample_every": 0, "steps": 4,
                        "posthoc_every": 1})
    train_denoiser(cfg)
    main(["posthoc-ema", str(tmp_path / "run"), "--sigma-rel", "0.10", "-o", str(tmp_path / "ph")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "ph")
    pipe = load(tmp_path / "ph")
    assert pipe.generate("a red circle", steps=2, seed=0, output="np").shape == (1, 32, 32, 3)
    stored = load_file(str(tmp_path / "run" / "posthoc_ema" / "ema_0.1000_0000004.safetensors"))
    saved = pipe.denoiser.network.state_dict()
    assert all(torch.allclose(saved[k], stored[f"network.{k}"], atol=1e-5) for k in saved)
    info = json.loads((tmp_path / "ph" / "posthoc_ema.json").read_text())
    assert info["sigma_rel"] == 0.10 and info["step"] == 4 and len(info["snapshots"]) == 8
    with pytest.raises(SystemExit) as e:
        main(["posthoc-ema", str(tmp_path / "nothing"), "--sigma-rel", "0.1", "-o", str(tmp_path / "x")])
    assert e.value.code == 2 and "posthoc_every" in capsys.readouterr().err


def test_posthoc_ema_command_on_an_autoencoder_run(tmp_path, capsys):
    from latentdiff.components import load_autoencoder
    from latentdiff.train.vae import VAE_PRESETS, VAETrainConfig, train_vae

    cfg = build_config(VAETrainConfig, VAE_PRESETS, "shapes-test", None,
                       {"out": str(tmp_path / "run"), "image_size": 32, "model": "shapes-demo", "num_images": 16,
                        "stats_images": 8, "sample_every": 0, "steps": 3, "posthoc_every": 1})
    template = train_vae(cfg)
    main(["posthoc-ema", str(tmp_path / "run"), "--sigma-rel", "0.05", "-o", str(tmp_path / "ph")])
    got = load_autoencoder(tmp_path / "ph")
    stored = load_file(str(tmp_path / "run" / "posthoc_ema" / "ema_0.0500_0000003.safetensors"))
    assert all(torch.allclose(got.state_dict()[k], stored[k], atol=1e-5) for k in stored)
    assert got.config.scale_factor == load_autoencoder(template).config.scale_factor  # kept from the run
