"""A small differentiable 3D representation: a voxel grid of density and colour, rendered by alpha compositing.

World coordinates: the grid fills the cube [-1, 1]^3, y points up. A voxel tensor is laid out (C, D, H, W) as
``grid_sample`` reads it: W runs along x, H along y, D along z, index 0 at -1 (``align_corners=False``, so voxel
centres sit at (i + 0.5) / n * 2 - 1). A camera sits on a sphere around the origin at ``azimuth`` (degrees, about
the y axis, 0 on +z, 90 on +x) and ``elevation`` (degrees above the xz plane) and looks at the origin; its image
spans [-extent, extent] world units across (orthographic, ``fov`` = 0) or a field of view of ``fov`` degrees
(perspective). Rendering (Max 1995; NeRF's quadrature): along each ray, ``samples`` points between the ray's
entry into and exit from the unit ball; alpha_i = 1 - exp(-density_i * delta), weights alpha_i * prod_{j<i}
(1 - alpha_j), colour = sum weights * rgb + (1 - sum weights) * background. Everything is differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Camera:
    """A camera looking at the origin from ``distance`` along (azimuth, elevation), in degrees."""

    azimuth: float = 0.0
    elevation: float = 0.0
    distance: float = 3.0
    extent: float = 1.0  # orthographic: half the image side in world units
    fov: float = 0.0  # > 0: perspective, the full field of view in degrees (``extent`` is then unused)

    def __post_init__(self):
        if not self.distance > 1.0:
            raise ValueError(f"camera distance must be > 1 (outside the unit ball), got {self.distance}")
        if not self.extent > 0 or not 0 <= self.fov < 180:
            raise ValueError(f"camera extent must be > 0 and fov in [0, 180), got {self.extent}, {self.fov}")

    def frame(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(position, forward, right, up), each (3,) float32: right and up span the image (up = image top)."""
        a, e = math.radians(self.azimuth), math.radians(self.elevation)
        back = torch.tensor([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
        right = torch.tensor([math.cos(a), 0.0, -math.sin(a)])
        forward = -back
        up = torch.linalg.cross(right, forward)
        return back * self.distance, forward, right, up


def turntable(n: int, elevation: float = 0.0, start: float = 0.0, **camera) -> list[Camera]:
    """``n`` cameras evenly spaced in azimuth around the object, at one elevation."""
    if n < 1:
        raise ValueError(f"a turntable needs at least one view, got {n}")
    return [Camera(start + 360.0 * i / n, elevation, **camera) for i in range(n)]


def camera_rays(camera: Camera, size: int) -> tuple[Tensor, Tensor]:
    """Ray origins and unit directions of a ``size`` x ``size`` image, each (size, size, 3); row 0 is the top."""
    position, forward, right, up = camera.frame()
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    v, u = -centres.view(-1, 1, 1), centres.view(1, -1, 1)  # v: +1 at the top row, u: +1 at the right column
    if camera.fov == 0:
        origins = position + camera.extent * (u * right + v * up)
        return origins, forward.expand_as(origins).clone()
    half = math.tan(math.radians(camera.fov) / 2)
    directions = F.normalize(forward + half * (u * right + v * up), dim=-1)
    return position.expand_as(directions).clone(), directions


def _ball_span(origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
    """Where each ray enters and leaves the unit ball (near = far where it misses: no samples count)."""
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - 1.0
    root = (b * b - c).clamp(min=0).sqrt()
    return -b - root, -b + root


def composite(density: Tensor, rgb: Tensor, deltas: Tensor, background: Tensor) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing along the last axis of ``density`` (..., S) and ``rgb`` (..., S, 3) with
    step lengths ``deltas`` (..., S): (colour (..., 3), opacity (...,))."""
    alpha = 1 - torch.exp(-density * deltas)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1]], -1), -1)
    weights = alpha * transmittance
    opacity = weights.sum(-1)
    colour = (weights.unsqueeze(-1) * rgb).sum(-2) + (1 - opacity).unsqueeze(-1) * background
    return colour, opacity


def render_volume(volume: Tensor, cameras: list[Camera], size: int, background: Tensor, samples: int = 64,
                  jitter: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Render ``volume`` (1 + C, D, H, W): density >= 0 (channel 0) and C colour channels (RGB in [0, 1], or any
    features) over a ``background`` (C,), from each camera.

    Returns (images (N, C, size, size), opacity (N, size, size)). Points are sampled at the midpoints of
    ``samples`` equal steps through the unit ball (or, with a ``jitter`` generator, at a random point of each step:
    stratified sampling for training) and read trilinearly; density outside the grid is 0.
    """
    if volume.ndim != 4 or volume.shape[0] < 2 or background.shape != (volume.shape[0] - 1,):
        raise ValueError(f"volume must be (1 + C, D, H, W): density and C colour channels over a background of C, "
                         f"got {tuple(volume.shape)} and {tuple(background.shape)}")
    c = volume.shape[0]
    rays = [camera_rays(c, size) for c in cameras]
    origins = torch.stack([o for o, _ in rays]).to(volume.device, volume.dtype)  # (N, S, S, 3)
    directions = torch.stack([d for _, d in rays]).to(volume.device, volume.dtype)
    near, far = _ball_span(origins, directions)
    step = (far - near) / samples  # (N, S, S)
    offsets = torch.rand((*near.shape, samples), generator=jitter).to(volume) if jitter is not None else 0.5
    t = near.unsqueeze(-1) + (torch.arange(samples, dtype=volume.dtype, device=volume.device) + offsets) * \
        step.unsqueeze(-1)  # (N, S, S, samples)
    points = origins.unsqueeze(-2) + t.unsqueeze(-1) * directions.unsqueeze(-2)  # (N, S, S, samples, 3)
    n = len(cameras)
    values = F.grid_sample(volume.unsqueeze(0), points.reshape(1, n * size, size, samples, 3), mode="bilinear",
                           padding_mode="zeros", align_corners=False)  # (1, 1 + C, N*S, S, samples)
    values = values[0].view(c, n, size, size, samples).permute(1, 2, 3, 4, 0)  # (N, S, S, samples, 1 + C)
    deltas = step.unsqueeze(-1).expand(*step.shape, samples)
    colour, opacity = composite(values[..., 0], values[..., 1:], deltas, background.to(volume))
    return colour.permute(0, 3, 1, 2), opacity


class VoxelField(nn.Module):
    """A learnable ``resolution``^3 grid of density (softplus of a raw value) and ``channels`` colour channels over
    a background (learned, or fixed when given). ``colour="rgb"``: 3 channels, sigmoid of raw values, in [0, 1];
    ``"linear"``: the raw values themselves (e.g. an autoencoder's latent features, rendered straight into latent
    space). Density starts as a soft ball of radius ``init_radius`` (DreamFusion's density blob), colour at 0 raw
    (mid grey for RGB); density outside the unit ball is 0."""

    def __init__(self, resolution: int = 32, background=None, init_radius: float = 0.5, init_density: float = 10.0,
                 channels: int = 3, colour: str = "rgb"):
        super().__init__()
        if not 4 <= resolution <= 256:
            raise ValueError(f"voxel resolution must be in 4..256, got {resolution}")
        if colour not in ("rgb", "linear") or (colour == "rgb" and channels != 3) or channels < 1:
            raise ValueError(f"colour must be 'rgb' (3 channels) or 'linear' (any), got {colour!r}, {channels}")
        self.colour = colour
        centres = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
        z, y, x = torch.meshgrid(centres, centres, centres, indexing="ij")
        radius = (x * x + y * y + z * z).sqrt()
        self.register_buffer("inside", (radius <= 1.0).float(), persistent=False)
        blob = init_density * torch.exp(-(radius / init_radius) ** 2 * 2)  # a soft ball; softplus^-1 below
        self.density_raw = nn.Parameter(torch.log(torch.expm1(blob.clamp(min=1e-4))).unsqueeze(0))
        self.rgb_raw = nn.Parameter(torch.zeros(channels, resolution, resolution, resolution))
        fixed = background is not None
        value = torch.as_tensor(background if fixed else [0.5 if colour == "rgb" else 0.0] * channels,
                                dtype=torch.float32)
        if value.shape != (channels,):
            raise ValueError(f"background must have {channels} values, got {tuple(value.shape)}")
        raw = torch.logit(value.clamp(1e-3, 1 - 1e-3)) if colour == "rgb" else value
        self.background_raw = nn.Parameter(raw, requires_grad=not fixed)

    @property
    def resolution(self) -> int:
        return self.rgb_raw.shape[-1]

    @property
    def channels(self) -> int:
        return self.rgb_raw.shape[0]

    def _activate(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw) if self.colour == "rgb" else raw

    def density(self) -> Tensor:
        return F.softplus(self.density_raw) * self.inside  # (1, D, H, W)

    def rgb(self) -> Tensor:
        """The colour channels (C, D, H, W): RGB in [0, 1], or the linear features."""
        return self._activate(self.rgb_raw)

    def background(self) -> Tensor:
        return self._activate(self.background_raw)

    def volume(self) -> Tensor:
        return torch.cat([self.density(), self.rgb()])

    def render(self, cameras: list[Camera], size: int, samples: int = 64, jitter: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor]:
        """Images (N, C, size, size) (RGB in [0, 1]) and opacity (N, size, size); see ``render_volume``."""
        return render_volume(self.volume(), cameras, size, self.background(), samples, jitter)

    def arrays(self) -> dict:
        """The asset as numpy arrays: density (D, H, W), rgb (3, D, H, W) in [0, 1] (a linear field: ``features``
        (C, D, H, W)), background (C,)."""
        with torch.no_grad():
            return {"density": self.density()[0].cpu().numpy(),
                    "rgb" if self.colour == "rgb" else "features": self.rgb().cpu().numpy(),
                    "background": self.background().cpu().numpy()}
