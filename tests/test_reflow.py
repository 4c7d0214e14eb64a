"""Reflow (``train/reflow.py``, ``latentdiff distill --method reflow``): an analytic oracle on Gaussian data (the
teacher's ODE map is known in closed form; a pair lies on it; the straight field through the pairs is learnable
exactly and one Euler step of it is the map), the pairs are the pipeline's own generations, the command end to end,
bitwise resume (also after an interruption inside pair generation), and a non-flow teacher refused before any work."""

import itertools
import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from _tiny import make_tiny_cache, one_thread  # noqa: F401 (fixture)
from safetensors.torch import load_file
from test_distill import tiny_teacher
from torch import nn

from latentdiff.cli import main
from latentdiff.data.cache import LatentCache
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import Flow
from latentdiff.diffusion.sampling import sample_euler
from latentdiff.diffusion.schedules import flow_sigmas
from latentdiff.train.distill import DISTILL_PRESETS, Conditions, DistillConfig, check_teacher, load_teacher
from latentdiff.train.reflow import ReflowPairs, make_pairs, pair_noise, pair_sigmas, teacher_samples
from latentdiff.types import Cond

SD = 0.5  # the Gaussian data's standard deviation


def gaussian_teacher(x, sigma, cond=None):
    """The exact denoiser of N(0, SD^2) data: E[x0 | x0 + sigma z = x] = x SD^2 / (SD^2 + sigma^2); x at inf is z."""
    s = sigma.view(-1, 1, 1, 1)
    inf = torch.isinf(s)
    return torch.where(inf, torch.zeros_like(x), x * (SD**2 / (SD**2 + s.nan_to_num(posinf=1.0) ** 2))).float()


class StraightField(nn.Module):
    """The velocity of the straight coupling x0 = SD z in flow coordinates: z_t = (SD (1 - t) + t) z, so
    v = z - x0 = (1 - SD) z = (1 - SD) z_t / (SD (1 - t) + t); c_noise = 1000 t."""

    def forward(self, x, c_noise, cond=None):
        t = (c_noise / 1000).view(-1, 1, 1, 1).to(x.dtype)
        return (1 - SD) * x / (SD * (1 - t) + t)


def test_gaussian_pairs_lie_on_the_teachers_exact_ode_map_and_reflow_straightens_it():
    """For N(0, SD^2) the probability-flow ODE dx/dsigma = (x - D) / sigma solves to x(sigma) = z sqrt(SD^2 + sigma^2)
    from x / sigma -> z at sigma = inf, so the teacher's map is x0 = SD z. The pairs' x0 converges to it as the
    sampler's steps grow; the straight field through the pairs has zero reflow loss and one Euler step of it is the
    map, where one step of the teacher's own field lands on the mean (0)."""
    z = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 20, 40):  # Euler: first order, the error halves as the steps double
        x0 = teacher_samples(gaussian_teacher, "euler", flow_sigmas(steps), z, Cond(), Cond(), 3.0)  # CFG of equal
        errors.append(float((x0 - SD * z).abs().max()))  # estimates: the estimate itself
    assert all(1.8 < a / b < 2.2 for a, b in itertools.pairwise(errors)), errors
    x0 = teacher_samples(gaussian_teacher, "heun", flow_sigmas(80), z, Cond(), Cond(), 3.0)  # second order
    assert float((x0 - SD * z).abs().max()) < 5e-4

    pairs = ReflowPairs(z, x0, torch.zeros(len(z), dtype=torch.long))
    student = Denoiser(StraightField(), Flow())
    gens = [torch.Generator().manual_seed(i) for i in range(len(z))]

    no_cache = SimpleNamespace(captions=[""])
    loss = pairs.loss(student, torch.arange(len(z)), gens, lambda idx, caps: (Cond(), None), no_cache, "cpu")
    assert loss.shape == (64,) and float(loss.max()) < 1e-6  # the pairs' residual error only
    one = sample_euler(student, z, flow_sigmas(1))  # from sigma = inf: the noise itself
    torch.testing.assert_close(one, SD * z, rtol=1e-5, atol=1e-6)
    assert float(sample_euler(Denoiser(_TeacherVelocity(), Flow()), z, flow_sigmas(1)).abs().max()) < 1e-6


class _TeacherVelocity(nn.Module):
    """The Gaussian teacher as a flow network: v = (z_t - x0_hat) / t, x0_hat = D(x, sigma) (0 at t = 1)."""

    def forward(self, x, c_noise, cond=None):
        t = (c_noise / 1000).view(-1, 1, 1, 1).to(x.dtype)
        sigma = t / (1 - t)
        x_sigma = torch.where(t >= 1, x, x * (1 + sigma.nan_to_num(posinf=0.0)))
        d = gaussian_teacher(x_sigma, sigma.flatten().double())
        return (x - d) / t


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflow")
    cache = make_tiny_cache(root)
    return {"root": root, "cache": cache, "teacher": tiny_teacher(root / "teacher", root)}


def _args(tiny, out, *more):
    return ["distill", "--preset", "shapes-reflow-test", "--teacher", str(tiny["teacher"]), "--cache",
            str(tiny["cache"]), "--out", str(out), *more]


def test_pairs_are_the_pipelines_own_generations(tiny, tmp_path):
    """A pair's x0 is what `Pipeline.generate` gives from the same noise, prompt, sampler, steps and CFG scale."""
    import latentdiff

    cfg = DistillConfig(**{**DISTILL_PRESETS["shapes-reflow-test"], "teacher": str(tiny["teacher"]),
                           "cache": str(tiny["cache"]), "out": str(tmp_path / "run")})
    teacher, cache = load_teacher(cfg.teacher), LatentCache(cfg.cache)
    check_teacher(teacher, cfg, cache)
    conditions = Conditions(cache, teacher.text_encoder, False, True, "cpu")
    pairs = make_pairs(cfg, tmp_path / "run", teacher, cache, conditions, "cpu", True, lambda: None)
    assert len(pairs) == 8 and len(list((tmp_path / "run" / "reflow_pairs").iterdir())) == 2
    torch.testing.assert_close(pairs.noise[5:6], pair_noise(cfg.seed, 5, 1, cache.bucket_shapes[0]))
    pipe = latentdiff.load(tiny["teacher"])
    for i in (0, 5):
        want = pipe.generate(cache.captions[int(pairs.index[i])], latents=pairs.noise[i:i + 1], steps=3,
                             sampler="dpmpp_2m", guidance=3.0, output="latent")
        torch.testing.assert_close(pairs.x0[i:i + 1], want.float(), rtol=1e-4, atol=1e-5)
    assert pair_sigmas(teacher, "dpmpp_2m", 3).tolist() == flow_sigmas(3).tolist()


def test_cli_end_to_end_then_load_and_generate_in_1_2_4_steps(tiny, tmp_path):
    """The student is a plain flow model whose index says Euler, 2 steps, guidance 1 and the baked-in w."""
    import latentdiff

    out = tmp_path / "run"
    main(_args(tiny, out))
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["generation"] == {"sampler": "euler", "steps": 2, "guidance": 1.0, "schedule": None,
                                   "guidance_method": "cfg", "pag_scale": 0.0}
    assert index["distilled"]["method"] == "reflow" and index["distilled"]["embedded_guidance"] == 3.0
    assert index["distilled"]["steps_range"] == [1, 4] and (out / "samples" / "step_0000002.png").is_file()
    pipe = latentdiff.load(out / "model")
    assert type(pipe.denoiser.parameterization) is Flow
    assert math.isinf(pipe._sigmas(pipe.settings())[0])  # from pure noise
    for steps in (1, 2, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert pipe.generate("a red circle", steps=steps, output="np").shape == (1, 32, 32, 3)
    with pytest.warns(UserWarning, match="reflow student was distilled for 1 to 4"):
        pipe.generate("a red circle", steps=6, output="np")
    main(_args(tiny, tmp_path / "dry", "--set", "dry_run=true", "--set", "dry_run_steps=2"))  # one chunk, in memory
    assert not (tmp_path / "dry").exists()


def test_resume_is_bitwise_also_after_an_interrupted_pair_generation(tiny, tmp_path, capsys):
    """4 steps in one go = 2 steps, a lost pair chunk, then --resume to 4; a chunk of other settings is refused."""
    more = ["--set", "sample_every=0", "--set", "save_every=100"]
    main([*_args(tiny, tmp_path / "straight", *more), "--steps", "4"])
    resumed = tmp_path / "resumed"
    main([*_args(tiny, resumed, *more), "--steps", "2"])
    (resumed / "reflow_pairs" / "chunk_00001.safetensors").unlink()  # as if killed while making it
    main([*_args(tiny, resumed, *more), "--steps", "4", "--resume"])
    a, b = (load_file(tmp_path / r / "model" / "denoiser" / "model.safetensors") for r in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):
        main([*_args(tiny, resumed, *more, "--set", "reflow_steps=4"), "--steps", "5", "--resume"])
    assert "was made with other settings" in capsys.readouterr().err


def test_a_non_flow_teacher_is_refused_before_any_work(tiny, tmp_path, capsys):
    eps = tiny_teacher(tmp_path / "eps", tiny["root"], parameterization="eps")
    with pytest.raises(SystemExit) as e:
        main(_args({**tiny, "teacher": eps}, tmp_path / "out"))
    assert e.value.code == 2
    assert "not a flow (rectified-flow) model: reflow straightens a flow ODE" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(_args(tiny, tmp_path / "out", "--set", "guidance_range=[2.0, 5.0]"))
    assert "reflow bakes one guidance scale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_args(tiny, tmp_path / "out", "--set", "reflow_sampler=euler_ancestral"))
    assert "is stochastic" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
