"""The built-in `moving-shapes` clips: one shape moving left / right / up / down, growing, or changing colour,
drawn with the shapes renderer (``data/shapes.py``), with captions and a judge that reads clips back.

"a red circle moving to the right on a black background", "a blue square growing on a gray background",
"a small green triangle turning yellow on a white background". A clip's truth is a ``Clip``; ``judge_clip``
reads each frame with the shapes judge (``data/judge.py``) and the motion from the object's track: centroid
displacement (direction), area ratio (growth), first and last colour (colour change).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .buckets import batch_indices
from .judge import detect
from .shapes import BACKGROUNDS, COLORS, SHAPES, SIZE_RADIUS, SIZES, paint, parse_caption, to_tensor

MOTIONS = ("right", "left", "up", "down", "grow", "recolor")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y pointing down
TRAVEL = 0.4  # canvas fractions a moving object's centre covers from the first frame to the last
SIDE_JITTER = 0.1  # a moving object's centre is off the middle line by up to this, across its motion
MOVE_THRESHOLD = 0.15  # a track moving less than this (canvas fractions) is read as still
GROW_THRESHOLD = 1.8  # last / first area above this reads as growing (small -> large is about 3.3)
# (colour, shape, motion) triples only in the held-out split: every (colour, shape) pair once, every motion three
# times, so each pair and each motion is trained, just never together in these triples.
HELDOUT_TRIPLES = frozenset((c, s, MOTIONS[i % len(MOTIONS)])
                            for i, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES))
CLIP_SPLITS = ("train", "heldout")
_PHRASES = {"right": "moving to the right", "left": "moving to the left", "up": "moving up", "down": "moving down"}
_MOTION_RE = re.compile(r"\bmoving (?:to the )?(right|left|up|down)\b|\b(growing)\b|\bturning ([a-z]+)\b")


@dataclass(frozen=True)
class Clip:
    """What a clip shows: one object, its motion, and the background."""

    shape: str  # one of SHAPES
    color: str  # a key of COLORS (the colour of the first frame)
    background: str  # a key of BACKGROUNDS
    motion: str  # one of MOTIONS
    size: str = "small"  # one of SIZES (a growing object starts small and ends large)
    end_color: str | None = None  # the colour from the middle frame on (motion "recolor"), else None

    def __post_init__(self):
        for name, vocab in (("shape", SHAPES), ("color", COLORS), ("background", BACKGROUNDS),
                            ("motion", MOTIONS), ("size", SIZES)):
            if getattr(self, name) not in vocab:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: expected one of {sorted(vocab)}")
        if (self.motion == "recolor") != (self.end_color is not None):
            raise ValueError("end_color is set exactly for the motion 'recolor'")
        if self.end_color is not None and (self.end_color not in COLORS or self.end_color == self.color):
            raise ValueError(f"end_color must be a colour other than {self.color!r}, got {self.end_color!r}")
        if self.motion == "grow" and self.size != "small":
            raise ValueError("a growing object starts small")

    def color_at(self, frame: int, frames: int) -> str:
        """The object's colour in a frame: ``end_color`` from the middle frame on."""
        return self.end_color if self.end_color is not None and frame >= frames // 2 else self.color


def sample_clip(rng: np.random.Generator, split: str | None = None, motions: tuple[str, ...] | None = None
                ) -> Clip:
    """A random clip: motion, shape, colour (and an end colour), size and background, uniformly; with ``split``
    ("train" / "heldout") drawn again until its (colour, shape, motion) is in ``HELDOUT_TRIPLES`` exactly for
    "heldout"; with ``motions``, drawn again until its motion is one of them."""
    if split is not None and split not in CLIP_SPLITS:
        raise ValueError(f"unknown clip split {split!r}: expected one of {CLIP_SPLITS} or None")
    check_motions(motions)
    while True:
        clip = _draw_clip(rng)
        if motions is not None and clip.motion not in motions:
            continue
        if split is None or ((clip.color, clip.shape, clip.motion) in HELDOUT_TRIPLES) == (split == "heldout"):
            return clip


def check_motions(motions: tuple[str, ...] | None) -> None:
    """Refuse an empty motion filter or a motion that is not one of ``MOTIONS``."""
    if motions is None:
        return
    unknown = [m for m in motions if m not in MOTIONS]
    if unknown or not motions:
        raise ValueError(f"motions must be a non-empty choice of {MOTIONS}, got {tuple(motions)}")


def _draw_clip(rng: np.random.Generator) -> Clip:
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colors = list(COLORS)
    color = colors.pop(int(rng.integers(len(colors))))
    end = colors[int(rng.integers(len(colors)))] if motion == "recolor" else None
    size = "small" if motion == "grow" else SIZES[int(rng.integers(len(SIZES)))]
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Clip(shape, color, background, motion, size, end)


def render_clip(clip: Clip, frames: int = 8, size: int = 32, seed: int = 0, supersample: int = 4) -> np.ndarray:
    """Draw a clip as uint8 (frames, size, size, 3); seed fixes the object's offset from the middle line."""
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {frames}")
    if size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {size}")
    side = float(np.random.default_rng(seed).uniform(-SIDE_JITTER, SIDE_JITTER))
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        s = f / (frames - 1)  # 0 .. 1 through the clip
        radius = SIZE_RADIUS[clip.size]
        if clip.motion in DIRECTIONS:
            dx, dy = DIRECTIONS[clip.motion]
            along = 0.5 + TRAVEL * (s - 0.5)
            centre = (along, 0.5 + side) if dx else (0.5 + side, along)
            centre = (1 - centre[0], centre[1]) if dx < 0 else (centre[0], 1 - centre[1]) if dy < 0 else centre
        else:
            centre = (0.5 + side / 2, 0.5)
            if clip.motion == "grow":
                radius = SIZE_RADIUS["small"] + s * (SIZE_RADIUS["large"] - SIZE_RADIUS["small"])
        image = np.empty((size, size, 3), np.float64)
        image[:] = BACKGROUNDS[clip.background]
        image = paint(image, clip.shape, clip.color_at(f, frames), centre, radius, supersample)
        out[f] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out


def clip_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (3, F, H, W) in [-1, 1]."""
    return torch.stack([to_tensor(f) for f in frames], dim=1)


def clip_caption(clip: Clip) -> str:
    """The clip's caption: "a small red circle moving to the right on a black background"."""
    if clip.motion == "grow":
        what = f"a {clip.color} {clip.shape} growing"
    elif clip.motion == "recolor":
        what = f"a {clip.size} {clip.color} {clip.shape} turning {clip.end_color}"
    else:
        what = f"a {clip.size} {clip.color} {clip.shape} {_PHRASES[clip.motion]}"
    return f"{what} on a {clip.background} background"


def still_caption(clip: Clip, frame: int, frames: int) -> str:
    """One frame of the clip as an image caption, no motion: "a small red circle in the middle on a black
    background" (the colour at that frame; a growing object small in the first half, large in the second; the
    shapes captions always name a place, and the image model draws nothing for most prompts without one)."""
    size = ("small" if frame < frames / 2 else "large") if clip.motion == "grow" else clip.size
    return f"a {size} {clip.color_at(frame, frames)} {clip.shape} in the middle on a {clip.background} background"


def parse_clip_caption(text: str) -> Clip | None:
    """Read a clip caption (or a prompt in the same words) back into a Clip; None if it names no single object,
    no motion, or no background (a growing object's size word is ignored: it starts small)."""
    found = _MOTION_RE.findall(text.lower())
    if len(found) != 1:
        return None
    direction, grow, end = found[0]
    end = {"violet": "purple"}.get(end, end) or None
    if end is not None and end not in COLORS:
        return None
    scene = parse_caption(_MOTION_RE.sub(" ", text.lower()))
    if scene is None or len(scene.objects) != 1 or scene.background is None:
        return None
    o = scene.objects[0]
    if o.color is None or o.color == end:
        return None
    motion = direction or ("grow" if grow else "recolor")
    size = "small" if motion == "grow" else o.size or "small"
    return Clip(o.shape, o.color, scene.background, motion, size, end)


@dataclass
class ClipReading:
    """What the judge reads from a clip."""

    frames: list[tuple[str, str, str] | None]  # per frame: (shape, colour, background) of the largest object
    motion: str | None  # one of MOTIONS, "still", or None (the object was lost in the first or last frame)
    track: list[tuple[float, float] | None]  # the object's centroid per frame (canvas fractions)
    areas: list[float | None]  # its area per frame (canvas fraction)


def judge_clip(frames) -> ClipReading:
    """Read a clip: uint8 (F, H, W, 3), float (3, F, H, W) in [-1, 1], or a list of frame images."""
    if isinstance(frames, torch.Tensor) and frames.ndim == 4 and frames.shape[0] == 3:
        frames = list(frames.unbind(1))
    readings, track, areas = [], [], []
    for frame in frames:
        background, found = detect(frame)
        d = max(found, key=lambda d: d.area, default=None)
        readings.append(None if d is None else (d.shape, d.color, background))
        track.append(None if d is None else d.centroid)
        areas.append(None if d is None else d.area)
    motion = None
    if readings[0] is not None and readings[-1] is not None:
        (x0, y0), (x1, y1) = track[0], track[-1]
        dx, dy = x1 - x0, y1 - y0
        if readings[0][1] != readings[-1][1]:
            motion = "recolor"
        elif areas[-1] / areas[0] > GROW_THRESHOLD:
            motion = "grow"
        elif max(abs(dx), abs(dy)) < MOVE_THRESHOLD:
            motion = "still"
        elif abs(dx) >= abs(dy):
            motion = "right" if dx > 0 else "left"
        else:
            motion = "down" if dy > 0 else "up"
    return ClipReading(readings, motion, track, areas)


def score_clips(clips_frames, clips: list[Clip]) -> dict:
    """Judge clips against their truth: ``frame_accuracy`` (frames whose object has the right shape, colour and
    background), ``motion_accuracy`` (the right motion read from the track), ``clip_accuracy`` (both, every
    frame), n, ``by_motion`` (motion accuracy per true motion) and ``frames_by_motion`` (frame agreement per true
    motion)."""
    clips_frames, clips = list(clips_frames), list(clips)
    if len(clips_frames) != len(clips):
        raise ValueError(f"got {len(clips_frames)} clips but {len(clips)} truths")
    if not clips:
        raise ValueError("score_clips needs at least one clip")
    frame_hits = frame_total = motion_hits = clip_hits = 0
    by_motion = {m: [0, 0] for m in MOTIONS}  # motion -> [right, clips]
    frames_by_motion = {m: [0, 0] for m in MOTIONS}  # motion -> [right frames, frames]
    for frames, truth in zip(clips_frames, clips):
        reading = judge_clip(frames)
        n = len(reading.frames)
        right = [r == (truth.shape, truth.color_at(f, n), truth.background) for f, r in enumerate(reading.frames)]
        frame_hits += sum(right)
        frame_total += n
        frames_by_motion[truth.motion][0] += sum(right)
        frames_by_motion[truth.motion][1] += n
        motion_hits += reading.motion == truth.motion
        by_motion[truth.motion][0] += reading.motion == truth.motion
        by_motion[truth.motion][1] += 1
        clip_hits += reading.motion == truth.motion and all(right)
    n = len(clips)
    return {"frame_accuracy": frame_hits / frame_total, "motion_accuracy": motion_hits / n,
            "clip_accuracy": clip_hits / n, "n": n,
            "by_motion": {m: right / total for m, (right, total) in by_motion.items() if total},
            "frames_by_motion": {m: right / total for m, (right, total) in frames_by_motion.items() if total}}


def validate_clips(n: int = 120, frames: int = 8, size: int = 32, seed: int = 0) -> dict:
    """The judge's accuracy on rendered ground-truth clips."""
    rng = np.random.default_rng(seed)
    clips = [sample_clip(rng) for _ in range(n)]
    return score_clips([render_clip(c, frames, size, seed=seed + i) for i, c in enumerate(clips)], clips)


class ClipLatents:
    """``n`` moving-shapes clips encoded frame by frame with an autoencoder (posterior mode), held in memory:
    ``latents`` (n, C, F, h, w) normalized, ``captions``, ``clips`` (of ``split``: "train", "heldout", or None for
    any), of ``motions`` only when given; the data order is ``batch_indices``'s."""

    bucketed = False  # the run engine's batch split: one global batch of equal items

    def __init__(self, autoencoder, n: int, frames: int = 8, size: int = 32, seed: int = 0, batch: int = 64,
                 split: str | None = None, motions: tuple[str, ...] | None = None):
        if n < 1:
            raise ValueError(f"the clip set needs at least one clip, got {n}")
        rng = np.random.default_rng(seed)
        self.clips = [sample_clip(rng, split, motions) for _ in range(n)]
        self.captions = [clip_caption(c) for c in self.clips]
        pixels = torch.stack([clip_tensor(render_clip(c, frames, size, seed=seed * 1_000_003 + i))
                              for i, c in enumerate(self.clips)])  # (n, 3, F, H, W)
        flat = pixels.transpose(1, 2).reshape(n * frames, 3, size, size)  # (n*F, 3, H, W): every frame an image
        param = next(autoencoder.parameters())
        with torch.no_grad():
            z = torch.cat([autoencoder.encode(flat[i:i + batch].to(param.device, param.dtype)).float().cpu()
                           for i in range(0, len(flat), batch)])  # (n*F, C, h, w)
        self.latents = z.reshape(n, frames, *z.shape[1:]).transpose(1, 2).contiguous()  # (n, C, F, h, w)

    def __len__(self) -> int:
        return len(self.clips)

    def batch_indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        return batch_indices(step, batch_size, len(self), seed)
