"""Image helpers: tensors in [-1, 1] to PIL, grids, and PNG files that carry their generation parameters."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from latentdiff.io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8; one channel (a mel spectrogram) is shown as grey."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images)]


def make_grid(images: list[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized images into one, ``ncols`` per row (default: near square)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (32, 32, 32))
    for i, im in enumerate(images):
        grid.paste(im, (pad + (i % ncols) * (w + pad), pad + (i // ncols) * (h + pad)))
    return grid


def _png_info(parameters: dict | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    return info


def save_png(image: Image.Image, path: str | Path, parameters: dict | None = None) -> Path:
    """Save a PNG atomically; ``parameters`` go into a ``parameters`` text chunk as JSON."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(parameters))
    return path


def png_bytes(image: Image.Image, parameters: dict | None = None) -> bytes:
    """The PNG file :func:`save_png` writes, as bytes (the server's responses)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(parameters))
    return buffer.getvalue()


ANIMATION_SUFFIXES = (".gif", ".webp", ".mp4")  # what save_animation writes, by the path's suffix
EXIF_DESCRIPTION = 0x010E  # ImageDescription: where a WebP clip carries its parameters (JSON)


def _check_frames(frames: list[Image.Image], fps: float, what: str) -> None:
    if not frames:
        raise ValueError(f"an animated {what} needs at least one frame")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, not {fps}")
    sizes = {im.size for im in frames}
    if len(sizes) > 1:
        raise ValueError(f"the frames of an animated {what} must share one size, not {sorted(sizes)}")


def save_gif(frames: list[Image.Image], path: str | Path, fps: float = 8.0) -> Path:
    """Save frames as an animated GIF (looping) atomically. GIF keeps 256 colours a frame and times frames in
    hundredths of a second (8 fps is stored as 0.12 s a frame)."""
    _check_frames(frames, fps, "GIF")
    path = Path(path)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


def save_webp(frames: list[Image.Image], path: str | Path, fps: float = 8.0,
              parameters: dict | None = None) -> Path:
    """Save frames as an animated WebP (looping) atomically, lossless: every pixel is kept exactly (GIF keeps 256
    colours a frame), frames are timed to the millisecond, and on generated clips the file is smaller than the
    GIF (0.72x at 32 px, 0.54x at 128 px: ``benchmarks/clip_files.py``, ARCHITECTURE.md "Clip files"). Identical
    consecutive frames are merged into one longer frame by the encoder (as Pillow's GIF writer does).
    ``parameters`` go into the EXIF ImageDescription as JSON (:func:`read_parameters` reads them)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        _write_webp(frames, tmp, fps, parameters)
    return path


def webp_bytes(frames: list[Image.Image], fps: float = 8.0, parameters: dict | None = None) -> bytes:
    """The animated WebP :func:`save_webp` writes, as bytes (the server's responses)."""
    buffer = io.BytesIO()
    _write_webp(frames, buffer, fps, parameters)
    return buffer.getvalue()


def _write_webp(frames: list[Image.Image], target, fps: float, parameters: dict | None) -> None:
    _check_frames(frames, fps, "WebP")
    exif = b""
    if parameters is not None:
        info = Image.Exif()
        info[EXIF_DESCRIPTION] = json.dumps(parameters, sort_keys=True)  # ASCII: other characters are escaped
        exif = info.tobytes()
    frames[0].save(target, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0, lossless=True, method=4, exif=exif)


def import_av():
    """PyAV (``import av``), or an error that says how to install it."""
    try:
        import av
    except ImportError as e:
        raise ImportError("writing .mp4 clips needs PyAV: pip install av (or pip install 'latentdiff[video]'); "
                          "or write .gif / .webp") from e
    return av


def mp4_frame_size(width: int, height: int, min_size: int = 128) -> tuple[int, int, int]:
    """(scale, width, height) of the MP4 :func:`save_mp4` writes for frames of ``width`` x ``height``: enlarged by
    a whole factor (nearest neighbour) until the short side is at least ``min_size`` (tiny clips play badly or not
    at all in many players), then one replicated column / row added where a side is odd (H.264 in 4:2:0)."""
    scale = max(1, math.ceil(min_size / min(width, height)))
    w, h = width * scale, height * scale
    return scale, w + w % 2, h + h % 2


def _mp4_array(frame: Image.Image, scale: int, width: int, height: int) -> np.ndarray:
    a = np.asarray(frame.convert("RGB"))
    if scale > 1:
        a = a.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.pad(a, ((0, height - a.shape[0]), (0, width - a.shape[1]), (0, 0)), mode="edge")


def _h264_encoder(av) -> str:
    for name in ("libx264", "libopenh264"):  # encoder-only names: present means it can encode
        if name in av.codecs_available:
            return name
    raise RuntimeError("this PyAV build has no H.264 encoder; install the PyPI wheel (pip install av), or write "
                       ".gif / .webp")


def save_mp4(frames: list[Image.Image], path: str | Path, fps: float = 8.0, *, min_size: int = 128,
             crf: int = 18) -> Path:
    """Save frames as an H.264 MP4 (yuv420p, the format every player and browser plays) atomically, through PyAV.

    Frames are enlarged by a whole factor with nearest neighbour so the short side is at least ``min_size``
    pixels (1: never), and a replicated column / row is added where a side is odd (:func:`mp4_frame_size`).
    ``crf`` is x264's constant quality (0 lossless in luma, 18 visually near lossless, 23 x264's default);
    the colour is still subsampled 4:2:0, so the file is lossy: use .webp for exact pixels. The ``moov`` index
    is put first (``faststart``) so browsers start playing before the whole file is read.
    """
    _check_frames(frames, fps, "MP4")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, not {min_size}")
    av = import_av()
    from fractions import Fraction

    path = Path(path)
    scale, width, height = mp4_frame_size(*frames[0].size, min_size=min_size)
    rate = Fraction(fps).limit_denominator(1001)
    codec = _h264_encoder(av)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4",
                                           options={"movflags": "faststart"}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in frames:
            video = av.VideoFrame.from_ndarray(_mp4_array(frame, scale, width, height), format="rgb24")
            container.mux(stream.encode(video.reformat(format="yuv420p")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def save_animation(frames: list[Image.Image], path: str | Path, fps: float = 8.0) -> Path:
    """Save frames as an animation in the format of ``path``'s suffix: .gif, .webp (lossless) or .mp4 (H.264,
    needs PyAV); see :func:`save_gif`, :func:`save_webp`, :func:`save_mp4`."""
    path = Path(path)
    writers = {".gif": save_gif, ".webp": save_webp, ".mp4": save_mp4}
    suffix = path.suffix.lower()
    if suffix not in writers:
        raise ValueError(f"cannot write an animation to {path}: its suffix must be one of "
                         f"{', '.join(ANIMATION_SUFFIXES)}")
    return writers[suffix](frames, path, fps)


def read_parameters(path) -> dict | None:
    """The generation parameters a PNG written by :func:`save_png`, or a WebP clip by :func:`save_webp`, carries (a
    path or a binary file), or None."""
    with Image.open(path) as im:
        text = im.text.get("parameters") if hasattr(im, "text") else None
        if text is None and im.format == "WEBP":
            text = im.getexif().get(EXIF_DESCRIPTION)
    return json.loads(text) if text else None
