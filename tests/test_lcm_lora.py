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
from torch import Tensor

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


# ------------------------------------------------------------------------------- LCM-LoRA distilled here


@pytest.fixture(scope="module")
def lcm_run(tmp_path_factory):
    """`latentdiff distill --lora-rank 4` of a tiny random flow teacher on a tiny cache (3 steps)."""
    from _tiny import make_tiny_cache
    from test_distill import tiny_teacher

    from latentdiff.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lcm_lora_run")
    cache = make_tiny_cache(root)
    teacher = tiny_teacher(root / "teacher", root)
    before = (teacher / "denoiser" / "model.safetensors").read_bytes()
    out = root / "run"
    main(["distill", "--preset", "shapes-lcm-test", "--teacher", str(teacher), "--cache", str(cache), "--out", str(out),
          "--lora-rank", "4", "--lora-targets", "attention", "conv", "--set", "guidance_embed_dim=0",
          "--set", "guidance_range=[3.0, 3.0]", "--set", "lr=1e-2"])
    assert (teacher / "denoiser" / "model.safetensors").read_bytes() == before  # the teacher stays frozen
    yield {"root": root, "cache": cache, "teacher": teacher, "out": out, "lora": out / "lora.safetensors"}
    torch.set_num_threads(n)


def test_distilled_lcm_lora_file_names_its_settings(lcm_run):
    from latentdiff.models.lora import read_lora_metadata

    assert lcm_run["lora"].is_file() and not (lcm_run["out"] / "model").exists()
    assert (lcm_run["out"] / "samples" / "step_0000002.png").is_file()
    meta = read_lora_metadata(lcm_run["lora"])
    assert meta["rank"] == 4 and meta["targets"][:2] == ["to_q", "to_k"] and meta["family"] == "unet"
    assert meta["generation"] == {"sampler": "lcm", "steps": 4, "guidance": 1.0, "schedule": "lcm",
                                  "guidance_method": "cfg", "pag_scale": 0.0}
    assert meta["distilled"]["steps_range"] == [1, 8] and meta["distilled"]["guidance_embed_dim"] == 0
    assert meta["distilled"]["embedded_guidance"] == 3.0 and meta["distilled"]["grid_steps"] == 10
    assert meta["consistency"] == {"sigma_data": 0.5, "timestep_scaling": 10.0}
    assert meta["parameterization"] == "flow"


def test_loaded_lcm_lora_makes_the_pipeline_its_student(lcm_run):
    import warnings

    pipe = latentdiff.load(lcm_run["teacher"])
    own = pipe.generate("a red circle", output="pt")
    index, denoiser = pipe.index, pipe.denoiser
    pipe.load_lora(lcm_run["lora"])
    assert isinstance(pipe.denoiser.parameterization, Consistency) and pipe.denoiser.network is denoiser.network
    use = pipe.settings()
    assert (use.sampler, use.steps, use.guidance, use.schedule) == ("lcm", 4, 1.0, "lcm")
    grid = pipe._sigmas(use)  # the 10-point teacher grid the LoRA learned, LCM's picks from it
    assert len(grid) == 5 and torch.isinf(grid[0])
    for steps in (1, 2, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # inside the trained range: no warning
            assert torch.isfinite(pipe.generate("a red circle", steps=steps, output="pt")).all()
    with pytest.warns(UserWarning, match="distilled for 1 to 8 sampler steps; 9 steps"):
        pipe.generate("a red circle", steps=9, output="pt")
    # the adapters trained: the student's estimate is not the teacher's network under the same scalings
    x, sigma = torch.randn(1, 8, 8, 8), torch.tensor([2.0], dtype=torch.float64)
    cond = pipe.text_encoder(["a red circle"])
    with torch.no_grad():
        with_lora = pipe.denoiser(x, sigma, cond)
        pipe.loras[0].enabled = False
        without = pipe.denoiser(x, sigma, cond)
    assert (with_lora - without).abs().max() > 1e-4
    pipe.unload_loras()  # the teacher again, exactly
    assert pipe.index is index and pipe.denoiser is denoiser
    assert torch.equal(pipe.generate("a red circle", output="pt"), own)


def test_generate_cli_with_the_lcm_lora(lcm_run, tmp_path, capsys):
    from PIL import Image

    from latentdiff.cli import main

    args = ["generate", "a red circle", "--model", str(lcm_run["teacher"]), "--lora", str(lcm_run["lora"])]
    main([*args, "--sampler", "lcm", "--steps", "4", "--out", str(tmp_path / "a.png")])
    main([*args, "--out", str(tmp_path / "b.png")])  # no flags: the LoRA's settings
    for name in ("a.png", "b.png"):
        params = Image.open(tmp_path / name).text["parameters"]
        assert '"sampler": "lcm"' in params and '"steps": 4' in params and '"guidance": 1.0' in params, params
    assert "warning" not in capsys.readouterr().err
    main([*args, "--steps", "9", "--out", str(tmp_path / "c.png")])
    assert "warning: this lcm student was distilled for 1 to 8 sampler steps; 9 steps run" in capsys.readouterr().err


def test_lcm_lora_for_another_model_is_refused(lcm_run):
    """Another architecture (other widths: the bundled model), another parameterization (an eps teacher of the same
    shapes), and a model that is already a student: refused before anything changes, naming what does not fit."""
    from test_distill import tiny_teacher

    wide = latentdiff.load(tiny_teacher(lcm_run["root"] / "wide", lcm_run["root"], model_channels=32))
    with pytest.raises(ValueError, match=r"another architecture: \d+ layers differ in shape \(.*to_q: adapter"):
        wide.load_lora(lcm_run["lora"])
    assert not wide.loras and wide.index.distilled is None
    eps = latentdiff.load(tiny_teacher(lcm_run["root"] / "eps", lcm_run["root"], parameterization="eps"))
    with pytest.raises(ValueError, match="distilled from a flow-prediction model.*is eps: load it onto its teacher"):
        eps.load_lora(lcm_run["lora"])
    assert not eps.loras and not any(type(m).__name__.startswith("LoRA") for m in eps.denoiser.network.modules())
    pipe = latentdiff.load(lcm_run["teacher"])
    pipe.load_lora(lcm_run["lora"])
    with pytest.raises(ValueError, match="already a few-step student"):
        pipe.load_lora(lcm_run["lora"])
    assert len(pipe.loras) == 1


def test_lcm_lora_settings_refused_before_any_work(lcm_run, tmp_path, capsys):
    """The default w embedding cannot be a LoRA's: refused, saying what to set; nothing written."""
    from latentdiff.cli import main

    args = ["distill", "--preset", "shapes-lcm-test", "--teacher", str(lcm_run["teacher"]), "--cache",
            str(lcm_run["cache"]), "--out", str(tmp_path / "bad"), "--lora-rank", "4"]
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert "takes no guidance-scale embedding (set guidance_embed_dim = 0 and one w, guidance_range = [w, w])" in err
    assert not (tmp_path / "bad" / "lora.safetensors").exists() and not (tmp_path / "bad" / "checkpoints").exists()


def test_one_network_is_student_target_and_teacher(lcm_run):
    """``LoRAStudent``: the student is the network with the trained adapters, the target with the EMA's, the
    teacher with neither (each equal to a copy of the network with those adapters merged, or none)."""
    import copy
    import types

    from latentdiff.components import read_model_folder
    from latentdiff.models.lora import LoRA
    from latentdiff.train.distill import DistillConfig, LoRAStudent

    teacher = read_model_folder(lcm_run["teacher"])
    plain = copy.deepcopy(teacher.denoiser)
    run = types.SimpleNamespace()
    run.build = lambda module, **_: setattr(run, "ema", types.SimpleNamespace(module=copy.deepcopy(module)))
    parts = LoRAStudent(teacher, DistillConfig(lora_rank=2, lora_targets=("attention", "conv")), run)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in (parts.lora, parts.ema):
            for layer in lora.layers:
                layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.1)
    x, sigma = torch.randn(2, 8, 8, 8, generator=g), torch.tensor([0.3, 3.0], dtype=torch.float64)
    cond = teacher.text_encoder(["a red circle", "a blue square"])

    def merged(lora: LoRA | None) -> Tensor:
        net = copy.deepcopy(plain.network)
        if lora is not None:
            alone = copy.deepcopy(lora)  # detached, switched on
            alone.enabled = True
            alone.attach(net).merge()
        return Denoiser(net, parts.param)(x, sigma, cond)

    with torch.no_grad():
        student, target = parts.student(x, sigma, cond), parts.target(x, sigma, cond)
        with parts.using(None):
            torch.testing.assert_close(teacher.denoiser(x, sigma, cond), plain(x, sigma, cond), rtol=0, atol=0)
        torch.testing.assert_close(student, merged(parts.lora), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target, merged(parts.ema), rtol=1e-5, atol=1e-5)
        assert (student - target).abs().max() > 1e-3 and (target - merged(None)).abs().max() > 1e-3
    assert parts.lora.enabled and not parts.ema.enabled  # after each switch: the training state


def test_lcm_lora_resume_is_bitwise(lcm_run, tmp_path):
    """4 steps in one go = 2 steps, then --resume to 4: the same LoRA file."""
    from safetensors.torch import load_file

    from latentdiff.cli import main

    args = ["distill", "--preset", "shapes-lcm-test", "--teacher", str(lcm_run["teacher"]), "--cache",
            str(lcm_run["cache"]), "--lora-rank", "2", "--set", "guidance_embed_dim=0", "--set",
            "guidance_range=[3.0, 3.0]", "--set", "sample_every=0", "--set", "save_every=100"]
    main([*args, "--out", str(tmp_path / "straight"), "--steps", "4"])
    main([*args, "--out", str(tmp_path / "resumed"), "--steps", "2"])
    main([*args, "--out", str(tmp_path / "resumed"), "--steps", "4", "--resume"])
    a, b = (load_file(tmp_path / r / "lora.safetensors") for r in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # trained
