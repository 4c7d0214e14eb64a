"""``latentdiff check-data``: a health report on an image folder (or tar shards) before hours are spent training.

Reports corrupt files (cannot be read or decoded), folders that cannot be listed, tiny images (shorter side
below ``min_size``), exact duplicates (same bytes, SHA-256), near duplicates (a 64-bit difference hash,
Krawetz's dHash, within ``near_bits`` bits, and colours alike: re-encoded, resized or lightly edited copies),
metadata.jsonl lines that cannot be used and captions of files that are not there, images without a caption,
and histograms of sizes and aspect ratios (and of aspect-ratio buckets, given a bucket area). Names that are
not UTF-8 are written with ``\\xNN`` escapes (``folder.display_name``), so the report prints and stores as JSON.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from latentdiff.data.buckets import make_buckets, nearest_bucket
from latentdiff.data.folder import display_name, find_caption, list_images, read_metadata, to_rgb
from latentdiff.data.tars import TarShards, is_tar_source

ASPECT_BINS = [(0.0, "taller than 1:2"), (0.5, "1:2 to 3:4"), (0.75, "3:4 to 9:10"), (0.9, "about square"),
               (1 / 0.9, "10:9 to 4:3"), (4 / 3, "4:3 to 2:1"), (2.0, "wider than 2:1")]
SIDE_BINS = [0, 64, 128, 256, 512, 1024, 2048]
NEAR_COLOUR = 16.0  # near duplicates: mean absolute difference of 4x4 colour thumbnails, at most (of 255)


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: a 9x8 grayscale thumbnail, one bit per horizontal neighbour pair that brightens."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.LANCZOS), dtype=np.int16)  # (8, 9)
    bits = (small[:, 1:] > small[:, :-1]).flatten()  # (64,)
    return int("".join("1" if b else "0" for b in bits), 2)


def colour_thumb(image: Image.Image) -> np.ndarray:
    """A 4x4 RGB thumbnail (box-averaged), float: what dHash, which sees only brightness steps, does not (two flat
    images of different colours have the same dHash)."""
    return np.asarray(image.convert("RGB").resize((4, 4), Image.BOX), dtype=np.float32)


def near_pairs(hashes: dict[str, int], max_bits: int) -> list[tuple[str, str, int]]:
    """Pairs of names whose hashes differ in at most ``max_bits`` bits.

    Pigeonhole: split the 64 bits into ``max_bits + 1`` chunks; two hashes within ``max_bits`` agree
    on at least one chunk, so only names sharing a chunk value are compared.
    """
    chunks = max_bits + 1
    bounds = [round(i * 64 / chunks) for i in range(chunks + 1)]
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, h in hashes.items():
        for c in range(chunks):
            groups[(c, (h >> bounds[c]) & ((1 << (bounds[c + 1] - bounds[c])) - 1))].append(name)
    found = {}
    for names in groups.values():
        for a, b in itertools.combinations(sorted(names), 2):
            if (a, b) not in found:
                d = (hashes[a] ^ hashes[b]).bit_count()
                if d <= max_bits:
                    found[(a, b)] = d
    return sorted((a, b, d) for (a, b), d in found.items())


@dataclass
class HealthReport:
    """What ``check_data`` found; names are paths relative to ``root``."""

    root: str
    files: int = 0  # files with an image suffix
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (name, why it cannot be read)
    tiny: list[tuple[str, int, int]] = field(default_factory=list)  # (name, width, height)
    exact_duplicates: list[list[str]] = field(default_factory=list)  # groups of byte-identical files
    near_duplicates: list[tuple[str, str, int]] = field(default_factory=list)  # (a, b, differing hash bits)
    missing_captions: list[str] = field(default_factory=list)
    unreadable_folders: list[tuple[str, str]] = field(default_factory=list)  # (folder, why it cannot be listed)
    bad_metadata: list[tuple[str, str]] = field(default_factory=list)  # ("metadata.jsonl:LINE", why it is ignored)
    orphan_captions: list[str] = field(default_factory=list)  # metadata.jsonl captions of files that are not there
    sizes: dict[str, int] = field(default_factory=dict)  # shorter side -> count
    aspects: dict[str, int] = field(default_factory=dict)  # aspect ratio (W / H) -> count
    buckets: dict[str, int] = field(default_factory=dict)  # "HxW" -> count, when a bucket area was given

    @property
    def problems(self) -> int:
        """What training should not see as it is: corrupt and tiny files, the extra copies of duplicates, folders it
        cannot read, and captions it would lose (unusable metadata lines, captions of missing files)."""
        return (len(self.corrupt) + len(self.tiny) + sum(len(g) - 1 for g in self.exact_duplicates)
                + len(self.near_duplicates) + len(self.unreadable_folders) + len(self.bad_metadata)
                + len(self.orphan_captions))

    def to_text(self, most: int = 20) -> str:
        """The report as lines of text (at most ``most`` names per finding)."""
        usable = self.files - len(self.corrupt)
        lines = [f"{self.root}: {self.files} image file(s), {usable} readable"]

        def section(title: str, rows: list[str]) -> None:
            lines.append(f"{title}: {len(rows)}")
            lines.extend(f"  {r}" for r in rows[:most])
            if len(rows) > most:
                lines.append(f"  ... and {len(rows) - most} more")

        section("corrupt", [f"{n}: {why}" for n, why in self.corrupt])
        section("unreadable folders", [f"{n}: {why}" for n, why in self.unreadable_folders])
        section("tiny", [f"{n}: {w}x{h}" for n, w, h in self.tiny])
        section("exact duplicate groups", [" = ".join(g) for g in self.exact_duplicates])
        section("near duplicates", [f"{a} ~ {b} ({d} bits)" for a, b, d in self.near_duplicates])
        section("unusable metadata lines", [f"{n}: {why}" for n, why in self.bad_metadata])
        section("captions of missing files", self.orphan_captions)
        section("without a caption", self.missing_captions)
        for title, hist in (("shorter side (pixels)", self.sizes), ("aspect ratio (W/H)", self.aspects),
                            ("buckets (HxW)", self.buckets)):
            if hist:
                lines.append(f"{title}:")
                top = max(hist.values())
                lines.extend(f"  {k:>16} {v:6d} {'#' * max(1, round(30 * v / top)) if v else ''}"
                             for k, v in hist.items())
        lines.append("no problems found" if not self.problems else
                     f"{self.problems} problem file(s): fix or remove them before training")
        return "\n".join(lines)


def _side_bin(side: int) -> str:
    lo = max(b for b in SIDE_BINS if b <= side)
    hi = next((b for b in SIDE_BINS if b > side), None)
    return f"{lo}-{hi - 1}" if hi else f">= {lo}"


def _aspect_of(bucket: str) -> float:
    h, w = map(int, bucket.split("x"))
    return w / h


def _aspect_bin(ratio: float) -> str:
    return max((edge, name) for edge, name in ASPECT_BINS if edge <= ratio)[1]


def _folder_images(root: Path, report: HealthReport):
    """(name, RGB image or None, why not, SHA-256 of the file, has a caption) per image file under ``root``; folders
    it cannot list, unusable metadata lines and captions of missing files go into ``report``."""
    paths = list_images(root, report.unreadable_folders)
    if not paths and not report.unreadable_folders:
        raise ValueError(f"no image files in {root} (looked recursively for .png, .jpg, .webp, ...)")
    metadata = read_metadata(root, verbose=False, problems=report.bad_metadata)
    names = {path.relative_to(root).as_posix() for path in paths}
    report.orphan_captions = sorted(display_name(k) for k in metadata if k not in names)
    for path in paths:
        name = display_name(path.relative_to(root).as_posix())
        try:
            data = path.read_bytes()
        except OSError as e:
            yield name, None, f"cannot be read ({type(e).__name__}: {e.strerror})", "", False
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                rgb = to_rgb(im)
        except Exception as e:  # noqa: BLE001 -- PIL raises many kinds of error for damaged files
            yield name, None, f"{type(e).__name__}: {e}", "", False
            continue
        yield name, rgb, None, hashlib.sha256(data).hexdigest(), find_caption(root, path, metadata) is not None


def _tar_images(spec: str):
    """The same per sample of tar shards; duplicates by decoded pixels, damaged samples and shards as corrupt."""
    shards = TarShards(spec, min_size=1, verbose=False)
    try:
        for item in shards:
            rgb = item["image"]
            digest = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
            yield display_name(item["key"]), rgb, None, digest, item["captioned"]
    except ValueError:  # no usable sample at all: every one is reported as corrupt below
        pass
    for name, why in shards.skipped:
        yield display_name(name), None, why, "", False


def check_data(root: str | Path, min_size: int = 64, near_bits: int = 4, bucket_area: int = 0,
               bucket_step: int = 64) -> HealthReport:
    """Read every image of a folder (or every sample of tar shards) once and report what is wrong with it."""
    if not 0 <= near_bits < 64:
        raise ValueError(f"near_bits must be in 0..63, got {near_bits}")
    report = HealthReport(display_name(str(root)))
    if is_tar_source(str(root)):
        images = _tar_images(str(root))
    else:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (or is not a folder)")
        images = _folder_images(root, report)
    buckets = make_buckets(bucket_area, bucket_step) if bucket_area else None
    by_digest: dict[str, list[str]] = defaultdict(list)
    hashes: dict[str, int] = {}
    colours: dict[str, np.ndarray] = {}
    sizes, aspects, bucket_counts = Counter(), Counter(), Counter()
    for name, rgb, problem, digest, captioned in images:
        report.files += 1
        if rgb is None:
            report.corrupt.append((name, problem))
            continue
        w, h = rgb.size
        if min(w, h) < min_size:
            report.tiny.append((name, w, h))
        by_digest[digest].append(name)
        hashes[name], colours[name] = dhash(rgb), colour_thumb(rgb)
        if not captioned:
            report.missing_captions.append(name)
        sizes[_side_bin(min(w, h))] += 1
        aspects[_aspect_bin(w / h)] += 1
        if buckets:
            bh, bw = buckets[nearest_bucket(w, h, buckets)]
            bucket_counts[f"{bh}x{bw}"] += 1
    report.exact_duplicates = sorted(g for g in by_digest.values() if len(g) > 1)
    same = {frozenset(p) for g in report.exact_duplicates for p in itertools.combinations(g, 2)}
    report.near_duplicates = [(a, b, d) for a, b, d in near_pairs(hashes, near_bits) if frozenset((a, b)) not in same
                              and float(np.abs(colours[a] - colours[b]).mean()) <= NEAR_COLOUR]
    report.sizes = {k: sizes[k] for k in (_side_bin(b) for b in SIDE_BINS) if k in sizes}
    report.aspects = {name: aspects[name] for _, name in ASPECT_BINS if name in aspects}
    report.buckets = dict(sorted(bucket_counts.items(), key=lambda kv: _aspect_of(kv[0])))
    return report
