"""What ``latentdiff sds`` writes: the turntable GIF, a grid of the judged views, the voxel asset (.npz), a mesh
(.obj, marching cubes by scikit-image when it is installed) and report.json, all into one folder swapped in whole."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.images import make_grid, save_gif
from latentdiff.io import atomic_folder, write_json
from latentdiff.threed.sds import SDSConfig, SDSResult, to_uint8
from latentdiff.threed.voxels import turntable

# voxels.npz: density (D, H, W), rgb (3, D, H, W) in [0, 1] (a latent field: features (C, D, H, W), the model's latent
# channels), background (3,) or (C,); the grid fills [-1, 1]^3, y up, (D, H, W) along (z, y, x).
ASSET_FORMAT = 1


def have_marching_cubes() -> bool:
    try:
        import skimage.measure  # noqa: F401
    except ImportError:
        return False
    return True


def mesh_obj(density: np.ndarray, rgb: np.ndarray | None, level: float | None = None) -> tuple[str, dict] | None:
    """A Wavefront OBJ (vertex colours as 'v x y z r g b', when ``rgb`` is given) of the density's level set by marching cubes (scikit-
    image), in world coordinates; ``level`` defaults to the density at which four voxels of depth are half opaque.
    None when the level set is empty (nothing there, or all full)."""
    from skimage import measure

    n = density.shape[0]
    level = math.log(2) / (8 / n) if level is None else level  # four voxels deep (2 / n each) are half opaque
    if not density.min() < level < density.max():
        return None
    verts, faces, _, _ = measure.marching_cubes(density, level=level)  # verts in (d, h, w) = (z, y, x) indices
    world = (verts[:, ::-1] + 0.5) / n * 2 - 1  # (x, y, z)
    if rgb is None:
        lines = [f"v {x:.4f} {y:.4f} {z:.4f}" for x, y, z in world]
    else:
        index = np.clip(np.round(verts).astype(int), 0, n - 1)
        colours = rgb[:, index[:, 0], index[:, 1], index[:, 2]].T
        lines = [f"v {x:.4f} {y:.4f} {z:.4f} {r:.3f} {g:.3f} {b:.3f}" for (x, y, z), (r, g, b) in zip(world, colours)]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    return "# latentdiff sds: marching cubes of the voxel density\n" + "\n".join(lines) + "\n", \
        {"vertices": len(verts), "faces": len(faces), "level": level}


def turntable_frames(result: SDSResult, cfg: SDSConfig) -> list[Image.Image]:
    """``cfg.frames`` views all round at elevation 0, then as many at elevation 20 degrees (the GIF shows the top
    too), rendered at ``cfg.gif_size`` pixels."""
    cameras = turntable(cfg.frames, extent=cfg.extent) + turntable(cfg.frames, elevation=20.0, extent=cfg.extent)
    frames = []
    for start in range(0, len(cameras), 8):  # a few views at a time: the GIF's rays are many
        images, _ = result.views(cameras[start:start + 8], cfg.gif_size)
        frames += [Image.fromarray(a) for a in to_uint8(images)]
    return frames


def save_asset(out: str | Path, result: SDSResult, cfg: SDSConfig, evaluation: dict, views: torch.Tensor
               ) -> dict:
    """Write the folder ``out`` (replaced whole, atomically): turntable.gif, views.png (the judged views, 4x),
    voxels.npz, mesh.obj (when scikit-image is installed and the density has a surface) and report.json; returns
    the report."""
    arrays = result.field.arrays()
    frames = turntable_frames(result, cfg)
    grid = make_grid([Image.fromarray(a).resize((4 * a.shape[1], 4 * a.shape[0]), Image.NEAREST)
                      for a in to_uint8(views)], ncols=len(views))
    mesh = mesh_obj(arrays["density"], arrays.get("rgb")) if have_marching_cubes() else None
    report = {"prompt": result.plan.prompt, "model_prompt": result.plan.model_prompt, "notes": result.plan.notes,
              "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"},
              "cpu_minutes": round(result.cpu_seconds / 60, 3), "wall_minutes": round(result.wall_seconds / 60, 3),
              "evaluation": evaluation, "history": result.history, "asset_format": ASSET_FORMAT,
              "mesh": mesh[1] if mesh else ("no surface at the level" if have_marching_cubes() else
                                            "not written: pip install scikit-image")}
    with atomic_folder(out) as folder:
        folder = Path(folder)
        save_gif(frames, folder / "turntable.gif", fps=12)
        grid.save(folder / "views.png")
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays, format=np.array(ASSET_FORMAT))
        (folder / "voxels.npz").write_bytes(buffer.getvalue())
        if mesh:
            (folder / "mesh.obj").write_text(mesh[0])
        write_json(folder / "report.json", report)
    return report


def load_voxels(path: str | Path) -> dict:
    """A voxels.npz back as arrays (no pickle), its layout checked."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    colour = arrays.get("rgb", arrays.get("features"))
    if int(arrays.get("format", -1)) != ASSET_FORMAT or colour is None or colour.shape[1:] != arrays["density"].shape:
        raise ValueError(f"{path} is not a latentdiff voxel asset (format {ASSET_FORMAT})")
    return arrays
