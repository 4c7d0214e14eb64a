"""DiT and MMDiT through the real training loop on the shapes data, then save -> strict load -> same output."""

import json

import numpy as np
import pytest
import torch

from latentdiff import load
from latentdiff.cli import main
from latentdiff.components import DenoiserSpec, build_denoiser, load_denoiser, save_autoencoder, save_denoiser
from latentdiff.config import build_config
from latentdiff.data.cache import CACHE_PRESETS, CacheConfig, cache_dataset
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.dit import DiT
from latentdiff.models.families import find_preset
from latentdiff.models.mmdit import MMDiT
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser
from latentdiff.types import Cond


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A shapes latent cache made with a small untrained autoencoder (the denoisers are under test here)."""
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    save_autoencoder(root / "vae", AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2),
                                                                   num_res_blocks=1, norm_groups=4)))
    return cache_dataset(build_config(CacheConfig, CACHE_PRESETS, "shapes-test", None,
                                      {"autoencoder": str(root / "vae"), "out": str(root / "cache")}), quiet=True)


# The DiT both ways: eps, and rectified flow with logit-normal timesteps and the flow grid (shapes-demo-dit's).
_DIT_FLOW = {k: TRAIN_PRESETS["shapes-demo-dit"][k] for k in ("parameterization", "sigma_sampler", "sample_schedule")}


@pytest.mark.parametrize("preset,family,network_class,parameterization,overrides", [
    ("shapes-dit-test", "dit", DiT, "eps", {}),
    ("shapes-dit-test", "dit", DiT, "flow", _DIT_FLOW),
    ("shapes-mmdit-test", "mmdit", MMDiT, "flow", {}),
])
def test_train_save_load_generate(cache, tmp_path, preset, family, network_class, parameterization, overrides):
    cfg = build_config(TrainConfig, TRAIN_PRESETS, preset, None,
                       {"cache": str(cache), "out": str(tmp_path / "run"), **overrides})
    folder = train_denoiser(cfg)
    saved = json.loads((folder / "denoiser" / "config.json").read_text())["config"]
    assert saved["network"] == family and saved["parameterization"] == parameterization
    assert "unet" not in saved and family in saved  # only the family in use is written
    # The training moved the weights away from adaLN-Zero's all-zero output layer.
    denoiser, spec = load_denoiser(folder / "denoiser")
    assert isinstance(denoiser.network, network_class)
    proj = denoiser.network.proj_out_2 if family == "dit" else denoiser.network.proj_out
    assert proj.weight.abs().sum() > 0
    # Save -> strict load -> identical output, and a generated image through the pipeline.
    save_denoiser(tmp_path / "again", denoiser, spec)
    again, _ = load_denoiser(tmp_path / "again")
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.5, 3.0])
    cond = Cond(context=torch.randn(2, 3, 32, generator=g), vector=torch.randn(2, 32, generator=g))
    with torch.no_grad():
        assert torch.equal(denoiser(x, sigma, cond), again(x, sigma, cond))
    a = load(folder).generate("a small blue square at the top", steps=2, seed=3, schedule="default", output="np")
    b = load(folder).generate("a small blue square at the top", steps=2, seed=3, schedule="default", output="np")
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b)
    if parameterization == "flow":  # unasked, a flow model samples on the flow grid, not dpmpp_2m's Karras ramp
        pipe, prompt, kw = load(folder), "a small blue square at the top", {"steps": 3, "seed": 3, "output": "latent"}
        unasked = pipe.generate(prompt, schedule=None, **kw)
        assert torch.equal(unasked, pipe.generate(prompt, schedule="flow", **kw))
        assert not torch.equal(unasked, pipe.generate(prompt, schedule="karras", **kw))


def test_cli_train_with_a_transformer_preset(cache, tmp_path, capsys):
    main(["train", "--preset", "shapes-mmdit-test", "--set", f"cache={cache}", "--set", f"out={tmp_path / 'run'}",
          "--set", "steps=1", "--set", "sample_every=0"])
    assert (tmp_path / "run" / "model" / "denoiser" / "model.safetensors").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "shapes-test", "--set", f"cache={cache}", "--set", "model=no-such-net",
              "--set", f"out={tmp_path / 'bad'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown network preset 'no-such-net'" in err and "dit-shapes" in err and "sd3-medium" in err


def test_spec_round_trip_for_every_family(tmp_path):
    for name in ("shapes-tiny", "dit-tiny", "mmdit-tiny"):
        family, config = find_preset(name)
        spec = DenoiserSpec(network=family, parameterization="flow" if family == "mmdit" else "eps",
                            **{family: config})
        torch.manual_seed(0)
        denoiser = build_denoiser(spec)
        save_denoiser(tmp_path / name, denoiser, spec)
        loaded, loaded_spec = load_denoiser(tmp_path / name)
        assert loaded_spec == spec or getattr(loaded_spec, family) == getattr(spec, family)
        for (k, v), (k2, v2) in zip(denoiser.network.state_dict().items(), loaded.network.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    with pytest.raises(ValueError, match="unknown network family 'vit'"):
        build_denoiser(DenoiserSpec(network="vit"))
