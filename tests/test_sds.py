"""Score distillation into voxels: the update's formulas and sign, prompt reading, refusals, the asset files."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from _tiny import tiny_model_folder

import latentdiff
from latentdiff.threed.asset import have_marching_cubes, load_voxels, mesh_obj, save_asset
from latentdiff.threed.sds import (
    SDSConfig,
    background_variants,
    check_text_to_image,
    distill,
    evaluate,
    fixed_point_error,
    judge_views,
    make_field,
    opacity_entropy,
    plan_prompt,
    ramp,
    sds_update,
    swap_backgrounds,
)
from latentdiff.threed.voxels import turntable
from latentdiff.types import Cond

PROMPT = "a large red circle in the middle on a black background"


@pytest.fixture(scope="module")
def pipe():
    return latentdiff.load()


class _TwoWay(torch.nn.Module):
    """A denoiser whose estimate is ``a`` under the conditional Cond (vector 1) and ``b`` under the null one."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, sigma, cond):
        pick = cond.vector.view(-1, 1, 1, 1)
        return pick * self.a + (1 - pick) * self.b + 0 * x


def test_sds_update_formulas_and_sign():
    """sds: z - (D_u + w (D_c - D_u)); csd: w (D_u - D_c); and gradient descent on sum(update * z) moves z to the
    denoiser's target (a perfect denoiser of one point: the SDS fixed point is that point)."""
    torch.manual_seed(0)
    a, b, z = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.randn(3, 4, 2, 2)
    cond, uncond = Cond(vector=torch.ones(1, 1)), Cond(vector=torch.zeros(1, 1))
    sigma, eps = torch.tensor([0.5, 2.0, 9.0]), torch.randn_like(z)
    den = _TwoWay(a, b)
    assert torch.allclose(sds_update(den, z, sigma, eps, cond, uncond, 7.0, "sds"), z - (b + 7 * (a - b)), atol=1e-6)
    assert torch.allclose(sds_update(den, z, sigma, eps, cond, uncond, 7.0, "csd"), 7 * (b - a).expand_as(z))
    with pytest.raises(ValueError, match="method"):
        sds_update(den, z, sigma, eps, cond, uncond, 7.0, "vsd")
    assert torch.allclose(sds_update(den, z, sigma, eps, cond, uncond, 1.0, "sds"), z - a, atol=1e-6)  # cond only
    rows = Cond(vector=torch.tensor([[1.0], [0.0], [1.0]]))  # a conditioning row per view
    assert torch.allclose(sds_update(den, z, sigma, eps, rows, uncond, 1.0, "sds"),
                          z - torch.cat([a, b, a]), atol=1e-6)
    param = torch.zeros(3, 4, 2, 2, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.2)
    target = _TwoWay(a, a)
    for _ in range(60):
        with torch.no_grad():
            update = sds_update(target, param.detach(), sigma, torch.randn_like(z), cond, uncond, 3.0, "sds")
        opt.zero_grad()
        (update * param).sum().backward()
        opt.step()
    assert torch.allclose(param, a.expand_as(param), atol=1e-4)


def test_prompt_reading(pipe):
    plan = plan_prompt(pipe, PROMPT)
    assert plan.model_prompt == PROMPT and plan.background == (0.0, 0.0, 0.0)
    assert (plan.scene.objects[0].color, plan.scene.objects[0].shape) == ("red", "circle")
    ball = plan_prompt(pipe, "a red ball")
    assert ball.model_prompt == "a red circle" and ball.background is None and "'ball'" in ball.notes[0]
    assert plan_prompt(pipe, "a blue cube on a white background").model_prompt == "a blue square on a white background"
    with pytest.raises(ValueError, match="cannot parse"):
        plan_prompt(pipe, "a photo of a dog")
    with pytest.raises(ValueError, match="2 objects"):
        plan_prompt(pipe, "a red circle on the left and a blue square on the right")
    with pytest.raises(ValueError, match="centre"):
        plan_prompt(pipe, "a red circle on the left")
    with pytest.raises(ValueError, match="empty"):
        plan_prompt(pipe, "  ")


@pytest.mark.parametrize("kind, change", [
    ("class-conditional", {"class_names": ["cat", "dog"]}),
    ("inpainting", {"concat": "inpaint"}),
    ("super-resolution", {"upscale": 2}),
    ("video", {"frames": 8}),
])
def test_refuses_models_that_are_not_text_to_image(pipe, kind, change):
    other = copy.copy(pipe)
    other.index = dataclasses.replace(pipe.index, **change)
    with pytest.raises(ValueError, match=kind):
        check_text_to_image(other)
    with pytest.raises(ValueError, match=kind):
        distill(other, plan_prompt(pipe, PROMPT), SDSConfig(steps=1))
    check_text_to_image(pipe)


def test_the_starting_blob_has_the_prompts_size(pipe):
    """The density blob starts at the stated size's radius (shapes geometry): a small object's silhouette is smaller
    by about (0.11 / 0.2)^2 in area."""
    areas = {}
    for size in ("small", "large"):
        plan = plan_prompt(pipe, f"a {size} red circle in the middle on a black background")
        field = make_field(pipe, plan, SDSConfig(resolution=16))
        areas[size] = float((field.render(turntable(1), 32, samples=32)[1] > 0.5).float().mean())
    assert areas["small"] / areas["large"] == pytest.approx((0.11 / 0.2) ** 2, rel=0.35)


def test_config_is_checked():
    with pytest.raises(ValueError, match="t_min"):
        SDSConfig(t_min=0.6, t_max_end=0.5)
    with pytest.raises(ValueError, match="elevation"):
        SDSConfig(elevation=(10.0, -10.0))


@pytest.mark.parametrize("method, space", [("sds", "image"), ("sds", "encoder"), ("csd", "image"), ("sds", "latent")])
def test_distill_on_a_tiny_random_model(tmp_path, method, space):
    """Two steps on a random model (16 px, factor 2): finite, the field moved, the model's weights untouched and
    left with no gradients."""
    pipe = latentdiff.load(tiny_model_folder(tmp_path / "m"))
    before = {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}
    cfg = SDSConfig(steps=2, views=2, resolution=8, samples=8, method=method, space=space)
    result = distill(pipe, plan_prompt(pipe, PROMPT), cfg)
    assert result.field.channels == (pipe.autoencoder.latent_channels if space == "latent" else 3)
    fresh = type(result.field)(8)
    assert not torch.allclose(result.field.density_raw, fresh.density_raw)
    images, opacity = result.views(turntable(2), 16)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1 and opacity.shape == (2, 16, 16)
    assert all(torch.equal(v, before[k]) for k, v in pipe.denoiser.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in pipe.autoencoder.parameters())
    assert len(result.history) == 2 and result.cpu_seconds > 0


def test_sparsity_thins_the_field(tmp_path):
    """The opacity penalty, alone above the SDS update, lowers the rendered opacity (same seed, same steps)."""
    pipe = latentdiff.load(tiny_model_folder(tmp_path / "m"))
    plan = plan_prompt(pipe, PROMPT)
    opacity = {}
    for weight in (0.0, 100.0):
        result = distill(pipe, plan, SDSConfig(steps=10, views=2, resolution=8, samples=8, sparsity=weight, lr=0.2))
        opacity[weight] = float(result.views(turntable(2), 16)[1].mean())
    assert opacity[100.0] < 0.7 * opacity[0.0], opacity


def test_fixed_point_error_of_guidance():
    """An identity autoencoder and a denoiser whose conditional estimate is the right image z and unconditional one
    b: the target D_u + w (D_c - D_u) is the image at w = 1 (error 0) and strays by (w - 1) (z - b) / 2 in pixels."""
    from types import SimpleNamespace
    torch.manual_seed(0)
    images = torch.rand(2, 3, 4, 4)
    z, b = images * 2 - 1, torch.zeros(1, 3, 4, 4)

    def denoiser(x, sigma, cond):
        pick = cond.vector.view(-1, 1, 1, 1)
        return pick * z.repeat(len(x) // len(z), 1, 1, 1) + (1 - pick) * b  # cond only (w = 1) or cond + uncond

    pipe = SimpleNamespace(
        denoiser=denoiser, autoencoder=SimpleNamespace(encode=lambda x: x, decode=lambda x: x),
        encode_prompts=lambda p, n: (Cond(vector=torch.ones(len(p), 1)), Cond(vector=torch.zeros(len(n), 1))))
    g = torch.Generator().manual_seed(0)
    assert fixed_point_error(pipe, images, ["a", "b"], 1.0, [0.2, 0.8], g) == pytest.approx([0.0, 0.0], abs=1e-6)
    strayed = fixed_point_error(pipe, images, ["a", "b"], 5.0, [0.5], g)[0]
    assert strayed == pytest.approx(float((4 * (z - b) / 2).square().mean().sqrt()), rel=1e-5)


def test_opacity_entropy_is_the_binary_entropy_and_pushes_away_from_one_half():
    """H(a) = -a log a - (1 - a) log(1 - a), summed per view and averaged over views; its gradient log((1 - a) / a)
    is 0 at 1/2, and a descent step moves every opacity away from 1/2 (toward 0 below it, toward 1 above it)."""
    a = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 0.999]], requires_grad=True)
    h = lambda p: -(p * np.log(p) + (1 - p) * np.log(1 - p))
    expected = sum(h(p) for p in (0.1, 0.5, 0.9, 0.3, 0.7, 0.999)) / 2
    value = opacity_entropy(a)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert torch.allclose(a.grad, torch.log((1 - a) / a).detach() / 2, atol=1e-5)
    stepped = a.detach() - 0.01 * a.grad
    below, above = a.detach() < 0.5, a.detach() > 0.5
    assert (stepped[below] < a.detach()[below]).all() and (stepped[above] > a.detach()[above]).all()
    assert a.grad[0, 1] == 0
    empty = torch.zeros(1, 4, requires_grad=True)  # rays that miss the object: clamped, no gradient, ~0 cost
    opacity_entropy(empty).backward()
    assert float(opacity_entropy(empty)) < 1e-2 and torch.equal(empty.grad, torch.zeros(1, 4))


def test_ramp():
    assert [ramp(s, 11, 0.5) for s in (0, 1, 5, 8, 10)] == [0.0, pytest.approx(0.2), 1.0, 1.0, 1.0]
    assert ramp(0, 11, 0.0) == 1.0 and ramp(0, 1, 0.5) == 0.0


def test_opacity_entropy_makes_the_field_binary(tmp_path):
    """The entropy penalty, strong above the SDS update of a random model, leaves fewer rays of middling opacity
    (0.1 < a < 0.9) than the same run without it (same seed, same steps)."""
    pipe = latentdiff.load(tiny_model_folder(tmp_path / "m"))
    plan = plan_prompt(pipe, PROMPT)
    middling = {}
    for weight in (0.0, 20.0):
        cfg = SDSConfig(steps=12, views=2, resolution=8, samples=8, opacity_entropy=weight, entropy_ramp=0.0, lr=0.2)
        opacity = distill(pipe, plan, cfg).views(turntable(2), 16)[1]
        middling[weight] = float(((opacity > 0.1) & (opacity < 0.9)).float().mean())
    assert middling[20.0] < 0.7 * middling[0.0], middling


def test_background_variants(pipe):
    from latentdiff.data.shapes import parse_caption
    plan = plan_prompt(pipe, "a small blue square in the center, grey background")
    variants = background_variants(plan)
    assert variants[0] == (plan.model_prompt, (128 / 255,) * 3) and len(variants) == 3
    assert [parse_caption(p).background for p, _ in variants] == ["gray", "black", "white"]
    assert [c for _, c in variants[1:]] == [(0.0,) * 3, (1.0,) * 3]
    assert all(parse_caption(p).objects == plan.scene.objects for p, _ in variants)
    assert background_variants(plan_prompt(pipe, "a red ball")) == [("a red circle", None)]


def test_swapped_background_equals_rendering_on_it():
    """A view recomposited over another background is the view rendered with that background (compositing is
    linear in the background); the conditioning rows follow the picks; share 0 moves nothing, share 1 every view."""
    from latentdiff.threed.voxels import VoxelField
    torch.manual_seed(0)
    field = VoxelField(8, background=(0.5, 0.5, 0.5), init_radius=0.5)
    white = VoxelField(8, background=(1.0, 1.0, 1.0), init_radius=0.5)
    white.load_state_dict(field.state_dict())
    white.background_raw.data = torch.logit(torch.tensor([1.0] * 3).clamp(1e-3, 1 - 1e-3))
    cameras = turntable(3)
    images, opacity = field.render(cameras, 16, samples=16)
    conds = Cond(vector=torch.arange(3.0).view(3, 1))
    others = white.background().view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    moved, cond = swap_backgrounds(images, opacity, field.background(), others, conds, 1.0, g)
    assert torch.allclose(moved, white.render(cameras, 16, samples=16)[0], atol=1e-5)
    assert cond.vector.flatten().tolist() == [1.0, 1.0, 1.0]
    same, cond = swap_backgrounds(images, opacity, field.background(), others, conds, 0.0, g)
    assert torch.equal(same, images) and cond.vector.flatten().tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="latent"):
        SDSConfig(space="latent", other_backgrounds=0.5)


def test_distill_with_other_backgrounds(tmp_path):
    """Views on the other backgrounds, each with its own prompt row: the denoiser sees three distinct conditional
    rows over a run, and the stated background stays the field's."""
    pipe = latentdiff.load(tiny_model_folder(tmp_path / "m"))
    seen = []
    pipe.denoiser.network.register_forward_pre_hook(
        lambda module, args: seen.append((args[2].context if args[2].context is not None else args[2].vector).flatten(1)))
    plan = plan_prompt(pipe, PROMPT)
    result = distill(pipe, plan, SDSConfig(steps=6, views=4, resolution=8, samples=8, other_backgrounds=0.7))
    rows = torch.cat([v[: len(v) // 2] for v in seen])  # the conditional half of each batch
    assert len(torch.unique(rows, dim=0)) == 3
    assert torch.allclose(result.field.background(), torch.zeros(3), atol=1e-3)


def test_judge_views_counts_right_and_consistent_views():
    from latentdiff.data.shapes import parse_caption, render
    scene = parse_caption(PROMPT)
    red = render(dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], position="center"),)), 32)
    blue = render(parse_caption("a large blue circle in the middle on a black background"), 32)
    out = judge_views([red, red, red, blue], scene)
    assert out["right"] == 0.75 and out["consistency"] == 0.75 and out["readings"][0] == "red circle large"


@pytest.mark.skipif(not have_marching_cubes(), reason="scikit-image not installed")
def test_mesh_of_a_ball():
    """Marching cubes of a ball of radius 0.5: every vertex within a voxel of the sphere, in the ball's colour."""
    n = 24
    c = (np.arange(n) + 0.5) / n * 2 - 1
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    density = np.where(np.sqrt(x ** 2 + y ** 2 + z ** 2) < 0.5, 100.0, 0.0)
    rgb = np.broadcast_to(np.array([0.2, 0.4, 0.6]).reshape(3, 1, 1, 1), (3, n, n, n))
    text, info = mesh_obj(density, rgb)
    verts = np.array([[float(v) for v in line.split()[1:]] for line in text.splitlines() if line.startswith("v ")])
    assert info["vertices"] == len(verts) > 100 and info["faces"] > 100
    assert np.abs(np.linalg.norm(verts[:, :3], axis=1) - 0.5).max() < 2 / n
    assert np.allclose(verts[:, 3:], [0.2, 0.4, 0.6])
    assert mesh_obj(np.zeros((n, n, n)), rgb) is None


def test_asset_files(tmp_path, pipe):
    cfg = SDSConfig(steps=2, views=2, resolution=8, samples=8, frames=2, gif_size=16, eval_views=2)
    plan = plan_prompt(pipe, PROMPT)
    result = distill(pipe, plan, cfg)
    evaluation, views = evaluate(result, 32, 2)
    report = save_asset(tmp_path / "out", result, cfg, evaluation, views)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"turntable.gif", "views.png", "voxels.npz", "report.json"} <= files
    arrays = load_voxels(tmp_path / "out" / "voxels.npz")
    assert arrays["density"].shape == (8, 8, 8) and arrays["rgb"].shape == (3, 8, 8, 8)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["evaluation"]["views"] == 2
    assert report["prompt"] == PROMPT and set(evaluation) >= {"right", "consistency", "area_cv"}


def test_cli(tmp_path, capsys):
    """In process (the command's glue): files written; bad prompts and settings refused with one line, exit 2,
    nothing written."""
    from latentdiff.cli import main

    out = tmp_path / "ball"
    main(["sds", "a red ball", "--out", str(out), "--steps", "2", "--set", "resolution=8", "--set", "samples=8",
          "--set", "frames=2", "--set", "gif_size=16", "--set", "views=2"])
    assert "'ball' read as 'circle'" in capsys.readouterr().out and (out / "turntable.gif").is_file()
    for args, message in [(["a photo of a dog"], "cannot parse"), ([PROMPT, "--set", "method=vsd"], "method"),
                          ([PROMPT, "--steps", "0"], "steps")]:
        with pytest.raises(SystemExit) as exit_:
            main(["sds", *args, "--out", str(tmp_path / "x")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "x").exists()
