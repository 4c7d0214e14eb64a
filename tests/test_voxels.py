"""The voxel renderer against analytic silhouettes, its camera conventions, and its gradients."""

import math

import pytest
import torch

from latentdiff.threed.voxels import Camera, VoxelField, camera_rays, composite, render_volume, turntable


def _solid(resolution: int, inside, rgb=(1.0, 0.0, 0.0), density: float = 1000.0) -> torch.Tensor:
    """A (4, R, R, R) volume: ``density`` where ``inside(x, y, z)``, empty elsewhere; colour ``rgb`` everywhere (a
    colour that fell to 0 outside would darken the edge samples that trilinear reads of density make opaque)."""
    c = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    mask = inside(x, y, z).float()
    return torch.cat([(density * mask)[None], torch.tensor(rgb).view(3, 1, 1, 1).expand(3, *mask.shape)])


def _pixel_radius(size: int) -> torch.Tensor:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    return (c.view(-1, 1) ** 2 + c.view(1, -1) ** 2).sqrt()


@pytest.mark.parametrize("fov", [0.0, 30.0])
def test_sphere_renders_its_disc_from_every_view(fov):
    """A red ball of radius 0.5 on black: every view (azimuths all round, elevations -60..75) shows a red disc of
    the projected radius and black outside it, away from the one-voxel band at the edge."""
    size, radius = 32, 0.5
    volume = _solid(48, lambda x, y, z: x * x + y * y + z * z <= radius ** 2)
    cams = [Camera(a, e, fov=fov) for a, e in [(0, 0), (45, 20), (135, -60), (270, 75), (200, 10)]]
    images, opacity = render_volume(volume, cams, size, torch.zeros(3), samples=96)
    # orthographic: the disc has the ball's radius; perspective at distance d: tan(asin(r / d)) / tan(fov / 2)
    disc = radius if fov == 0 else math.tan(math.asin(radius / 3.0)) / math.tan(math.radians(fov) / 2)
    r = _pixel_radius(size)
    band = 2.5 / size * 2  # two and a half pixels of blur at the edge (trilinear reads, one voxel)
    inside, outside = r < disc - band, r > disc + band
    for img, op in zip(images, opacity):
        assert torch.allclose(img[:, inside], torch.tensor([1.0, 0.0, 0.0]).view(3, 1), atol=1e-3)
        assert img[:, outside].abs().max() < 1e-6 and op[outside].max() < 1e-6
        assert op[inside].min() > 0.999


def test_camera_conventions():
    """A cube offset along +x is on the right seen from azimuth 0 (the +z side), on the left from 180, in the middle
    from 90 (the +x side); one offset along +y is at the top of every side view; and the image's right / up are
    unit vectors perpendicular to the view direction."""
    box_x = _solid(32, lambda x, y, z: ((x - 0.5).abs() < 0.2) & (y.abs() < 0.2) & (z.abs() < 0.2))
    box_y = _solid(32, lambda x, y, z: (x.abs() < 0.2) & ((y - 0.5).abs() < 0.2) & (z.abs() < 0.2))
    cams = turntable(4)  # azimuths 0, 90, 180, 270

    def centre(op):  # opacity-weighted (column, row) in [-1, 1], row +1 at the bottom
        c = (torch.arange(op.shape[-1]) + 0.5) / op.shape[-1] * 2 - 1
        w = op / op.sum()
        return float((w.sum(0) * c).sum()), float((w.sum(1) * c).sum())

    _, op = render_volume(box_x, cams, 32, torch.zeros(3))
    cols = [centre(o)[0] for o in op]
    assert cols[0] == pytest.approx(0.5, abs=0.05) and cols[2] == pytest.approx(-0.5, abs=0.05)
    assert abs(cols[1]) < 0.05 and cols[3] == pytest.approx(0.0, abs=0.05)
    _, op = render_volume(box_y, cams, 32, torch.zeros(3))
    assert all(centre(o)[1] == pytest.approx(-0.5, abs=0.05) for o in op)
    for cam in [Camera(30, 40), Camera(-100, -10), Camera(0, 90)]:
        _, forward, right, up = cam.frame()
        for v in (forward, right, up):
            assert float(v.norm()) == pytest.approx(1.0, abs=1e-6)
        assert abs(float(forward @ right)) < 1e-6 and abs(float(forward @ up)) < 1e-6
    origins, directions = camera_rays(Camera(0, 0, extent=2.0), 4)
    assert torch.allclose(origins[0, 0], torch.tensor([-1.5, 1.5, 3.0]))  # the top-left pixel's centre
    assert torch.allclose(directions, torch.tensor([0.0, 0.0, -1.0]).expand(4, 4, 3))


def test_composite_analytic():
    """Two slabs: opacity 1 - exp(-sum density * delta); the front colour weighted by its own alpha."""
    density = torch.tensor([[2.0, 3.0]])
    rgb = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    deltas = torch.tensor([[0.5, 0.25]])
    colour, opacity = composite(density, rgb, deltas, torch.tensor([0.0, 0.0, 1.0]))
    a1, a2 = 1 - math.exp(-1.0), 1 - math.exp(-0.75)
    assert float(opacity[0]) == pytest.approx(1 - math.exp(-1.75), rel=1e-6)
    assert torch.allclose(colour[0], torch.tensor([a1, (1 - a1) * a2, (1 - a1) * (1 - a2)]), atol=1e-6)


def test_gradients_flow_and_match_finite_differences():
    """Rendering is differentiable in density, colour and background (gradcheck in float64 on a tiny grid), and the
    field's parameters all get finite, non-zero gradients from a loss on its images."""
    torch.manual_seed(0)
    volume = torch.rand(4, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    background = torch.rand(3, dtype=torch.float64, requires_grad=True)
    cams = [Camera(20, 10), Camera(200, -30, fov=40)]
    assert torch.autograd.gradcheck(lambda v, b: render_volume(v * 3, cams, 3, b, samples=6)[0], (volume, background))
    field = VoxelField(8)
    images, opacity = field.render(turntable(2), 8, samples=16, jitter=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8) and opacity.shape == (2, 8, 8)
    (images.square().mean() + opacity.mean()).backward()
    for p in (field.density_raw, field.rgb_raw, field.background_raw):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_fixed_background_and_bad_input():
    field = VoxelField(8, background=(0.0, 0.0, 0.0))
    assert not field.background_raw.requires_grad and float(field.background().max()) < 2e-3
    with pytest.raises(ValueError, match="resolution"):
        VoxelField(2)
    with pytest.raises(ValueError, match="distance"):
        Camera(distance=0.5)
    with pytest.raises(ValueError, match=r"\(1 \+ C, D, H, W\)"):
        render_volume(torch.zeros(3, 4, 4, 4), turntable(1), 4, torch.zeros(3))
