"""Latent consistency distillation (``train/distill.py``): the boundary condition, the teacher's solver step, an
analytic oracle on Gaussian data, one step of training, bad teachers refused before any work, the command end to
end (a folder ``latentdiff.load`` generates with in 1, 2 and 4 steps, no flags) and bitwise resume."""

import copy
import itertools
import json
import math
import warnings

import pytest
import torch
from _tiny import make_tiny_cache, one_thread  # noqa: F401 (fixture)
from safetensors.torch import load_file
from torch import nn

from latentdiff.cli import main
from latentdiff.components import (
    ConsistencyScalings,
    DenoiserSpec,
    ModelFolder,
    build_denoiser,
    load_autoencoder,
    read_model_folder,
)
from latentdiff.conditioning.guidance_scale import with_guidance_scale
from latentdiff.conditioning.text import TextEncoderConfig, build_text_encoder
from latentdiff.data.cache import LatentCache
from latentdiff.diffusion import schedules
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import EDM, Consistency, Eps, Flow
from latentdiff.diffusion.sampling import sample_ddim, sample_euler, sample_lcm
from latentdiff.model_index import ModelIndex
from latentdiff.models.families import find_preset, for_text_data
from latentdiff.models.unet import UNetConfig
from latentdiff.train.denoiser import save_model_folder
from latentdiff.train.distill import (
    DistillConfig,
    check_teacher,
    consistency_loss,
    distance,
    guided,
    load_teacher,
    noised,
    solver_step,
    student_of,
    teacher_grid,
)
from latentdiff.types import Cond


class Net(nn.Module):
    """A small random network of the Network protocol: raw = conv(x_in) + an embedding of c_noise."""

    def __init__(self, channels: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.t = nn.Linear(1, channels)

    def forward(self, x, c_noise, cond=None):
        return self.conv(x) + self.t(c_noise[:, None] / 1000)[:, :, None, None]


def tiny_teacher(folder, cache_root, parameterization="flow", vector_dim=16, num_classes=None, model_channels=16):
    """A random teacher folder that fits make_tiny_cache's latents (8 channels, 8x8) and autoencoder."""
    torch.manual_seed(1)
    unet = UNetConfig(in_channels=8, out_channels=8, model_channels=model_channels, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(1,), num_heads=2, context_dim=16, vector_dim=vector_dim, norm_groups=8,
                      num_classes=num_classes)
    spec = DenoiserSpec(parameterization=parameterization, unet=unet)
    text = build_text_encoder(TextEncoderConfig(dim=16, vocab_size=64, num_layers=1, num_heads=2))
    return save_model_folder(folder, build_denoiser(spec), text, spec, load_autoencoder(cache_root / "ae"), 32,
                             class_names=["a", "b"] if num_classes else None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    cache = make_tiny_cache(root)
    return {"root": root, "cache": cache, "teacher": tiny_teacher(root / "teacher", root)}


@pytest.mark.parametrize("base", [Flow(), Eps(schedules.alphas_cumprod(schedules.scaled_linear_betas(1000))),
                                  EDM()])
def test_boundary_condition_is_exact(base):
    """f(x, sigma_min) = x bitwise, whatever the network; at sigma = inf (flow) finite."""
    student = Denoiser(Net(), Consistency(base))
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(student(x, torch.full((3,), base.sigma_min, dtype=torch.float64)), x)
    c_skip, c_out = student.parameterization.boundary_scalings(torch.tensor([base.sigma_min, 1.0, 10.0], dtype=torch.float64))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[2] < 1e-3 and c_out[2] > 0.99
    if math.isinf(base.sigma_max):
        assert torch.isfinite(student(x, torch.full((3,), math.inf))).all()


def test_discrete_scalings_are_lcms():
    """On a 1000-step model the scalings at integer timesteps are diffusers' LCMScheduler's."""
    diffusers = pytest.importorskip("diffusers")
    base = Eps(schedules.alphas_cumprod(schedules.scaled_linear_betas(1000)))
    sched = diffusers.LCMScheduler()
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = Consistency(base).boundary_scalings(schedules.t_to_sigma(t.double(), base.alphas_cumprod))
    want = [sched.get_scalings_for_boundary_condition_discrete(int(i)) for i in t]
    torch.testing.assert_close(c_skip, torch.tensor([float(a) for a, _ in want], dtype=torch.float64))
    torch.testing.assert_close(c_out, torch.tensor([float(b) for _, b in want], dtype=torch.float64))


def test_solver_step_is_the_samplers_step():
    """The skipping-step solver is sample_ddim's and sample_euler's step, from a finite sigma and from inf."""
    for param, s, s_next in [(Eps(schedules.alphas_cumprod(schedules.scaled_linear_betas(1000))), 3.0, 1.2),
                             (Flow(), math.inf, 4.0), (Flow(), 2.0, 0.5)]:
        den = Denoiser(Net(), param)
        x = torch.randn(2, 2, 4, 4) * (1 if math.isinf(s) else s)
        sig = torch.full((2,), s, dtype=torch.float64)
        ours = solver_step(den(x, sig), x, sig, torch.full((2,), s_next, dtype=torch.float64))
        for sampler in (sample_euler, sample_ddim):
            seen = []
            sampler(den, x, torch.tensor([s, s_next, 0.0], dtype=torch.float64),
                    callback=lambda d, seen=seen: seen.append(d["x"]))
            torch.testing.assert_close(ours, seen[1], rtol=1e-5, atol=1e-6)


def test_gaussian_oracle_target_is_the_exact_flow_map():
    """Gaussian data N(0, s^2): the exact denoiser is x s^2 / (s^2 + sigma^2) and the consistency function of the
    ODE is f(x, sigma) = x sqrt((s^2 + sigma_b^2) / (s^2 + sigma^2)). With a perfect target the LCD target equals f at
    the student's point up to the DDIM step's local error, which falls as the grid refines (second order)."""
    sd, param = 0.5, EDM()
    sigma_b = param.sigma_min

    def exact_f(x, sigma, cond=None):
        return x * ((sd**2 + sigma_b**2) / (sd**2 + sigma.view(-1, 1, 1, 1) ** 2)).sqrt().float()

    def teacher(x, sigma, cond=None):
        return x * (sd**2 / (sd**2 + sigma.view(-1, 1, 1, 1) ** 2)).float()

    errors = []
    g = torch.Generator().manual_seed(0)
    for n in (20, 40, 80):
        grid = teacher_grid(param, n)
        assert grid[0] == sigma_b and len(grid) == n + 1 and (grid[1:] > grid[:-1]).all()
        i = torch.arange(1, len(grid))
        x0, noise = sd * torch.randn(len(i), 1, 2, 2, generator=g), torch.randn(len(i), 1, 2, 2, generator=g)
        x = noised(x0, noise, grid[i])
        x_next = solver_step(guided(teacher, x, grid[i], Cond(), None, None), x, grid[i], grid[i - 1])
        loss = consistency_loss(exact_f, exact_f, x, grid[i], x_next, grid[i - 1], Cond(), "l2")
        errors.append(float(loss.sum()))  # summed over the grid: the global error squared is O(1/n^3) per point..
    assert errors[0] < 1e-3 and errors[1] < errors[0] / 4 and errors[2] < errors[1] / 4, errors
    # the boundary step's target is x_next itself: f(x, sigma_b) = x
    torch.testing.assert_close(exact_f(x[:1], grid[:1]), x[:1])


def test_cfg_estimate_and_losses_by_hand():
    """guided() is D_u + w (D_c - D_u) per sample; the pseudo-Huber and L2 distances as written."""
    def teacher(x, sigma, cond):
        return x * cond.vector[:, :1, None, None]

    x, sigma = torch.ones(2, 1, 2, 2), torch.ones(2, dtype=torch.float64)
    d = guided(teacher, x, sigma, Cond(vector=torch.tensor([[3.0], [3.0]])), Cond(vector=torch.tensor([[1.0], [1.0]])),
               torch.tensor([1.0, 2.5], dtype=torch.float64))
    assert d[:, 0, 0, 0].tolist() == [3.0, 6.0]  # 1 + 1 * 2, 1 + 2.5 * 2
    a, b = torch.zeros(1, 4), torch.tensor([[0.0, 0.1, 0.2, 0.3]])
    torch.testing.assert_close(distance(a, b, "l2"), torch.tensor([(0.01 + 0.04 + 0.09) / 4]))
    c = 0.05
    want = sum(math.sqrt(v * v + c * c) - c for v in (0.0, 0.1, 0.2, 0.3)) / 4
    torch.testing.assert_close(distance(a, b, "huber", c), torch.tensor([want]))


def test_lcm_sampler_on_a_flow_student_starts_from_pure_noise():
    """One step from sigma = inf is f(noise, inf) itself; more steps re-noise with fresh noise."""
    student = Denoiser(Net(), Consistency(Flow()))
    noise = torch.randn(2, 2, 4, 4)
    one = schedules.make_sigmas("lcm", 1, student.parameterization)
    assert math.isinf(one[0]) and one.tolist()[1:] == [0.0]
    out = sample_lcm(student, noise, one)
    torch.testing.assert_close(out, student(noise, torch.full((2,), math.inf)))
    four = schedules.make_sigmas("lcm", 4, student.parameterization)
    flow = schedules.flow_sigmas(50)
    assert all(bool((flow == s).any()) for s in four[:-1])  # on the teacher's grid, which the student learned
    # discrete models keep diffusers' LCM timesteps
    eps = Eps(schedules.alphas_cumprod(schedules.scaled_linear_betas(1000)))
    torch.testing.assert_close(schedules.make_sigmas("lcm", 4, Consistency(eps)),
                               schedules.lcm_sigmas(eps.alphas_cumprod, 4))


def test_student_starts_as_the_teacher_and_a_step_lowers_the_loss(tiny):
    """The widened student (w features at zero) gives the teacher's x0 estimate for any w; a few optimizer steps
    on a fixed batch with a fixed target lower the consistency loss."""
    teacher = load_teacher(str(tiny["teacher"]))
    cfg = DistillConfig(teacher=str(tiny["teacher"]), cache=str(tiny["cache"]), grid_steps=10)
    cache = LatentCache(tiny["cache"])
    check_teacher(teacher, cfg, cache)
    torch.manual_seed(0)
    student, spec = student_of(teacher, cfg)
    assert spec.unet.vector_dim == 16 + cfg.guidance_embed_dim and spec.consistency == ConsistencyScalings()
    x0 = teacher.autoencoder.normalize(cache.mean[:4])
    both = teacher.text_encoder(cache.captions[:4] + [""] * 4)  # one token length for both
    cond, uncond = both.map(lambda t: t[:4]), both.map(lambda t: t[4:])
    w = torch.tensor([2.0, 3.0, 4.5, 6.0], dtype=torch.float64)
    grid = teacher_grid(teacher.denoiser.parameterization, cfg.grid_steps)
    n = torch.tensor([1, 4, 7, 10])
    sigma, sigma_next = grid[n], grid[n - 1]
    x = noised(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), sigma)
    s_cond = with_guidance_scale(cond, w, cfg.guidance_embed_dim)
    base = Denoiser(student.network, teacher.denoiser.parameterization)
    with torch.no_grad():
        torch.testing.assert_close(base(x, sigma, s_cond), teacher.denoiser(x, sigma, cond))
        x_next = solver_step(guided(teacher.denoiser, x, sigma, cond, uncond, w), x, sigma, sigma_next)
    target = Denoiser(copy.deepcopy(student.network), student.parameterization)
    opt = torch.optim.SGD(student.network.parameters(), lr=1e-2)  # small plain steps: each lowers the loss
    losses = []
    for _ in range(4):
        loss = consistency_loss(student, target, x, sigma, x_next, sigma_next, s_cond, "huber", 1e-3).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def _teacher_error(folder, tiny, **cfg):
    teacher = load_teacher(str(folder))
    check_teacher(teacher, DistillConfig(teacher=str(folder), cache=str(tiny["cache"]), **cfg),
                  LatentCache(tiny["cache"]))


def test_teachers_the_method_cannot_take_are_refused(tiny, tmp_path):
    root = tiny["root"]
    with pytest.raises(ValueError, match="class-conditional"):
        _teacher_error(tiny_teacher(tmp_path / "classes", root, vector_dim=None, num_classes=2), tiny)
    no_vector = tiny_teacher(tmp_path / "novec", root, vector_dim=None)
    with pytest.raises(ValueError, match="no pooled-vector input.*guidance_embed_dim = 0"):
        _teacher_error(no_vector, tiny)
    with pytest.raises(ValueError, match=r"learns one w: set guidance_range = \[w, w\]"):
        _teacher_error(no_vector, tiny, guidance_embed_dim=0)
    _teacher_error(no_vector, tiny, guidance_embed_dim=0, guidance_range=(3.0, 3.0))  # one w, no embedding: fine
    with pytest.raises(ValueError, match="outside the distilled guidance_range"):
        _teacher_error(tiny["teacher"], tiny, guidance=9.0)
    with pytest.raises(ValueError, match="consistency training has no teacher ODE"):
        _teacher_error(tiny["teacher"], tiny, method="ct")


def test_cli_end_to_end_then_load_and_generate_in_1_2_4_steps(tiny, tmp_path):
    """`latentdiff distill` writes a model folder whose index makes `generate` right without flags."""
    import latentdiff

    out = tmp_path / "run"
    main(["distill", "--preset", "shapes-lcm-test", "--teacher", str(tiny["teacher"]), "--cache", str(tiny["cache"]),
          "--out", str(out)])
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["generation"] == {"sampler": "lcm", "steps": 4, "guidance": 1.0, "schedule": "lcm",
                                   "guidance_method": "cfg", "pag_scale": 0.0}
    assert index["distilled"]["steps_range"] == [1, 8] and index["distilled"]["embedded_guidance"] == 5.0  # the default 5, in range
    assert (out / "samples" / "step_0000002.png").is_file()
    folder = read_model_folder(out / "model")
    assert isinstance(folder.denoiser.parameterization, Consistency)
    pipe = latentdiff.load(out / "model")
    assert pipe.settings().steps == 4
    for steps in (1, 2, 4, None):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # inside the distilled range: no warning
            images = pipe.generate("a red circle", steps=steps, output="np")
        assert images.shape == (1, 32, 32, 3)
    with pytest.warns(UserWarning, match="distilled for 1 to 8 sampler steps; 9 steps"):
        pipe.generate("a red circle", steps=9, output="np")
    # the w embedding is what the index says: another w gives another image
    a = pipe.generate("a red circle", output="pt")
    pipe.index.distilled.embedded_guidance = 2.0
    assert not torch.equal(a, pipe.generate("a red circle", output="pt"))


def test_resume_is_bitwise(tiny, tmp_path):
    """4 steps in one go = 2 steps, then --resume to 4 (the engine's per-sample generators and checkpoints)."""
    args = ["distill", "--preset", "shapes-lcm-test", "--teacher", str(tiny["teacher"]), "--cache", str(tiny["cache"]),
            "--set", "sample_every=0", "--set", "save_every=100"]
    main([*args, "--out", str(tmp_path / "straight"), "--steps", "4"])
    main([*args, "--out", str(tmp_path / "resumed"), "--steps", "2"])
    main([*args, "--out", str(tmp_path / "resumed"), "--steps", "4", "--resume"])
    a, b = (load_file(tmp_path / r / "model" / "denoiser" / "model.safetensors") for r in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("preset", "parameterization"), [("dit-tiny", "v"), ("mmdit-tiny", "eps")])
def test_dit_and_mmdit_students_start_as_their_teacher(preset, parameterization):
    """Any family with a pooled vector takes the w embedding: the student's x0 estimate is the teacher's for any w,
    and its consistency output is x at the boundary."""
    family, net = find_preset(preset)
    spec = DenoiserSpec(network=family, parameterization=parameterization,
                        **{family: for_text_data(family, net, 4, 16, 8)})
    torch.manual_seed(0)
    teacher = ModelFolder(ModelIndex(sample_size=64), None, build_denoiser(spec), spec, None)
    student, _ = student_of(teacher, DistillConfig(guidance_embed_dim=32))
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 7.0], dtype=torch.float64)
    cond = Cond(context=torch.randn(2, 5, 16), context_mask=torch.ones(2, 5, dtype=torch.bool), vector=torch.randn(2, 16))
    base = Denoiser(student.network, teacher.denoiser.parameterization)
    with torch.no_grad():
        want = teacher.denoiser(x, sigma, cond)
        for w in (1.0, 7.5):
            torch.testing.assert_close(base(x, sigma, with_guidance_scale(cond, w, 32)), want)
        boundary = torch.full((2,), student.sigma_min, dtype=torch.float64)
        assert torch.equal(student(x, boundary, with_guidance_scale(cond, 3.0, 32)), x)


def test_consistency_training_from_scratch_on_an_eps_teacher(tiny, tmp_path):
    """--method ct: no teacher ODE, the same loss; a random start on the teacher's architecture and encoders."""
    import latentdiff

    eps = tiny_teacher(tmp_path / "eps", tiny["root"], parameterization="eps")
    main(["distill", "--preset", "shapes-lcm-test", "--method", "ct", "--teacher", str(eps), "--cache",
          str(tiny["cache"]), "--out", str(tmp_path / "ct"), "--set", "guidance_range=[1.0, 1.0]",
          "--set", "guidance_embed_dim=0", "--set", "init=random", "--set", "sample_every=0"])
    pipe = latentdiff.load(tmp_path / "ct" / "model")
    assert pipe.index.distilled.method == "ct" and pipe.index.distilled.guidance_embed_dim == 0
    sigmas = pipe._sigmas(pipe.settings())  # diffusers' LCM timesteps on a 10-point grid
    torch.testing.assert_close(sigmas, schedules.lcm_sigmas(pipe.denoiser.parameterization.alphas_cumprod, 4, 10))
    assert pipe.generate("a red circle", output="np").shape == (1, 32, 32, 3)


def test_a_bad_teacher_fails_before_any_work_and_writes_nothing(tiny, tmp_path, capsys):
    classes = tiny_teacher(tmp_path / "classes", tiny["root"], vector_dim=None, num_classes=2)
    with pytest.raises(SystemExit) as e:
        main(["distill", "--teacher", str(classes), "--cache", str(tiny["cache"]), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "is class-conditional" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["distill", "--cache", str(tiny["cache"]), "--out", str(tmp_path / "out")])
    assert "distill needs a teacher: --teacher" in capsys.readouterr().err
