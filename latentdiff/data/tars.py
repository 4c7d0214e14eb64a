"""Webdataset-style tar shards, read with the standard ``tarfile`` module as a stream.

A shard is a tar file whose consecutive members sharing a key form one sample (the webdataset
convention: the key is the member's path up to the first dot of its file name, the rest is the
extension): ``0001.jpg`` + ``0001.txt`` (caption) + ``0001.json`` (``caption``/``text``, ``label``)
+ ``0001.cls`` (an integer label). Shards are named by a folder (every ``*.tar``/``*.tar.gz`` in it),
a glob, a brace range as webdataset writes them (``data/shard-{000000..000099}.tar``), or one file.

Shards are streamed (``tarfile`` mode ``r|*``), so a data set larger than memory or disk cache is
read once, front to back. A sample whose image cannot be decoded, is too small or is missing is
skipped and named; a damaged shard (truncated, bad gzip) is reported and the next shard read.
"""

from __future__ import annotations

import glob
import io
import json
import re
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from latentdiff.data.folder import IMAGE_SUFFIXES, MISSING_CAPTION_CHOICES, caption_from_filename, to_rgb

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str) -> list[Path]:
    """Shard paths from a folder, a glob, a ``{000..099}`` brace range, or a single file; in order."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith(TAR_SUFFIXES) and p.is_file())
        if not found:
            raise FileNotFoundError(f"no tar shards ({', '.join(TAR_SUFFIXES)}) in the folder {path}")
        return found
    names = [spec]
    match = _BRACES.search(spec)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        names = [spec[: match.start()] + str(i).zfill(width) + spec[match.end():] for i in range(int(lo), int(hi) + 1)]
    out = []
    for name in names:
        out.extend(sorted(Path(p) for p in glob.glob(name)) if glob.has_magic(name) else [Path(name).expanduser()])
    missing = [str(p) for p in out if not p.is_file()]
    if not out or missing:
        raise FileNotFoundError(f"tar shard(s) not found: {', '.join(missing[:5]) or spec}"
                                f"{' ...' if len(missing) > 5 else ''}")
    return out


def is_tar_source(spec: str) -> bool:
    """Whether ``data`` names tar shards (rather than a folder of images or the built-in set)."""
    if spec.endswith(TAR_SUFFIXES) or _BRACES.search(spec):
        return True
    path = Path(spec).expanduser()
    if not path.is_dir():
        return False
    children = [p for p in path.iterdir() if p.is_file()]
    return any(p.name.endswith(TAR_SUFFIXES) for p in children) and not any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))


def split_key(name: str) -> tuple[str, str]:
    """``"dir/0001.seg.jpg"`` -> (``"dir/0001"``, ``"seg.jpg"``): the webdataset key and extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _decode(members: dict[str, bytes], min_size: int) -> tuple[Image.Image | None, str | None]:
    """The sample's image as RGB, or None and why not."""
    image_ext = next((e for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_SUFFIXES), None)
    if image_ext is None:
        return None, f"no image member (found {', '.join(sorted(members)) or 'nothing'})"
    try:
        with Image.open(io.BytesIO(members[image_ext])) as im:
            im.load()
            if min(im.size) < min_size:
                return None, f"{image_ext}: too small ({im.size[0]}x{im.size[1]}, min_size={min_size})"
            return to_rgb(im), None
    except Exception as e:  # noqa: BLE001 -- PIL raises many kinds of error for damaged data
        return None, f"{image_ext}: {type(e).__name__}: {e}"


def _annotations(members: dict[str, bytes]) -> tuple[str | None, int | None, str | None]:
    """(caption, label, problem) from the ``txt``, ``json`` and ``cls`` members."""
    caption = label = None
    members = {ext.rsplit(".", 1)[-1]: data for ext, data in members.items()}  # "seg.txt" counts as "txt"
    try:
        if "json" in members:
            meta = json.loads(members["json"].decode("utf-8"))
            if isinstance(meta, dict):
                caption = meta.get("caption", meta.get("text"))
                label = meta.get("label", meta.get("cls"))
        if "txt" in members:
            caption = members["txt"].decode("utf-8", errors="replace").strip()
        if "cls" in members:
            label = int(members["cls"].decode("utf-8").strip())
        if label is not None:
            label = int(label)
    except (ValueError, UnicodeDecodeError) as e:
        return None, None, f"unreadable annotation: {type(e).__name__}: {e}"
    return (None if caption is None else str(caption)), label, None


class TarShards:
    """An iterable over the samples of webdataset-style tar shards: dicts with a PIL ``image``, ``caption``,
    ``label`` (None without a ``.cls``/json label) and ``key`` (``shard:key``), read as a stream."""

    def __init__(self, spec: str, min_size: int = 8, missing_caption: str = "empty", verbose: bool = True):
        if missing_caption not in ("empty", "filename"):
            hint = " ('class' needs class folders)" if missing_caption in MISSING_CAPTION_CHOICES else ""
            raise ValueError(f"missing_caption for tar shards must be 'empty' or 'filename', got {missing_caption!r}"
                             + hint)
        self.shards = expand_shards(spec)
        self.min_size, self.missing_caption, self.verbose = min_size, missing_caption, verbose
        self.skipped: list[tuple[str, str]] = []  # (shard:key or shard, reason), filled while iterating
        self.missing_captions = 0
        self.count = 0

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr)

    def _samples(self, shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {extension: bytes}) per sample of one shard, streamed; a damaged shard ends early, reported."""
        key, members, reading = None, {}, False
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    k, ext = split_key(info.name)
                    if k != key and members:
                        yield key, members
                        members = {}
                    key, reading = k, True
                    members[ext] = tar.extractfile(info).read()
                    reading = False
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            reason = f"damaged shard ({type(e).__name__}: {e}); read up to member {key!r}, going on with the next"
            self.skipped.append((str(shard), reason))
            self._say(f"{shard}: {reason}")
            if members or reading:  # the sample being read when the shard broke may lack members: not used
                self.skipped.append((f"{shard.name}:{key}", "incomplete: the shard broke while reading it"))
                self._say(f"skipped {shard.name}:{key}: incomplete: the shard broke while reading it")
            members = {}
        if members:
            yield key, members

    def __iter__(self) -> Iterator[dict]:
        self.skipped, self.missing_captions, self.count = [], 0, 0
        for shard in self.shards:
            for key, members in self._samples(shard):
                name = f"{shard.name}:{key}"
                image, problem = _decode(members, self.min_size)
                caption, label, annotation_problem = _annotations(members)
                problem = problem or annotation_problem
                if problem:
                    self.skipped.append((name, problem))
                    self._say(f"skipped {name}: {problem}")
                    continue
                captioned = caption is not None
                if not captioned:
                    self.missing_captions += 1
                    caption = caption_from_filename(key) if self.missing_caption == "filename" else ""
                self.count += 1
                yield {"image": image, "caption": caption, "label": label, "scene": None, "key": name,
                       "captioned": captioned}
        if self.missing_captions:
            self._say(f"{self.missing_captions} of {self.count} sample(s) in the tar shards have no caption "
                      f"(no .txt, no caption in .json): missing_caption = {self.missing_caption!r}")
        if self.count == 0:
            raise ValueError(f"no usable samples in {len(self.shards)} tar shard(s) "
                             f"({len(self.skipped)} skipped: see the messages above)")
