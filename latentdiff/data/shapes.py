"""The built-in `shapes` data set: coloured shapes on plain backgrounds, with captions and held-out combos.

Every image is drawn from a `Scene` (its truth, kept as data), so a judge can read the attributes back
and score a generator (see `latentdiff.data.judge`). Geometry is in canvas fractions, so one scene renders
at any resolution. Objects sit in distinct position regions, at least GAP apart.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field

import numpy as np
import torch

# --- vocabulary ---------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {  # object colours, well apart in RGB (closest pair ~130)
    "red": (220, 30, 30),
    "green": (40, 180, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "purple": (170, 50, 220),
    "cyan": (40, 200, 220),
}
# Colours outside the vocabulary above, never in the default data: a data set, prompt set or judge uses them only
# when asked (``extra_colors``), e.g. to teach a trained model a new colour word with a LoRA.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {
    "orange": (250, 130, 20),  # between red and yellow (~100 from each)
}
ALL_COLORS = {**COLORS, **EXTRA_COLORS}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {  # disjoint from COLORS, so never an object's colour
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}

# (color, shape) pairs that only appear in the held-out split: each colour once, each shape twice, so
# every colour and every shape is still seen in training, just never together in these pairs.
HELDOUT_PAIRS = frozenset(
    {
        ("green", "circle"),
        ("purple", "circle"),
        ("blue", "square"),
        ("yellow", "square"),
        ("red", "triangle"),
        ("cyan", "triangle"),
    }
)
SPLITS = ("train", "heldout")

# --- geometry (fractions of the canvas side) ---------------------------------------------------------

# Objects are large enough that a factor-4 autoencoder keeps a small one's corners at 32x32 pixels (a small
# object is 7 pixels across there, about two latent cells; it was 5 pixels, one cell, and came back as a round
# blob: BENCHMARKS.md, "The shapes geometry"). Anchors sit at 0.24 / 0.76 so a large object stays on the canvas.
SIZE_RADIUS = {"small": 0.11, "large": 0.2}  # half the side of the shape's bounding box
ANCHORS = {  # centre of each position region, (x, y) with y pointing down
    "left": (0.24, 0.5),
    "right": (0.76, 0.5),
    "top": (0.5, 0.24),
    "bottom": (0.5, 0.76),
    "center": (0.5, 0.5),
}
JITTER = 0.03  # each object's centre moves up to this much along x and y (uniform), seeded per render
GAP = 0.02  # objects stay at least this far apart (about 1 pixel on a 32-pixel canvas)
_LAYOUT_RES = 160  # resolution of the masks that check layouts, fixed so the jitter is the same at any size


@dataclass(frozen=True)
class ShapeObject:
    """One object; a field is None only in a parsed prompt that leaves it unstated."""

    shape: str | None  # one of SHAPES
    color: str | None  # a key of COLORS (or EXTRA_COLORS)
    size: str | None = None  # one of SIZES
    position: str | None = None  # one of POSITIONS

    def __post_init__(self):
        for name, vocab in (("shape", SHAPES), ("color", ALL_COLORS), ("size", SIZES), ("position", POSITIONS)):
            value = getattr(self, name)
            if value is not None and value not in vocab:
                raise ValueError(f"unknown {name} {value!r}: expected one of {sorted(vocab)}")

    @property
    def complete(self) -> bool:
        """True when every attribute is stated."""
        return None not in (self.shape, self.color, self.size, self.position)


def _object_key(o: ShapeObject) -> tuple:
    """Canonical sort key (None sorts last)."""
    return tuple((v is None, v or "") for v in (o.position, o.shape, o.color, o.size))


@dataclass(frozen=True)
class Scene:
    """What an image shows: objects in canonical order, and the background (None: unstated)."""

    objects: tuple[ShapeObject, ...]  # 0..len(POSITIONS) objects, kept sorted so equality is set equality
    background: str | None = None  # a key of BACKGROUNDS

    def __post_init__(self):
        objects = tuple(self.objects)
        for o in objects:
            if not isinstance(o, ShapeObject):
                raise TypeError(f"Scene objects must be ShapeObject, got {type(o).__name__}")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}: expected one of {sorted(BACKGROUNDS)}")
        object.__setattr__(self, "objects", tuple(sorted(objects, key=_object_key)))

    @property
    def complete(self) -> bool:
        """True when the background and every object attribute are stated (a renderable scene)."""
        return self.background is not None and all(o.complete for o in self.objects)


# --- sampling -----------------------------------------------------------------------------------------


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float, grow: float = 0.0):
    """Boolean mask of points inside a shape of half-size r centred at (cx, cy), offset outward by grow."""
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= (r + grow) ** 2
    if shape == "square":
        return (np.abs(x - cx) <= r + grow) & (np.abs(y - cy) <= r + grow)
    if shape == "triangle":  # apex up at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
        side = np.abs(x - cx) - (y - (cy - r)) / 2  # <= 0 inside the two slanted sides
        return (y <= cy + r + grow) & (side <= grow * np.sqrt(5) / 2)  # edges pushed out by grow
    raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def _footprint(shape: str, size: str, centre: tuple[float, float]) -> np.ndarray:
    """The object grown by half the gap, rasterized at _LAYOUT_RES (a layout check, not a drawing)."""
    coords = (np.arange(_LAYOUT_RES) + 0.5) / _LAYOUT_RES
    x, y = np.meshgrid(coords, coords)
    return _inside(shape, x, y, *centre, SIZE_RADIUS[size], grow=GAP / 2)


def _apart(objects: list[ShapeObject], centres: list[tuple[float, float]]) -> bool:
    """True if no two objects come closer than GAP."""
    masks = [_footprint(o.shape, o.size, c) for o, c in zip(objects, centres)]
    return not any(np.any(masks[i] & masks[j]) for i in range(len(masks)) for j in range(i))


@functools.cache
def _compatible(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    """True if objects a and b, each (shape, size, position), are GAP apart at their anchors."""
    if a[2] == b[2]:
        return False
    objects = [ShapeObject(a[0], None, a[1], a[2]), ShapeObject(b[0], None, b[1], b[2])]
    return _apart(objects, [ANCHORS[a[2]], ANCHORS[b[2]]])


def _place(scene: Scene, rng: np.random.Generator, tries: int = 16) -> list[tuple[float, float]]:
    """Jittered centres for the scene's objects, redrawn until they are GAP apart (anchors as a last resort)."""
    anchors = [ANCHORS[o.position] for o in scene.objects]
    for _ in range(tries):
        jitter = rng.uniform(-JITTER, JITTER, size=(len(anchors), 2))
        centres = [(ax + dx, ay + dy) for (ax, ay), (dx, dy) in zip(anchors, jitter)]
        if len(centres) == 1 or _apart(list(scene.objects), centres):
            return centres
    return anchors


def check_extra_colors(extra_colors) -> tuple[str, ...]:
    """Names of EXTRA_COLORS, checked."""
    extra = tuple(extra_colors)
    unknown = [c for c in extra if c not in EXTRA_COLORS]
    if unknown:
        raise ValueError(f"unknown extra colours {unknown}: expected some of {sorted(EXTRA_COLORS)}")
    return extra


def _pairs(split: str, extra_colors: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(color, shape) pairs an object may take in a split (held-out objects draw from the held-out ones); extra
    colours join the training pairs with every shape."""
    if split == "train":
        return [(c, s) for c in (*COLORS, *extra_colors) for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
    if split == "heldout":
        return sorted(HELDOUT_PAIRS)
    raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")


def sample_scene(rng: np.random.Generator, split: str = "train", max_objects: int = 3,
                 n_objects: int | None = None, extra_colors: tuple[str, ...] = (), extra_share: float = 0.0) -> Scene:
    """A random scene; train scenes avoid HELDOUT_PAIRS, held-out scenes contain at least one of them.

    The number of objects is uniform in 1..max_objects, or exactly n_objects when given; ``extra_colors`` (names
    of EXTRA_COLORS) join the colours objects may take (none: the default data, draw for draw). ``extra_share``
    (train scenes with extra colours): the chance each object takes an extra colour (0: the extra pairs are drawn
    as often as any other pair; with orange, one object in five).
    """
    if not 0 <= extra_share <= 1 or (extra_share and not extra_colors):
        raise ValueError(f"extra_share is a probability in [0, 1] for data with extra_colors, got {extra_share} "
                         f"with extra colours {list(extra_colors)}")
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be in 1..3, got {max_objects}")
    if n_objects is not None and not 1 <= n_objects <= 3:
        raise ValueError(f"n_objects must be in 1..3, got {n_objects}")
    train_pairs, own_pairs = _pairs("train", extra_colors), _pairs(split, extra_colors)
    n = int(rng.integers(1, max_objects + 1)) if n_objects is None else n_objects
    while True:  # rejection sampling of a layout; a few tries at most
        objects: list[ShapeObject] = []
        for k in range(n):
            # The first object of a held-out scene has a held-out pair; the others may have any pair.
            pairs = own_pairs if k == 0 else (train_pairs if split == "train" else train_pairs + own_pairs)
            if extra_share and split == "train":  # one more draw per object only then: the default data is unchanged
                extra = rng.random() < extra_share
                pairs = [(c, s) for c, s in pairs if (c in extra_colors) == extra]
            color, shape = pairs[int(rng.integers(len(pairs)))]
            size = SIZES[int(rng.integers(len(SIZES)))]
            free = [
                p
                for p in POSITIONS
                if all(_compatible((shape, size, p), (o.shape, o.size, o.position)) for o in objects)
            ]
            if not free:
                break
            objects.append(ShapeObject(shape, color, size, free[int(rng.integers(len(free)))]))
        if len(objects) == n:
            break
    background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(tuple(objects), background)


# --- rendering ----------------------------------------------------------------------------------------


def object_boxes(scene: Scene | dict | None) -> list[tuple[float, float, float, float]]:
    """Per object, the box (x0, y0, x1, y1) in canvas fractions it lies in wherever the jitter puts it (a scene,
    or a scene as the latent cache stores it: a dict); [] for no scene or objects without position and size."""
    if scene is None:
        return []
    objects = scene["objects"] if isinstance(scene, dict) else [dataclasses.asdict(o) for o in scene.objects]
    boxes = []
    for o in objects:
        if o.get("position") in ANCHORS and o.get("size") in SIZE_RADIUS:
            (cx, cy), r = ANCHORS[o["position"]], SIZE_RADIUS[o["size"]] + JITTER
            boxes.append((cx - r, cy - r, cx + r, cy + r))
    return boxes


def object_coverage(scene: Scene, size: int = 64, seed: int = 0, supersample: int = 4
                    ) -> list[tuple[ShapeObject, tuple[float, float], np.ndarray]]:
    """Each object of a scene as ``render`` draws it: (object, centre (x, y) in canvas fractions, the share of each
    pixel it covers, float (size, size) in [0, 1]); seed fixes the jitter, as in ``render``."""
    if not scene.complete:
        raise ValueError(f"cannot render a scene with unstated attributes: {scene}")
    if size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {size}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    positions = [o.position for o in scene.objects]
    if len(set(positions)) != len(positions):
        raise ValueError(f"objects must sit in distinct positions, got {positions}")
    rng = np.random.default_rng(seed)  # the jitter depends on the seed only, not on the size
    return [(o, centre, coverage(o.shape, centre, SIZE_RADIUS[o.size], size, supersample))
            for o, centre in zip(scene.objects, _place(scene, rng))]


def render(scene: Scene, size: int = 64, seed: int = 0, supersample: int = 4) -> np.ndarray:
    """Draw a scene as a uint8 (size, size, 3) image; seed fixes the jitter; supersample antialiases."""
    objects = object_coverage(scene, size, seed, supersample)
    image = np.empty((size, size, 3), np.float64)
    image[:] = BACKGROUNDS[scene.background]
    for o, _, share in objects:
        image = _blend(image, share, o.color)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def coverage(shape: str, centre: tuple[float, float], radius: float, size: int, supersample: int = 4) -> np.ndarray:
    """The share of each pixel of a (size, size) canvas that one shape of half-size ``radius`` covers."""
    fine = size * supersample
    coords = (np.arange(fine) + 0.5) / fine
    x, y = np.meshgrid(coords, coords)
    mask = _inside(shape, x, y, *centre, radius)
    return mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def paint(image: np.ndarray, shape: str, color: str, centre: tuple[float, float], radius: float,
          supersample: int = 4) -> np.ndarray:
    """A float (H, W, 3) canvas with one antialiased shape of half-size ``radius`` (canvas fractions) drawn on."""
    return _blend(image, coverage(shape, centre, radius, image.shape[0], supersample), color)


def _blend(image: np.ndarray, share: np.ndarray, color: str) -> np.ndarray:
    share = share[..., None]  # (H, W, 1)
    return image * (1 - share) + np.asarray(ALL_COLORS[color], np.float64) * share


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


# --- captions -----------------------------------------------------------------------------------------

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on top"),
    "bottom": ("at the bottom", "at the bottom"),
    "center": ("in the center", "in the middle"),
}
_TEMPLATES_WITH_BACKGROUND = (
    "{objs} on a {bg} background",
    "{objs}, {bg} background",
    "a {bg} background with {objs}",
    "a picture of {objs} on a {bg} background",
)
_TEMPLATES_WITHOUT_BACKGROUND = ("{objs}", "an image of {objs}", "a picture of {objs}")

# Paraphrases: the words and orders people write that the templates above never use. Every one parses back to
# the same scene (parse_caption knows these words), so a judge score on them measures the model, not the parser.
_SYNONYMS = {"small": "tiny", "large": "big", "purple": "violet", "gray": "grey", "center": "centre"}
_POSITION_PARAPHRASES = {
    "left": ("on the left side", "to the left"),
    "right": ("on the right side", "to the right"),
    "top": ("near the top", "at the top edge"),
    "bottom": ("near the bottom", "at the bottom edge"),
    "center": ("in the middle", "in the centre"),
}
_PARAPHRASE_TEMPLATES = (
    "{objs} against a {bg} background",
    "{bg} background, {objs}",
    "draw {objs} on {bg}",
)
PHRASINGS = ("template", "paraphrase", "mixed")  # captions as the templates write them, as people do, or either


def _join(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: np.random.Generator, background: bool | None = None,
            phrasing: str = "template", attribute_dropout: float = 0.0) -> str:
    """A caption stating every object's shape, colour, size and position; background: True/False/random.

    phrasing "template" uses the fixed templates' words; "paraphrase" always the synonyms, other orders and
    templates people write ("a big violet triangle in the middle against a grey background"); "mixed" picks
    one of the two per caption (the training data's setting). ``attribute_dropout``: the chance that an object's
    phrase leaves out one of its size, colour or shape words ("a red shape", "a small triangle"), so that each
    word is also seen apart from the others (training captions only: such a caption does not parse back).
    """
    if not scene.objects or not all(o.complete for o in scene.objects):
        raise ValueError(f"caption needs at least one object with every attribute stated, got {scene}")
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}: expected one of {PHRASINGS}")
    if background is None:
        background = bool(rng.integers(2))
    if background and scene.background is None:
        raise ValueError("cannot state the background of a scene whose background is unstated")
    para = phrasing == "paraphrase" or (phrasing == "mixed" and bool(rng.integers(2)))
    word = (lambda w: _SYNONYMS.get(w, w)) if para else (lambda w: w)
    phrases_for = _POSITION_PARAPHRASES if para else _POSITION_PHRASES

    def where(position: str) -> str:
        return phrases_for[position][int(rng.integers(2))]

    def adjectives(size: str, color: str) -> str:
        first, second = word(size), word(color)
        return f"{second} {first}" if para and rng.integers(4) == 0 else f"{first} {second}"

    def thing(size: str, color: str, shape: str, plural: str = "") -> str:
        """'small red circle', or with one of the three words left out ('red shape', 'small circle')."""
        if attribute_dropout and rng.random() < attribute_dropout:
            left_out = int(rng.integers(3))
            words = [word(size), word(color), "shape"] if left_out == 2 else \
                [word(color) if left_out == 0 else word(size), shape]
            return " ".join(words) + plural
        return f"{adjectives(size, color)} {shape}{plural}"

    # Objects that look alike (same shape, colour and size) are counted: "two small red circles, ...".
    groups: dict[tuple[str, str, str], list[str]] = {}
    for o in scene.objects:
        groups.setdefault((o.size, o.color, o.shape), []).append(o.position)
    phrases = []
    for (size, color, shape), positions in groups.items():
        if len(positions) == 1:
            phrases.append(f"a {thing(size, color, shape)} {where(positions[0])}")
        else:
            each = _join([f"one {where(p)}" for p in positions])
            phrases.append(f"{_NUMBER_WORDS[len(positions)]} {thing(size, color, shape, 's')}, {each}")
    order = rng.permutation(len(phrases))
    objs = _join([phrases[i] for i in order])
    if not background:
        templates = _TEMPLATES_WITHOUT_BACKGROUND
    else:
        templates = _TEMPLATES_WITH_BACKGROUND + (_PARAPHRASE_TEMPLATES if para else ())
    bg = word(scene.background) if background else None
    return templates[int(rng.integers(len(templates)))].format(objs=objs, bg=bg)


def unplaced_caption(scene: Scene, background: bool = True, shapes: bool = True) -> str:
    """A caption naming each object's colour and shape only, in the scene's object order (the order of a layout
    map's labels, ``data.control_maps``), and the background when asked: "a red circle and a blue square on a
    black background". What a ControlNet prompt says when the map sets every object's size and place.
    ``shapes=False`` names colours only ("a red object and a blue object ..."): the map sets the shapes too."""
    if not scene.objects or any(o.color is None or o.shape is None for o in scene.objects):
        raise ValueError(f"unplaced_caption needs objects with a colour and a shape, got {scene}")
    objs = _join([f"a {o.color} {o.shape if shapes else 'object'}" for o in scene.objects])
    if not background or scene.background is None:
        return objs
    return f"{objs} on a {scene.background} background"


def scene_from_dict(data: dict) -> Scene:
    """The Scene of its ``dataclasses.asdict`` form (what a latent cache stores per item)."""
    return Scene(tuple(ShapeObject(**o) for o in data["objects"]), data.get("background"))


# --- parsing ------------------------------------------------------------------------------------------

_COUNTS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3}
_SHAPE_WORDS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
_COLOR_WORDS = {c: c for c in ALL_COLORS} | {"violet": "purple"}
_SIZE_WORDS = {"small": "small", "large": "large", "big": "large", "tiny": "small"}
_POSITION_WORDS = {p: p for p in POSITIONS} | {"centre": "center", "middle": "center"}
_BACKGROUND_WORDS = {b: b for b in BACKGROUNDS} | {"grey": "gray"}


@dataclass
class _Mention:
    """One noun phrase of a caption while it is parsed: "two small red circles, one ... and one ..."."""

    count: int  # how many objects it names
    shape: str | None = None
    color: str | None = None
    size: str | None = None
    positions: list[str] = field(default_factory=list)  # none, or one per object

    def add(self, word: str) -> bool:
        """Take a size / colour / shape word; False if it contradicts one already taken."""
        for name, table in (("shape", _SHAPE_WORDS), ("color", _COLOR_WORDS), ("size", _SIZE_WORDS)):
            if word in table:
                if getattr(self, name) not in (None, table[word]):
                    return False
                setattr(self, name, table[word])
        return True


def parse_caption(text: str) -> Scene | None:
    """Read a caption (ours or a user's prompt in the same words) back into a Scene; None if it has no object.

    Unstated attributes are None. A mention is a count word ("a", "two", ...) followed by size / colour /
    shape words, the shape last; the position words after it belong to it, one per object ("two red
    circles, one on the left and one on the right"). Background colours ("black", "gray", "white") set the
    background. Contradictions ("a red blue circle") and position counts that don't match give None.
    """
    words = re.findall(r"[a-z]+", text.lower())
    attribute_words = _SHAPE_WORDS.keys() | _COLOR_WORDS.keys() | _SIZE_WORDS.keys()
    mentions: list[_Mention] = []
    background = None
    for w, nxt in zip(words, words[1:] + [""]):
        if w in _BACKGROUND_WORDS:
            if background not in (None, _BACKGROUND_WORDS[w]):
                return None  # two different backgrounds
            background = _BACKGROUND_WORDS[w]
        elif w in _COUNTS and nxt in attribute_words:
            mentions.append(_Mention(_COUNTS[w]))
        elif not mentions:
            continue  # words before the first mention ("an image of ...")
        elif w in attribute_words and mentions[-1].shape is None:
            if not mentions[-1].add(w):
                return None
        elif w in _POSITION_WORDS:
            mentions[-1].positions.append(_POSITION_WORDS[w])
    objects = []
    for m in mentions:
        if m.shape is None or len(m.positions) not in (0, m.count):
            return None
        objects += [ShapeObject(m.shape, m.color, m.size, p) for p in m.positions or [None] * m.count]
    return Scene(tuple(objects), background) if objects else None


# --- data set and prompt sets -------------------------------------------------------------------------


class ShapesDataset(torch.utils.data.Dataset):
    """n shape images; item i depends only on (seed, split, i), whatever the access order."""

    def __init__(self, n: int, size: int = 64, seed: int = 0, split: str = "train", max_objects: int = 3,
                 phrasing: str = "mixed", attribute_dropout: float = 0.0, extra_colors: tuple[str, ...] = (),
                 extra_share: float = 0.0):
        if not 0 <= attribute_dropout <= 1:
            raise ValueError(f"attribute_dropout is a probability in [0, 1], got {attribute_dropout}")
        if phrasing not in PHRASINGS:
            raise ValueError(f"unknown phrasing {phrasing!r}: expected one of {PHRASINGS}")
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        _pairs(split)  # validates split
        if not 1 <= max_objects <= 3:
            raise ValueError(f"max_objects must be in 1..3, got {max_objects}")
        self.n, self.size, self.seed, self.split, self.max_objects = n, size, seed, split, max_objects
        self.phrasing = phrasing  # captions: half template words, half paraphrases by default
        self.attribute_dropout = attribute_dropout  # chance an object's phrase leaves out one attribute word
        self.extra_colors = check_extra_colors(extra_colors)  # colours beyond the default vocabulary (EXTRA_COLORS)
        self.extra_share = extra_share  # chance an object takes one of them (0: as often as any other pair)
        sample_scene(np.random.default_rng(0), split, extra_colors=self.extra_colors, extra_share=extra_share)  # checks

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        """dict(image=(3, H, W) float in [-1, 1], caption=str, scene=Scene, render_seed=int (``render``'s seed))."""
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        index %= self.n
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        scene = sample_scene(rng, self.split, self.max_objects, extra_colors=self.extra_colors,
                             extra_share=self.extra_share)
        render_seed = int(rng.integers(2**31))
        image = render(scene, self.size, seed=render_seed)
        words = np.random.default_rng([self.seed, SPLITS.index(self.split), index, 1])  # images apart from words
        text = caption(scene, words, phrasing=self.phrasing, attribute_dropout=self.attribute_dropout)
        return {"image": to_tensor(image), "caption": text, "scene": scene, "render_seed": render_seed}


def _prompts(split: str, n: int, seed: int, phrasing: str, objects: int) -> list[tuple[str, Scene]]:
    """n (caption, scene) pairs of ``objects`` objects, every attribute stated, so parse_caption(caption) == scene."""
    stream = [seed, SPLITS.index(split), 1_000_003 + 7 * (objects - 1)]
    rng, words = np.random.default_rng(stream), np.random.default_rng(stream + [1])  # scenes apart from words
    out = []
    for _ in range(n):
        scene = sample_scene(rng, split, n_objects=objects)
        out.append((caption(scene, words, background=True, phrasing=phrasing), scene))
    return out


def heldout_prompts(n: int = 16, seed: int = 0, phrasing: str = "template", objects: int = 1
                    ) -> list[tuple[str, Scene]]:
    """Prompts for (color, shape) pairs never seen in training, to score compositional generalization.

    phrasing "paraphrase" words them as people do (synonyms, other orders); objects: 1, 2 or 3 per scene
    (the first always a held-out pair). The scenes do not depend on the phrasing.
    """
    return _prompts("heldout", n, seed, phrasing, objects)


def train_prompts(n: int = 16, seed: int = 0, phrasing: str = "template", objects: int = 1
                  ) -> list[tuple[str, Scene]]:
    """Prompts drawn like the training captions, as the in-distribution reference."""
    return _prompts("train", n, seed, phrasing, objects)


def extra_color_prompts(n: int = 16, seed: int = 0, color: str = "orange", phrasing: str = "template",
                        objects: int = 1) -> list[tuple[str, Scene]]:
    """Prompts whose first object has an extra colour (EXTRA_COLORS, never in the default data): what a LoRA that
    teaches that colour is scored on (judge with ``colors=ALL_COLORS``). The scenes are train_prompts' with that
    object recoloured."""
    check_extra_colors((color,))
    stream = [seed, 2, 1_000_003 + 7 * (objects - 1)]
    rng, words = np.random.default_rng(stream), np.random.default_rng(stream + [1])
    out = []
    for _ in range(n):
        scene = sample_scene(rng, "train", n_objects=objects)
        first, *rest = scene.objects
        scene = Scene((ShapeObject(first.shape, color, first.size, first.position), *rest), scene.background)
        out.append((caption(scene, words, background=True, phrasing=phrasing), scene))
    return out
