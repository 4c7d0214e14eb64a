"""Training objectives through the real training loop, for flow, v and EDM models, and flow generation from t = 1.

Each objective (sigma sampler + weighting + parameterization) is set only through the training config
of ``train_denoiser`` (the ``shapes-test`` preset, a few steps on a tiny latent cache); the model it
writes is loaded and sampled through the pipeline.
"""

import math

import numpy as np
import pytest
import torch

from latentdiff import load
from latentdiff.components import save_autoencoder
from latentdiff.config import build_config
from latentdiff.data.cache import CACHE_PRESETS, CacheConfig, cache_dataset
from latentdiff.diffusion import losses, schedules
from latentdiff.diffusion.parameterization import EDM, Eps, Flow, V
from latentdiff.models.autoencoder import PRESETS as AE_PRESETS
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser

OBJECTIVES = {
    # name: TrainConfig overrides (offset noise rides along with the v run)
    "flow-logitnormal": {"parameterization": "flow", "sigma_sampler": "logitnormal"},
    "v-minsnr": {"parameterization": "v", "sigma_sampler": "discrete", "min_snr_gamma": 5.0, "offset_noise": 1.0},
    "edm-lognormal": {"parameterization": "edm", "sigma_sampler": "lognormal"},
    "eps-edm-weighting": {"parameterization": "eps", "sigma_sampler": "discrete", "edm_weighting": 0.5},
}
PARAM_TYPES = {"flow-logitnormal": Flow, "v-minsnr": V, "edm-lognormal": EDM, "eps-edm-weighting": Eps}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A latent cache of 16 shapes images at 32 px (8x8x4 latents) from an untrained autoencoder: cheap, and
    the training loop does not care what the latents look like."""
    root = tmp_path_factory.mktemp("objectives")
    torch.manual_seed(0)
    save_autoencoder(root / "vae", AutoencoderKL(AE_PRESETS["shapes-f4c4"]))
    return cache_dataset(build_config(CacheConfig, CACHE_PRESETS, "shapes-test", None,
                                      {"autoencoder": str(root / "vae"), "out": str(root / "cache"),
                                       "image_size": 32, "num_images": 16, "batch_size": 16}), quiet=True)


@pytest.fixture(scope="module")
def models(cache, tmp_path_factory):
    """One short run per objective (2 steps; the flow run also samples a grid through the pipeline in training).

    The loss function is spied on, to check that the config's sigma sampler and weighting reach it.
    """
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, overrides in OBJECTIVES.items():
        seen = []
        real = losses.denoising_loss

        def spy(denoiser, x0, sigma, cond=None, seen=seen, real=real, **kw):
            seen.append((sigma.clone(), kw.get("weighting"), channel_mean_variance(kw.get("noise"))))
            return real(denoiser, x0, sigma, cond, **kw)

        cfg = build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None,
                           {"cache": str(cache), "out": str(root / name), "steps": 2,
                            "sample_every": 2 if name == "flow-logitnormal" else 0, **overrides})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("latentdiff.train.denoiser.denoising_loss", spy)
            folder = train_denoiser(cfg)
        out[name] = (folder, root / name, seen)
    return out


def channel_mean_variance(noise) -> float:
    """Variance of the noise's per-(sample, channel) spatial means: 1/(h w) for white noise, about
    1 + 1/(h w) with offset noise of strength 1 (a constant N(0, 1) shift per sample and channel)."""
    return float(noise.mean((2, 3)).var()) if noise is not None else 0.0


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_trains_and_generates(models, name):
    folder, run, _ = models[name]
    log = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(log) == 2 and all('"loss"' in line for line in log)
    if name == "flow-logitnormal":
        assert (run / "samples" / "step_0000002.png").exists()  # the pipeline sampled the model in training
    pipe = load(folder)
    assert isinstance(pipe.denoiser.parameterization, PARAM_TYPES[name])
    img = pipe.generate("a large red circle on the left", steps=2, seed=1, output="np")
    assert img.shape == (1, 32, 32, 3) and img.dtype == np.uint8


def test_training_config_reaches_the_loss(models):
    """The config's sigma sampler, weighting and offset noise are what the loss receives."""
    # v + min-SNR: the weighting is min-SNR-5 on the x0 loss; offset noise passed through.
    folder, _, seen = models["v-minsnr"]
    sigma, weighting, offset = seen[0]
    v = load(folder).denoiser.parameterization
    assert offset > 0.3 and weighting is not None  # offset noise of strength 1 reached the loss's noise
    torch.testing.assert_close(weighting(sigma), losses.min_snr_weight(sigma, 5.0, v))
    assert torch.isin(sigma, schedules.vp_sigma_table(v.alphas_cumprod)).all()  # discrete timesteps
    # flow + logit-normal: t in (0, 1), unit weight on the raw output (the velocity MSE).
    sigma, weighting, offset = models["flow-logitnormal"][2][0]
    t = sigma / (1 + sigma)
    assert weighting is None and offset < 0.3 and bool(((t > 0) & (t < 1)).all())  # white noise
    # EDM + log-normal: unit weight on the raw output is EDM's lambda(sigma); sigmas are not a table's.
    sigma, weighting, _ = models["edm-lognormal"][2][0]
    assert weighting is None and sigma.dtype == torch.float64 and len(set(sigma.tolist())) == len(sigma)
    # eps + EDM weighting: EDM's lambda(sigma) with sigma_data 0.5 on the x0 loss of an eps model.
    sigma, weighting, _ = models["eps-edm-weighting"][2][0]
    torch.testing.assert_close(weighting(sigma), losses.edm_weight(sigma, 0.5))
    assert not torch.allclose(weighting(sigma), losses.edm_weight(sigma, 1.0))


@pytest.fixture(scope="module")
def flow_pipe(models):
    return load(models["flow-logitnormal"][0])


# the pipeline's default (DPM++ 2M on the Karras grid, here over flow time) and the FlowMatch Euler setup
@pytest.mark.parametrize("sampler,schedule", [("dpmpp_2m", "karras"), ("euler", "flow"), ("heun", "exponential")])
def test_flow_model_generates_from_t_one_exactly(flow_pipe, sampler, schedule):
    pipe = flow_pipe
    calls = []
    network = pipe.denoiser.network
    hook = network.register_forward_hook(lambda mod, args, out: calls.append((args[0].clone(), args[1].clone())))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    try:
        img = pipe.generate("a small blue square", steps=3, sampler=sampler, schedule=schedule, seed=0,
                            latents=latents, output="np")
    finally:
        hook.remove()
    assert np.isfinite(img.astype(np.float64)).all()
    z, c_noise = calls[0]
    # First evaluation: t = 1 (c_noise = 1000 * t) for cond and uncond, and the input is the noise itself.
    assert bool((c_noise == 1000).all()), c_noise
    torch.testing.assert_close(z, latents.repeat(2, 1, 1, 1))
    assert all(bool((c < 1000).all()) for _, c in calls[1:])


def test_flow_grids_start_at_t_one():
    for grid in ("karras", "exponential", "flow", "default"):
        sigmas = schedules.make_sigmas(grid, 5, Flow())
        assert math.isinf(sigmas[0]) and sigmas[-1] == 0 and len(sigmas) == 6, grid
        schedules.check_sigmas(sigmas)
