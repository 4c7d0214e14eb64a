"""Evaluate against any folder of images: cached reference features from a folder, samples from a folder.

Size policy, stated once: the evaluation size is one square side ``S`` (the generated images' own size, or
the model's). Reference images of any size and aspect are resized (Lanczos) to cover ``S x S`` and
centre-cropped, the way the training data is prepared (``data.folder.resize_center_crop``). Generated
images are never resized: a folder of samples must hold images of exactly ``S x S``, or it is an error
that names the odd files, because resizing generated images would change what the metrics measure.

Reference features are cached under ``cache_dir`` keyed by the extractor (network + weights digest), the
evaluation size and a fingerprint of the folder's contents (every image file's relative path, byte size
and modification time), written atomically; a changed, added or removed file gives a new key, and the
stale entry of the same folder and size is removed when the new one is written.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from latentdiff.data.folder import find_caption, image_to_tensor, list_images, load_image, read_metadata
from latentdiff.eval.features import FeatureExtractor, cached_features, feature_cache_path

RESIZE_POLICY = "reference: Lanczos resize to cover SxS + centre crop; samples: must be SxS (never resized)"
METRICS = ("fid", "kid", "pr")  # the distribution metrics a folder evaluation can compute


def image_files(folder: str | Path, what: str) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted), or an error that says what was expected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist (or is not a folder)")
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images in the {what} folder {folder} (looked recursively for .png, .jpg, .webp, ...)")
    return files


def fingerprint(folder: str | Path, files: list[Path]) -> str:
    """A digest of the folder's contents: each file's relative path, size in bytes and mtime (ns)."""
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(folder).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def required_counts(metrics: tuple, dim: int, pr_k: int) -> dict[str, int]:
    """Images each metric needs per set: FID D + 1 (a full-rank covariance), KID 2, precision/recall k + 1."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {tuple(metrics)}")
    need = {"fid": dim + 1, "kid": 2, "pr": pr_k + 1}
    return {m: need[m] for m in metrics}


def check_counts(counts: dict[str, int], metrics: tuple, extractor: FeatureExtractor, pr_k: int,
                 selectable: bool = True) -> None:
    """Refuse sets too small for a metric, before any feature is computed; say how many are needed.

    ``selectable``: the caller honours ``metrics``, so the error may suggest the metrics these counts allow.
    """
    need = required_counts(metrics, extractor.dim, pr_k)
    names = {"fid": f"FID with {extractor.dim}-d {extractor.name} features", "kid": "KID",
             "pr": f"precision/recall (k={pr_k})"}
    short = [f"{names[m]} needs at least {n} {label} images, got {counts[label]}"
             for m, n in need.items() for label in counts if counts[label] < n]
    if short:
        possible = [m for m, n in need.items() if all(c >= n for c in counts.values())]
        hint = (f"; with these counts only {possible} can be computed (--set metrics={possible!r})"
                if possible and selectable else "; add images (or use a smaller feature extractor)")
        raise ValueError("too few images: " + "; ".join(short) + hint)


def sample_size(files: list[Path], size: int = 0) -> int:
    """The one square size every generated image has (``size`` if given), or an error naming the odd ones."""
    by_size: dict[tuple[int, int], list[str]] = {}
    for path in files:
        with Image.open(path) as im:  # reads the header only
            by_size.setdefault(im.size, []).append(path.name)
    want = (size, size) if size else None
    if want is None and len(by_size) == 1:
        want = next(iter(by_size))
    if want is not None and set(by_size) == {want} and want[0] == want[1]:
        return want[0]
    found = "; ".join(f"{len(v)} at {w}x{h} ({', '.join(v[:3])}{' ...' if len(v) > 3 else ''})"
                      for (w, h), v in sorted(by_size.items(), key=lambda kv: -len(kv[1])))
    target = f"{want[0]}x{want[1]}" if want else "one square size"
    raise ValueError(f"generated images must all be {target} (they are never resized: that would change what is "
                     f"measured); found {found}. Generate at one size, or set image_size to the size they have")


def image_batches(files: list[Path], size: int | None, batch_size: int, log=None) -> Iterator[Tensor]:
    """Images (B, 3, S, S) in [-1, 1], a batch at a time; ``size`` None keeps them as they are.

    A file that cannot be decoded is skipped and named (on ``log``), never silently counted.
    """
    batch: list[Tensor] = []
    for path in files:
        try:
            batch.append(image_to_tensor(load_image(path, size)))
        except Exception as e:  # noqa: BLE001 -- PIL raises many kinds of error for damaged files
            (log or _stderr)(f"skipped {path}: {type(e).__name__}: {e}")
            continue
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def reference_features(extractor: FeatureExtractor, folder: str | Path, size: int, cache_dir: str | Path | None,
                       batch_size: int = 64, log=None) -> tuple:
    """Features of a reference folder at ``size`` (cached), and whether the cache served them.

    Returns ``(features (N, D), cache_hit)``.
    """
    log = log or _stderr
    folder = Path(folder)
    files = image_files(folder, "reference")
    where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    key = f"folder-{where}-{fingerprint(folder, files)}-s{size}"
    path = feature_cache_path(extractor, key, cache_dir)
    hit = path is not None and path.is_file()
    feats = cached_features(extractor, key, lambda: image_batches(files, size, batch_size, log=log), cache_dir,
                            batch_size)
    if path is not None and not hit:  # the same folder and size under an older fingerprint is stale now
        for stale in path.parent.glob(f"{extractor.name}--folder-{where}-*-s{size}.safetensors"):
            if stale != path:
                stale.unlink(missing_ok=True)
    log(f"reference {folder}: {len(feats)} images at {size}x{size}, {extractor.name} features "
        f"{'read from the cache' if hit else 'computed'} ({path or 'not cached'})")
    return feats, hit


def folder_prompts(folder: str | Path, n: int) -> tuple[list[str], list[str] | None]:
    """``n`` prompts from a folder's captions (metadata.jsonl or .txt; "" where none), cycled in file order,
    and the same items' class names (their subfolder, as with class folders; None if any image sits at the top)."""
    folder = Path(folder)
    files = image_files(folder, "reference")
    metadata = read_metadata(folder, verbose=False)
    captions = [find_caption(folder, p, metadata) or "" for p in files]
    parts = [p.relative_to(folder).parts for p in files]
    classes = None if any(len(q) == 1 for q in parts) else [q[0] for q in parts]
    pick = [i % len(files) for i in range(n)]
    return [captions[i] for i in pick], None if classes is None else [classes[i] for i in pick]
