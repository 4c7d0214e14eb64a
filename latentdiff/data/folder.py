"""A folder of images (any size, any common format) with optional captions, checked before training.

Captions come from ``metadata.jsonl`` (Hugging Face imagefolder convention: one object per line
with ``file_name`` and ``text``, ``file_name`` relative to the folder holding that metadata file;
one may sit in any subfolder, the nearest wins) or from a ``.txt`` file beside each image (UTF-8);
otherwise they are empty, or derived from the file name or class (``missing_caption``), and the count
of such images is reported. Metadata wins over a ``.txt`` file. With ``class_folders`` each
subfolder of the root is a class: its images get the integer label of the folder's place in the
sorted list of class names (``class_names``). Files that cannot be decoded are
skipped, counted and named, never fatal: at scan time they never enter ``files``; a file that breaks
later (deleted or damaged after the scan) is reported once and its index serves the next good item.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_NAME = "metadata.jsonl"
MISSING_CAPTION_CHOICES = ("empty", "filename", "class")


def display_name(name: str) -> str:
    """A file name as text that can be printed and stored in JSON: bytes that are not UTF-8 (which Python keeps as
    lone surrogates, ``os.fsdecode``'s surrogateescape) written as ``\\xNN``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return name


def _float_to_uint8(image: Image.Image) -> Image.Image:
    """A floating-point image (mode F: float TIFFs) to 8 bits by its range: [0, 1], [0, 255] or [0, 65535]; values
    outside all three (or NaN) are refused, since no scale can be told from them."""
    arr = np.asarray(image, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("floating-point image holding NaN or inf values")
    lo, hi = float(arr.min()), float(arr.max())
    scale = next((255.0 / top for top in (1.0, 255.0, 65535.0) if lo >= 0 and hi <= top), None)
    if scale is None:
        raise ValueError(f"floating-point image with values in [{lo:g}, {hi:g}]: expected [0, 1], [0, 255] or "
                         "[0, 65535]; save it as an 8- or 16-bit image")
    return Image.fromarray(np.round(arr * scale).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (palette, RGBA, CMYK, 16-bit, 32-bit float, grayscale) to 8-bit RGB; alpha composited on white.
    A float image is read by its range ([0, 1], [0, 255] or [0, 65535]), anything else refused."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        image = _float_to_uint8(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit samples (Pillow reads 16-bit grayscale as I;16, or I in older versions): 65535 -> 255.
        # A fixed scale, not the image's own maximum, so a dark image stays dark.
        arr = np.clip(np.asarray(image, dtype=np.float64), 0.0, 65535.0)
        image = Image.fromarray(np.round(arr * (255.0 / 65535.0)).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def cover_and_crop(w: int, h: int, size: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """For a ``w x h`` image: the (width, height) that just covers ``size``, and the centre crop's (top, left)."""
    height, width = (size, size) if isinstance(size, int) else size
    scale = max(width / w, height / h)
    cover = (max(width, round(w * scale)), max(height, round(h * scale)))
    return cover, ((cover[1] - height) // 2, (cover[0] - width) // 2)


def resize_center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize (Lanczos) so the image just covers ``size`` (a side, or (height, width)) and crop the centre."""
    height, width = (size, size) if isinstance(size, int) else size
    cover, (top, left) = cover_and_crop(*image.size, size)
    return image.resize(cover, Image.LANCZOS).crop((left, top, left + width, top + height))


def caption_from_filename(path: str | Path) -> str:
    """``"red_circle-02.png"`` -> ``"red circle 02"``: the file stem with ``_`` and ``-`` as spaces."""
    return " ".join(re.split(r"[_\-\s]+", Path(path).stem)).strip()


def check_image(path: str | Path, min_size: int) -> str | None:
    """Why the image at ``path`` is unusable (decode, size or mode conversion fails), or None if it is fine."""
    try:
        with Image.open(path) as im:
            im.load()
            if min(im.size) < min_size:
                return f"too small ({im.size[0]}x{im.size[1]}, min_size={min_size})"
            to_rgb(im)
    except Exception as e:  # noqa: BLE001 -- PIL raises many kinds of error for damaged files
        return f"{type(e).__name__}: {e}"
    return None


def print_skipped(skipped: list[tuple[str, str]], where: str, most: int = 20) -> None:
    """Name the files skipped in ``where`` on stderr (at most ``most``, then a count)."""
    if not skipped:
        return
    print(f"skipped {len(skipped)} unreadable or tiny image(s) in {where}:", file=sys.stderr)
    for name, why in skipped[:most]:
        print(f"  {name}: {why}", file=sys.stderr)
    if len(skipped) > most:
        print(f"  ... and {len(skipped) - most} more (see .skipped)", file=sys.stderr)


def read_metadata(root: Path, verbose: bool = True, problems: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """Captions by path relative to ``root`` from every metadata.jsonl below it; deeper files override. Lines that
    cannot be used (and files that cannot be read) are said on stderr (``verbose``) and appended to ``problems`` as
    (``file:line``, why)."""
    out: dict[str, str] = {}
    metas = sorted(root.rglob(METADATA_NAME), key=lambda p: (len(p.parts), p))
    for path in (p for p in metas if p.is_file()):
        try:
            text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: tolerate a BOM
        except OSError as e:
            text, why = "", f"cannot be read ({type(e).__name__}: {e.strerror})"
            if problems is not None:
                problems.append((display_name(path.relative_to(root).as_posix()), why))
            if verbose:
                print(f"{path}: ignored ({why})", file=sys.stderr)
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row, problem = None, str(e)
            else:
                ok = isinstance(row, dict) and isinstance(row.get("file_name"), str)
                problem = None if ok else "expected an object with a string 'file_name'"
                if ok and Path(row["file_name"]).is_absolute():
                    problem = f"file_name {row['file_name']!r} must be relative to {path.parent}"
            if problem:
                if problems is not None:
                    problems.append((f"{display_name(path.relative_to(root).as_posix())}:{n}", problem))
                if verbose:
                    print(f"{path}:{n}: ignored ({problem})", file=sys.stderr)
                continue
            key = (path.parent / row["file_name"]).relative_to(root).as_posix()
            if row.get("text") is not None:  # a line without text leaves the .txt fallback
                out[key] = str(row["text"])
    return out


def find_caption(root: Path, path: Path, metadata: dict[str, str]) -> str | None:
    """The caption of the image at ``path``: metadata.jsonl first, then a ``.txt`` beside it; None if neither."""
    caption = metadata.get(path.relative_to(root).as_posix())
    if caption is None:
        txt = path.with_suffix(".txt")
        if txt.is_file():
            caption = txt.read_text(encoding="utf-8", errors="replace").strip()
    return caption


def list_images(root: Path, unreadable: list[tuple[str, str]] | None = None) -> list[Path]:
    """Every file under ``root`` (recursively, not into linked folders) with an image suffix, sorted; folders that
    cannot be listed are appended to ``unreadable`` as (path, why)."""

    def failed(e: OSError) -> None:
        if unreadable is not None:
            why = f"folder cannot be read ({type(e).__name__}: {e.strerror})"
            unreadable.append((display_name(str(e.filename)), why))

    found = [Path(folder) / name for folder, _, names in os.walk(root, onerror=failed) for name in names]
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_image(path: Path, size: int | None) -> Image.Image:
    """Decode ``path`` fully, convert to RGB and resize-crop to ``size`` (None: keep its own size);
    raises whatever PIL raises."""
    with Image.open(path) as im:
        rgb = to_rgb(im)
        return rgb if size is None else resize_center_crop(rgb, size)


class ImageFolder:
    """Images under ``root`` (recursively) resized and centre-cropped to ``size``, with captions (and labels)."""

    def __init__(self, root: str | Path, size: int, min_size: int = 8, verbose: bool = True,
                 class_folders: bool = False, missing_caption: str = "empty"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (or is not a folder)")
        if size < 1:
            raise ValueError(f"image size must be a positive number of pixels, got {size}")
        if missing_caption not in MISSING_CAPTION_CHOICES:
            raise ValueError(f"missing_caption must be one of {MISSING_CAPTION_CHOICES}, got {missing_caption!r}")
        if missing_caption == "class" and not class_folders:
            raise ValueError("missing_caption = 'class' needs class_folders = true (the class is the folder name)")
        self.size = size
        self.verbose = verbose
        metadata = read_metadata(self.root, verbose)
        self.files: list[Path] = []
        self.captions: list[str] = []
        self.labels: list[int] | None = [] if class_folders else None
        self.class_names: list[str] | None = None
        self.missing_captions = 0  # images with neither a metadata line nor a .txt file
        self.skipped: list[tuple[str, str]] = []  # (path, reason); grows if a file breaks after the scan
        self._broken: set[int] = set()  # indices that failed in __getitem__ (this process)
        usable: list[tuple[Path, str | None]] = []
        for path in list_images(self.root, self.skipped):
            problem = check_image(path, min_size)
            if problem is None and class_folders and path.parent == self.root:
                problem = "not inside a class folder (with class_folders, every image sits in its class's folder)"
            if problem:
                self.skipped.append((str(path), problem))
            else:
                usable.append((path, find_caption(self.root, path, metadata)))
        if class_folders:
            self.class_names = sorted({p.relative_to(self.root).parts[0] for p, _ in usable})
            self._report_empty_classes()
        label_of = {name: i for i, name in enumerate(self.class_names or [])}
        for path, caption in usable:
            cls = path.relative_to(self.root).parts[0] if class_folders else None
            if caption is None:
                self.missing_captions += 1
                caption = {"empty": "", "filename": caption_from_filename(path), "class": cls}[missing_caption]
            self.files.append(path)
            self.captions.append(caption)
            if self.labels is not None:
                self.labels.append(label_of[cls])
        self._report(min_size, missing_caption)

    def _report_empty_classes(self) -> None:
        """Name class folders that hold no usable image (they get no label)."""
        empty = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name not in self.class_names
                       and p.name != "__pycache__" and not p.name.startswith("."))
        if empty and self.verbose:
            print(f"{len(empty)} class folder(s) in {self.root} hold no usable image and get no label: "
                  f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}", file=sys.stderr)

    def _report(self, min_size: int, missing_caption: str) -> None:
        """Print the skipped files and the caption count; refuse a folder with nothing usable."""
        if self.verbose:
            print_skipped(self.skipped, str(self.root))
        if not self.files:
            found = f"{len(self.skipped)} image file(s), none usable" if self.skipped else "no image files"
            raise ValueError(
                f"no usable images in {self.root}: found {found} "
                f"(looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))}; min_size={min_size})"
            )
        if self.verbose and self.missing_captions:
            use = {"empty": "an empty caption", "filename": "a caption made from the file name",
                   "class": "the class name as caption"}[missing_caption]
            print(f"{self.missing_captions} of {len(self.files)} image(s) in {self.root} have no caption "
                  f"(no {METADATA_NAME} line, no .txt file): each gets {use} (missing_caption = "
                  f"{missing_caption!r})", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.files)

    def record(self, index: int, size: int | tuple[int, int] | None = None) -> dict:
        """Item ``index`` with its image as a PIL RGB image, resize-cropped to ``size`` (None: its own size).

        A file that broke after the scan is reported once and the next good index (wrapping) serves
        instead, so an epoch never dies on it and the same index always gives the same item.
        """
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for i in (j % n for j in range(index, index + n)):
            if i in self._broken:
                continue
            try:
                image = load_image(self.files[i], None)
            except Exception as e:  # noqa: BLE001 -- deleted, truncated, replaced by garbage, ...
                self._broken.add(i)
                reason = f"failed after the scan: {type(e).__name__}: {e}"
                self.skipped.append((str(self.files[i]), reason))
                print(f"{self.files[i]}: {reason}; serving the next good image instead", file=sys.stderr)
                continue
            if size is not None:
                image = resize_center_crop(image, size)
            return {"image": image, "caption": self.captions[i], "scene": None,
                    "label": None if self.labels is None else self.labels[i],
                    "key": self.files[i].relative_to(self.root).as_posix()}
        raise RuntimeError(f"none of the {n} images in {self.root} can be read any more; see .skipped")

    def __getitem__(self, index: int) -> dict:
        item = self.record(index, self.size)
        item["image"] = image_to_tensor(item["image"])
        return item
