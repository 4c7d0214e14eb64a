"""Adversarial diffusion distillation (``train/add.py``, ``distill --method add``): the hinge terms' signs, a
discriminator that learns to separate a toy, the distillation term's gradient on a Gaussian oracle, the student's
levels, the U-Net's encoder features, the command end to end (also as a LoRA), bitwise resume with the
discriminator, and teachers or settings the method cannot take refused before any work."""

import json
import math
import warnings

import pytest
import torch
from _tiny import make_tiny_cache, one_thread  # noqa: F401 (fixture)
from safetensors.torch import load_file
from test_distill import tiny_teacher

from latentdiff.cli import main
from latentdiff.components import DenoiserSpec, ModelFolder, build_denoiser
from latentdiff.data.cache import LatentCache
from latentdiff.diffusion import schedules
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import Eps, Flow
from latentdiff.model_index import ModelIndex
from latentdiff.models.families import find_preset, for_text_data
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.train.add import (
    Discriminator,
    DiscriminatorHeads,
    distillation_loss,
    draw_level,
    generator_hinge,
    hinge_d_loss,
    level_probabilities,
    renoise_target,
    student_levels,
)
from latentdiff.train.add import student_loss as add_student_loss
from latentdiff.train.distill import DistillConfig, check_teacher, load_teacher
from latentdiff.types import Cond


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("add")
    cache = make_tiny_cache(root)
    return {"root": root, "cache": cache, "teacher": tiny_teacher(root / "teacher", root)}


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), num_heads=2, context_dim=8, vector_dim=8, norm_groups=8))


def _cond(n: int, seed: int = 0) -> Cond:
    g = torch.Generator().manual_seed(seed)
    return Cond(context=torch.randn(n, 3, 8, generator=g), context_mask=torch.ones(n, 3, dtype=torch.bool),
                vector=torch.randn(n, 8, generator=g))


def test_hinge_signs():
    """D's hinge loss is 0 once real logits >= 1 and fake <= -1, and pushes each the right way; the generator's
    term is -mean D(fake), lower as D rates the fake more real."""
    real, fake = torch.tensor([[1.5, 2.0]]), torch.tensor([[-1.0, -3.0]])
    assert hinge_d_loss(real, fake) == 0
    real, fake = torch.zeros(1, 2, requires_grad=True), torch.zeros(1, 2, requires_grad=True)
    hinge_d_loss(real, fake).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # descent raises real logits and lowers fake ones
    torch.testing.assert_close(generator_hinge(torch.tensor([[1.0, 3.0], [-2.0, 0.0]])), torch.tensor([-2.0, 1.0]))


def test_discriminator_learns_to_separate_a_toy(one_thread):  # noqa: F811
    """On frozen random U-Net features, the heads learn to tell N(0, I) 'real' latents from N(0.5, 0.25 I) 'fake'
    ones; the generator's term on the fakes rises (they are rated less real) as they do."""
    teacher = Denoiser(tiny_unet().requires_grad_(False), Flow())
    torch.manual_seed(0)
    disc = Discriminator(teacher, DiscriminatorHeads(teacher.network.feature_channels(), 8, hidden=16), lr=1e-2,
                         grad_clip=1.0, verbose=False)
    g = torch.Generator().manual_seed(1)

    def batch(n=8):
        real = torch.randn(n, 4, 8, 8, generator=g)
        fake = torch.randn(n, 4, 8, 8, generator=g) * 0.5 + 0.5
        sigma = torch.full((n,), 0.2, dtype=torch.float64)
        return real, fake, sigma, torch.randn(n, 4, 8, 8, generator=g), _cond(n)

    def gap():
        real, fake, sigma, noise, cond = batch(64)
        with torch.no_grad():
            c = cond.vector
            return float(disc.heads(disc.features(real, sigma, noise, cond), c).mean()
                         - disc.heads(disc.features(fake, sigma, noise, cond), c).mean())

    before, losses, g_terms = gap(), [], []
    for step in range(40):
        real, fake, sigma, noise, cond = batch()
        g_terms.append(float(disc.generator_loss(fake, real, sigma, noise, cond).mean()))
        losses.append(float(disc.step(step, generator_stepped=True)))
    assert gap() > before + 0.5 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, (before, gap(), losses)
    assert sum(g_terms[-5:]) > sum(g_terms[:5])
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in teacher.network.parameters())  # frozen


def test_distillation_gradient_is_the_oracles_pull_to_the_mode():
    """With the exact denoiser of Gaussian data N(mu, s^2) as teacher, the distillation term's gradient, averaged
    over antithetic re-noising (eps, -eps), is 2 c(t) (1 - k) (x0_hat - mu) / numel with k = s^2 / (s^2 + t^2):
    zero exactly where the student gives the data's mode, a pull towards it elsewhere (ADD's term is mode-seeking,
    as score distillation is)."""
    mu, s = 0.7, 0.5

    def teacher(x, sigma):  # the exact E[x0 | x] of N(mu, s^2) per element
        k = (s ** 2 / (s ** 2 + sigma ** 2)).to(x).view(-1, 1, 1, 1)
        return mu + k * (x - mu)

    for y0 in (torch.full((2, 1, 2, 2), mu, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)):
        t = torch.tensor([0.3, 2.0], dtype=torch.float64)
        eps = torch.randn(2, 1, 2, 2, dtype=torch.float64)
        y = y0.clone().requires_grad_(True)
        loss = sum(distillation_loss(y, renoise_target(teacher, y, t, e), t, "alpha").sum() for e in (eps, -eps)) / 2
        loss.backward()
        c, k = 1 / torch.sqrt(1 + t ** 2), s ** 2 / (s ** 2 + t ** 2)
        want = (2 * c * (1 - k)).view(-1, 1, 1, 1) * (y0 - mu) / 4
        torch.testing.assert_close(y.grad, want.to(y.grad))
    assert torch.equal(distillation_loss(y0, y0 + 1, t, "uniform"), torch.ones(2))


def test_level_weights_set_how_often_each_level_is_drawn():
    uniform = level_probabilities((), 4)
    assert torch.equal(uniform, torch.full((4,), 0.25, dtype=torch.float64))
    g, h = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)  # uniform: randint's own stream
    assert [draw_level(uniform, g).item() for _ in range(20)] == [torch.randint(4, (1,), generator=h).item()
                                                                   for _ in range(20)]
    p = level_probabilities((5.0, 1.0, 1.0, 1.0), 4)
    assert torch.allclose(p, torch.tensor([0.625, 0.125, 0.125, 0.125], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([draw_level(p, g) for _ in range(4000)]), minlength=4).double() / 4000
    assert (counts - p).abs().max() < 0.03  # about 4 standard errors of the first share
    assert draw_level(level_probabilities((0.0, 0.0, 1.0, 0.0), 4), g).item() == 2


def test_student_levels_hold_the_1_and_2_step_grids():
    flow = student_levels(Flow(), 4, 50)
    t = torch.where(torch.isinf(flow), 1.0, flow / (1 + flow))  # flow time of sigma = t / (1 - t)
    torch.testing.assert_close(t, torch.tensor([1.0, 0.76, 0.5, 0.26], dtype=torch.float64))
    eps = Eps(schedules.alphas_cumprod(schedules.scaled_linear_betas(1000)))
    want = schedules.sigmas_from_timesteps(torch.tensor([999.0, 759, 499, 259], dtype=torch.float64),
                                           eps.alphas_cumprod)[:-1]
    torch.testing.assert_close(student_levels(eps, 4, 50), want)
    for param in (Flow(), eps):
        four = student_levels(param, 4, 50).tolist()
        assert all(x in four for n in (1, 2) for x in student_levels(param, n, 50).tolist())


def test_encoder_features_are_the_down_path_and_middle():
    """UNet.encoder_features: each level's last block output and the middle's, as the full forward computes them."""
    net = tiny_unet()
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out)) for m in
             (net.down_blocks[0].resnets[-1], net.down_blocks[1].attentions[-1], net.mid_block.resnets[1])]
    x, c_noise, cond = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), _cond(2)
    with torch.no_grad():
        net(x, c_noise, cond)
        full = list(seen)
        feats = net.encoder_features(x, c_noise, cond)
    for h in hooks:
        h.remove()
    assert [f.shape[1] for f in feats] == net.feature_channels() == [16, 32, 32]
    assert [tuple(f.shape[2:]) for f in feats] == [(8, 8), (4, 4), (4, 4)]
    for a, b in zip(feats, full, strict=True):
        torch.testing.assert_close(a, b)


def _refused(tiny, folder=None, teacher=None, **cfg):
    teacher = teacher or load_teacher(str(folder or tiny["teacher"]))
    base = {"teacher": str(folder or tiny["teacher"]), "cache": str(tiny["cache"]), "method": "add",
            "guidance_embed_dim": 0, "guidance_range": (3.0, 3.0), "steps_range": (1, 4)}
    check_teacher(teacher, DistillConfig(**{**base, **cfg}), LatentCache(tiny["cache"]))


def test_settings_and_teachers_add_cannot_take_are_refused(tiny):
    _refused(tiny)  # the shapes-add-test settings: fine
    with pytest.raises(ValueError, match="ADD distils one guidance scale.*guidance_embed_dim = 0"):
        _refused(tiny, guidance_embed_dim=32, guidance_range=(2.0, 6.0))
    with pytest.raises(ValueError, match=r"steps_range \[1, 8\] must stay within \[1, 4\]"):
        _refused(tiny, steps_range=(1, 8))
    with pytest.raises(ValueError, match=r"level_weights \[2.0, 1.0\] must give one weight per student level"):
        _refused(tiny, level_weights=(2.0, 1.0))
    with pytest.raises(ValueError, match="not all zero"):
        _refused(tiny, level_weights=(0.0, 0.0, 0.0, 0.0))
    family, net = find_preset("dit-tiny")
    spec = DenoiserSpec(network=family, parameterization="flow", **{family: for_text_data(family, net, 8, 16, 16)})
    dit = ModelFolder(ModelIndex(sample_size=32), None, build_denoiser(spec), spec, None)
    with pytest.raises(ValueError, match="ADD's discriminator reads a U-Net teacher's encoder features"):
        _refused(tiny, teacher=dit)


def test_a_dit_teacher_fails_before_any_work_and_writes_nothing(tiny, tmp_path, capsys):
    args = ["distill", "--preset", "shapes-add-test", "--teacher", str(tiny["teacher"]), "--cache",
            str(tiny["cache"]), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        main([*args, "--set", "guidance_embed_dim=16"])
    assert e.value.code == 2 and "ADD distils one guidance scale" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_end_to_end_then_generate_in_1_2_4_steps(tiny, tmp_path, one_thread):  # noqa: F811
    """`distill --method add` writes a student folder that generates with the 'lcm' sampler, no flags; the metrics
    hold both players' losses and the checkpoints the discriminator and its optimizer."""
    import latentdiff

    out = tmp_path / "run"
    main(["distill", "--preset", "shapes-add-test", "--teacher", str(tiny["teacher"]), "--cache", str(tiny["cache"]),
          "--out", str(out)])
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["generation"]["sampler"] == "lcm" and index["generation"]["steps"] == 4
    assert index["generation"]["guidance"] == 1.0
    assert index["distilled"]["method"] == "add" and index["distilled"]["steps_range"] == [1, 4]
    assert index["distilled"]["embedded_guidance"] == 3.0 and index["distilled"]["guidance_embed_dim"] == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"distill", "adv", "d_loss"} <= metrics[-1].keys() and all(math.isfinite(m["d_loss"]) for m in metrics)
    last = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert (last / "discriminator.safetensors").is_file() and (last / "disc_optimizer.safetensors").is_file()
    pipe = latentdiff.load(out / "model")
    for steps in (1, 2, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # inside the distilled range
            assert pipe.generate("a red circle", steps=steps, output="np").shape == (1, 32, 32, 3)
    with pytest.warns(UserWarning, match="add student was distilled for 1 to 4 sampler steps"):
        pipe.generate("a red circle", steps=6, output="np")


def test_resume_is_bitwise_with_the_discriminator(tiny, tmp_path, one_thread):  # noqa: F811
    """4 steps in one go = 2 steps, then --resume to 4: the student and the discriminator heads, bit for bit."""
    args = ["distill", "--preset", "shapes-add-test", "--teacher", str(tiny["teacher"]), "--cache", str(tiny["cache"]),
            "--set", "sample_every=0", "--set", "save_every=100"]
    main([*args, "--out", str(tmp_path / "straight"), "--steps", "4"])
    main([*args, "--out", str(tmp_path / "resumed"), "--steps", "2"])
    main([*args, "--out", str(tmp_path / "resumed"), "--steps", "4", "--resume"])
    for name in ("model/denoiser/model.safetensors", "checkpoints/step_0000004/discriminator.safetensors",
                 "checkpoints/step_0000004/disc_optimizer.safetensors"):
        a, b = (load_file(tmp_path / r / name) for r in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_add_lora_loads_as_a_student(tiny, tmp_path, one_thread):  # noqa: F811
    """--lora-rank with --method add: the LoRA on the frozen teacher, its file's index entries say 'add'."""
    import latentdiff

    out = tmp_path / "lora"
    main(["distill", "--preset", "shapes-add-test", "--teacher", str(tiny["teacher"]), "--cache", str(tiny["cache"]),
          "--out", str(out), "--lora-rank", "4", "--set", "sample_every=0"])
    pipe = latentdiff.load(tiny["teacher"])
    pipe.load_lora(out / "lora.safetensors")
    assert pipe.index.distilled.method == "add" and pipe.settings().sampler == "lcm"
    assert pipe.generate("a red circle", steps=1, output="np").shape == (1, 32, 32, 3)


def test_student_loss_draws_the_discriminators_levels_up_to_disc_sigma_max():
    """The discriminator sees finite grid levels only, up to disc_sigma_max; the teacher re-noises at finite levels
    above the boundary; with a student that returns x0 and a teacher that returns its input's x0, L_dist is 0."""
    grid = torch.tensor([0.002, 0.1, 0.5, 1.0, 3.0, math.inf], dtype=torch.float64)
    seen = {}

    class Recorder:
        def generator_loss(self, fake, real, sigma, noise, cond):
            seen["sigma_d"] = sigma
            return torch.zeros(len(fake))

    x0 = torch.randn(64, 2, 4, 4)

    def teacher(x, t):
        seen["t"] = t
        return x0

    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    loss, terms = add_student_loss(lambda x, s, c: x0, teacher, Recorder(), x0, x0, None, gens, Cond(), grid,
                                   adv_weight=1.0, distill_weight=2.5, weighting="alpha", disc_sigma_max=1.0)
    assert seen["sigma_d"].max() <= 1.0 and set(seen["sigma_d"].tolist()) == {0.002, 0.1, 0.5, 1.0}
    assert seen["t"].min() >= 0.1 and torch.isfinite(seen["t"]).all() and terms["distill"] == 0 and (loss == 0).all()
