"""A folder of images (any size, any common format) with optional captions, checked before training.

Captions come from ``metadata.jsonl`` (Hugging Face imagefolder convention: one object per line
with ``file_name`` and ``text``, ``file_name`` relative to the folder holding that metadata file;
one may sit in any subfolder, the nearest wins) or from a ``.txt`` file beside each image (UTF-8);
otherwise they are empty. Metadata wins over a ``.txt`` file. Files that cannot be decoded are
skipped, counted and named, never fatal: at scan time they never enter ``files``; a file that breaks
later (deleted or damaged after the scan) is reported once and its index serves the next good item.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_NAME = "metadata.jsonl"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (palette, RGBA, CMYK, 16-bit, grayscale) to 8-bit RGB; alpha composited on white."""
    image = ImageOps.exif_transpose(image)
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


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (Lanczos) and crop the centre square."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_image(path: Path, size: int) -> Image.Image:
    """Decode ``path`` fully, convert to RGB and resize-crop to ``size``; raises whatever PIL raises."""
    with Image.open(path) as im:
        return resize_center_crop(to_rgb(im), size)


class ImageFolder:
    """Images under ``root`` (recursively) resized and centre-cropped to ``size``, with captions."""

    def __init__(self, root: str | Path, size: int, min_size: int = 8, verbose: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (or is not a folder)")
        if size < 1:
            raise ValueError(f"image size must be a positive number of pixels, got {size}")
        self.size = size
        self.verbose = verbose
        captions = self._read_metadata()
        self.files: list[Path] = []
        self.captions: list[str] = []
        self.skipped: list[tuple[str, str]] = []  # (path, reason); grows if a file breaks after the scan
        self._broken: set[int] = set()  # indices that failed in __getitem__ (this process)
        candidates = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        for path in candidates:
            problem = self._check(path, min_size)
            if problem:
                self.skipped.append((str(path), problem))
                continue
            self.files.append(path)
            rel = path.relative_to(self.root).as_posix()
            caption = captions.get(rel)
            if caption is None:
                txt = path.with_suffix(".txt")
                caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
            self.captions.append(caption)
        if verbose and self.skipped:
            print(f"skipped {len(self.skipped)} unreadable or tiny image(s) in {self.root}:", file=sys.stderr)
            for name, why in self.skipped[:20]:
                print(f"  {name}: {why}", file=sys.stderr)
            if len(self.skipped) > 20:
                print(f"  ... and {len(self.skipped) - 20} more (see .skipped)", file=sys.stderr)
        if not self.files:
            found = f"{len(self.skipped)} image file(s), none usable" if self.skipped else "no image files"
            raise ValueError(
                f"no usable images in {self.root}: found {found} "
                f"(looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))}; min_size={min_size})"
            )

    def _read_metadata(self) -> dict[str, str]:
        """Captions by path relative to ``root`` from every metadata.jsonl; deeper files override."""
        out: dict[str, str] = {}
        metas = sorted(self.root.rglob(METADATA_NAME), key=lambda p: (len(p.parts), p))
        for path in (p for p in metas if p.is_file()):
            text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: tolerate a BOM
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
                    if self.verbose:
                        print(f"{path}:{n}: ignored ({problem})", file=sys.stderr)
                    continue
                key = (path.parent / row["file_name"]).relative_to(self.root).as_posix()
                if row.get("text") is not None:  # a line without text leaves the .txt fallback
                    out[key] = str(row["text"])
        return out

    @staticmethod
    def _check(path: Path, min_size: int) -> str | None:
        """Why ``path`` is unusable (decode, size or mode conversion fails), or None if it is fine."""
        try:
            with Image.open(path) as im:
                im.load()
                if min(im.size) < min_size:
                    return f"too small ({im.size[0]}x{im.size[1]}, min_size={min_size})"
                to_rgb(im)
        except Exception as e:  # noqa: BLE001 -- PIL raises many kinds of error for damaged files
            return f"{type(e).__name__}: {e}"
        return None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        # A file that broke after the scan: report it once, serve the next good index (wrapping), so
        # an epoch never dies on it and the same index always gives the same item.
        for i in (j % n for j in range(index, index + n)):
            if i in self._broken:
                continue
            try:
                image = load_image(self.files[i], self.size)
            except Exception as e:  # noqa: BLE001 -- deleted, truncated, replaced by garbage, ...
                self._broken.add(i)
                reason = f"failed after the scan: {type(e).__name__}: {e}"
                self.skipped.append((str(self.files[i]), reason))
                print(f"{self.files[i]}: {reason}; serving the next good image instead", file=sys.stderr)
                continue
            return {"image": image_to_tensor(image), "caption": self.captions[i], "scene": None}
        raise RuntimeError(f"none of the {n} images in {self.root} can be read any more; see .skipped")
