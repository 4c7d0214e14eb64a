"""Scheduler configs of diffusers folders, reproduced exactly: DDIM's final step with set_alpha_to_one=False
and PNDM as PLMS (skip_prk_steps=True), each against diffusers' own scheduler and pipeline.

The sampler-level checks drive diffusers' scheduler loop and ours with the same analytic network
(test_diffusion_parity's), so the comparison is of the update rules alone, in float64.
"""

from __future__ import annotations

import pytest
import torch

import latentdiff
from latentdiff.diffusion import sampling, schedules

diffusers = pytest.importorskip("diffusers", reason="diffusers' schedulers are the reference")
pytest.importorskip("transformers", reason="the tiny pipelines use transformers CLIP models")

from diffusers.schedulers import scheduling_ddim
from interop_tiny import one_thread, tiny_sd_pipeline
from test_diffusion_parity import assert_rel, noise, our_randn, run_diffusers, run_ours, table_ac, vp_network

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


def _grid(ac, spacing, n):
    return schedules.vp_sigmas(ac, n, spacing, steps_offset=1 if spacing == "leading" else 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,n", [("leading", 7), ("trailing", 10)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_final_alpha_is_alphas_cumprod_0_without_set_alpha_to_one(prediction, spacing, n, eta, monkeypatch):
    monkeypatch.setattr(scheduling_ddim, "randn_tensor", our_randn)
    sched = diffusers.DDIMScheduler(**SD_BETAS, prediction_type=prediction, timestep_spacing=spacing,
                                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ac = table_ac(sched)
    ref = run_diffusers(sched, n, vp_network(prediction, ac), noise(), step_kw={"eta": eta})
    sigmas = _grid(ac, spacing, n)
    final = float(schedules.vp_sigma_table(ac)[0])
    x_init = noise() * (1 + sigmas[0] ** 2).sqrt()
    ours = run_ours(sampling.sample_ddim, prediction, ac, sigmas, x_init, eta=eta, final_sigma=final)
    assert_rel(ours, ref)
    # The old behaviour (ending at sigma = 0) is measurably different: the test can tell the two apart.
    at_zero = run_ours(sampling.sample_ddim, prediction, ac, sigmas, x_init, eta=eta)
    assert ((at_zero - ref).norm() / ref.norm()).item() > 1e-3


# eps-prediction only: for v, diffusers combines the raw v outputs, we (and Stability's PLMS) eps estimates.
@pytest.mark.parametrize("prediction", ["epsilon"])
@pytest.mark.parametrize("spacing,n", [("leading", 1), ("leading", 2), ("leading", 3), ("leading", 4),
                                       ("leading", 7), ("trailing", 10), ("trailing", 20)])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_plms_matches_pndm_with_skip_prk_steps(prediction, spacing, n, set_alpha_to_one):
    sched = diffusers.PNDMScheduler(**SD_BETAS, prediction_type=prediction, timestep_spacing=spacing,
                                    steps_offset=1, skip_prk_steps=True, set_alpha_to_one=set_alpha_to_one)
    ac = table_ac(sched)
    calls = []
    net = vp_network(prediction, ac)
    ref = run_diffusers(sched, n, lambda z, t: calls.append(t) or net(z, t), noise())
    sigmas = _grid(ac, spacing, n)
    final = 0.0 if set_alpha_to_one else float(schedules.vp_sigma_table(ac)[0])
    ours = run_ours(sampling.sample_plms, prediction, ac, sigmas, noise() * (1 + sigmas[0] ** 2).sqrt(),
                    final_sigma=final)
    assert_rel(ours, ref)
    assert sampling.count_evaluations("plms", sigmas) == len(calls) == (n + 1 if n > 1 else 1)
    assert sampling.steps_for_evaluations("PNDMScheduler", len(calls)) == n


def test_final_sigma_outside_the_last_step_is_refused():
    sigmas = schedules.karras_sigmas(3, 0.1, 10.0)
    with pytest.raises(ValueError, match="final_sigma must lie in"):
        sampling.sample_plms(lambda x, s, c: x * 0, torch.zeros(1, 1, 2, 2), sigmas, final_sigma=0.5)
    with pytest.raises(ValueError, match="2 is not possible"):
        sampling.steps_for_evaluations("plms", 2)


@pytest.mark.parametrize("scheduler,sampler", [("pndm", "plms"), ("ddim", "ddim")])
def test_folder_without_set_alpha_to_one_generates_diffusers_image(scheduler, sampler, tmp_path, capsys):
    folder = tiny_sd_pipeline(tmp_path / "pipe", scheduler=scheduler, set_alpha_to_one=False)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 16, "width": 16}
    expected = ref("a red circle", generator=torch.Generator().manual_seed(5), output_type="pt", **kw).images
    pipe = latentdiff.load(folder)
    printed = capsys.readouterr().out
    assert f"sampler {sampler!r}" in printed and "set_alpha_to_one=False" in printed
    got = pipe.generate("a red circle", steps=4, sampler=sampler, schedule="leading", guidance=3.0, seed=5,
                        height=16, width=16, output="pt")
    diff = ((got / 2 + 0.5).clamp(0, 1) - expected).abs().max().item()
    # Far inside the 1/255: ending at sigma 0 instead (the old behaviour) is 0.4/255 off here.
    assert diff <= 0.02 / 255, f"max pixel difference {diff * 255:.3f}/255"


def test_pndm_settings_we_do_not_reproduce_are_stated(tmp_path, capsys):
    folder = tiny_sd_pipeline(tmp_path / "pipe", scheduler="pndm", set_alpha_to_one=False)
    config = folder / "scheduler" / "scheduler_config.json"
    text = config.read_text()
    assert '"skip_prk_steps": true' in text and '"prediction_type": "epsilon"' in text
    latentdiff.load(folder)
    assert "Runge-Kutta" not in capsys.readouterr().out
    config.write_text(text.replace('"skip_prk_steps": true', '"skip_prk_steps": false')
                      .replace('"prediction_type": "epsilon"', '"prediction_type": "v_prediction"'))
    latentdiff.load(folder)
    printed = capsys.readouterr().out
    assert "skip_prk_steps=False: its Runge-Kutta warm-up steps are replaced" in printed
    assert "PNDMScheduler with v_prediction: diffusers averages the raw v outputs" in printed
