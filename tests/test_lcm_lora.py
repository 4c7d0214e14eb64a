"""LCM-LoRA: published diffusers-format LCM-LoRA files on SD checkpoints (parity with diffusers' LCMScheduler +
``load_lora_weights``), and LCM-LoRAs distilled here (``latentdiff distill --lora-rank R``).

The parity proof: a random PEFT LoRA in LCM-LoRA's layout (attention, ``proj_in`` / ``proj_out``, feed-forward,
the ResNet convolutions, ``time_emb_proj``, down/upsamplers) for a tiny random-weight SD pipeline, saved with
diffusers' ``save_lora_weights``; diffusers samples it with ``LCMScheduler`` (from the pipeline's config, as
LCM-LoRA's model card does) and we with ``sampler="lcm"``: the same image to 1/255 at 4 steps, with guidance 1
(no CFG pass) and 1.5 (LCM-LoRA's range, a CFG batch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_lora import _images01, _within_1_255

import latentdiff
from latentdiff.diffusion import schedules
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import Consistency, Eps

PROMPT = "a red circle"
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@pytest.fixture(scope="module")
def lcm_sd(tmp_path_factory):
    """A tiny diffusers SD pipeline and a random LoRA for its U-Net in LCM-LoRA's layout (r 4, alpha 8), saved by
    diffusers; diffusers' LCMScheduler images with it (guidance 1 and 1.5) and without it."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers builds the reference pipeline")
    pytest.importorskip("peft", reason="peft makes the reference LoRA")
    from interop_tiny import sd_with_peft_lora

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    folder, path, _ = sd_with_peft_lora(tmp_path_factory.mktemp("lcm_lora"), LCM_TARGETS)

    def reference(lora: bool, guidance: float) -> np.ndarray:
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        ref.set_progress_bar_config(disable=True)
        ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
        if lora:
            ref.load_lora_weights(str(path))
        return ref(PROMPT, num_inference_steps=4, guidance_scale=guidance, height=16, width=16, output_type="np",
                   generator=torch.Generator().manual_seed(7)).images

    expected = {g: reference(True, g) for g in (1.0, 1.5)}
    yield {"folder": folder, "path": path, "expected": expected, "base": reference(False, 1.0),
           "timesteps": diffusers.LCMScheduler.from_pretrained(folder, subfolder="scheduler")}
    torch.set_num_threads(n)


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_diffusers_lcm_lora_matches_lcm_scheduler(lcm_sd, guidance):
    pipe = latentdiff.load(lcm_sd["folder"])
    lora = pipe.load_lora(lcm_sd["path"])
    assert lora.format == "diffusers" and len(lora.loras[0].names) > 40  # every LCM-LoRA layer kind found a layer
    got = _images01(pipe.generate(PROMPT, steps=4, sampler="lcm", guidance=guidance, seed=7, height=16, width=16,
                                  output="pt"))
    _within_1_255(got, lcm_sd["expected"][guidance])
    assert np.abs(lcm_sd["expected"][guidance] - lcm_sd["base"]).max() > 0.1  # the LoRA changes the image a lot
    lora.merge()  # merged (what the OpenVINO backend takes): the same image
    _within_1_255(_images01(pipe.generate(PROMPT, steps=4, sampler="lcm", guidance=guidance, seed=7, height=16,
                                          width=16, output="pt")), lcm_sd["expected"][guidance])
    pipe.unload_loras()
    _within_1_255(_images01(pipe.generate(PROMPT, steps=4, sampler="lcm", guidance=1.0, seed=7, height=16, width=16,
                                          output="pt")), lcm_sd["base"])


def test_lcm_sampling_of_a_plain_model_uses_lcm_schedulers_timesteps_and_scalings(lcm_sd):
    """The grid is LCMScheduler's timesteps (999, 759, 499, 259); its estimate is LCMScheduler.step's
    ``denoised`` = c_out * x0_hat + c_skip * sample at timestep scaling 10. (Our c_skip multiplies x = x_t /
    sqrt(alpha_bar), diffusers' the VP sample x_t: at these timesteps c_skip < 1e-7, and the two agree to 1e-5.)"""
    pipe = latentdiff.load(lcm_sd["folder"])
    use = pipe.settings(sampler="lcm", steps=4)
    sigmas = pipe._sigmas(use)
    sched = lcm_sd["timesteps"]
    sched.set_timesteps(4)
    ac = pipe.denoiser.parameterization.alphas_cumprod
    torch.testing.assert_close(sigmas, schedules.sigmas_from_timesteps(sched.timesteps, ac))
    torch.testing.assert_close(ac, sched.alphas_cumprod.double(), rtol=1e-6, atol=1e-6)  # its table is float32
    from latentdiff.diffusion.sampling import sample_lcm

    denoiser = pipe._sampled_denoiser(sample_lcm)
    assert isinstance(denoiser.parameterization, Consistency) and denoiser.network is pipe.denoiser.network
    assert pipe._sampled_denoiser(lambda *a, **k: None) is pipe.denoiser  # other samplers: the model's own

    g = torch.Generator().manual_seed(0)
    eps_net = lambda z, t, cond=None: torch.sin(3 * z) + 0.1 * t.view(-1, 1, 1, 1).to(z.dtype) / 1000
    ours = Denoiser(eps_net, Consistency(Eps(ac)))
    for i, t in enumerate(sched.timesteps):
        sample = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)  # the VP sample x_t
        sched._step_index = i  # diffusers' hidden state: the step we ask about
        _, want = sched.step(eps_net(sample, torch.full((2,), float(t))), t, sample, return_dict=False)
        sigma = schedules.sigmas_from_timesteps(t.view(1), ac)[:1].expand(2)  # (the grid ends in 0)
        x = sample * (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()  # our coordinates
        torch.testing.assert_close(ours(x, sigma), want, rtol=1e-5, atol=1e-5)
