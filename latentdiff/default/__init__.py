"""The bundled default model: a text-to-image shapes model shipped inside the package as fp16 safetensors + JSON.

``latentdiff.load()`` / ``load("default")`` and ``latentdiff generate`` without ``--model`` open it. The folder
is checked against its manifest (size and SHA-256 of every file) before loading, so a broken install is named
and never silently replaced by random weights. ``python -m latentdiff.default.build MODEL_FOLDER`` writes it
from a trained model folder (the model card, ``README.md`` here, has the commands).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from latentdiff.io import read_json

FOLDER = Path(__file__).parent / "model"  # the model folder (model_index.json, autoencoder/, denoiser/, ...)
MANIFEST = "manifest.json"  # {relative path: {"bytes": n, "sha256": hex}} for every other file in FOLDER
REINSTALL = "reinstall latentdiff (`pip install --force-reinstall latentdiff`, or `pip install -e .` in a checkout)"


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(folder: str | os.PathLike = FOLDER) -> Path:
    """The bundled model folder after checking every file against the manifest; a clear error otherwise."""
    folder = Path(folder)
    try:
        manifest = read_json(folder / MANIFEST, "the bundled default model is missing")
    except (OSError, ValueError) as e:
        raise type(e)(f"{e}; {REINSTALL}") from e
    for name, want in sorted(manifest.items()):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"the bundled default model is incomplete: {path} is missing; {REINSTALL}")
        if path.stat().st_size != want["bytes"] or sha256(path) != want["sha256"]:
            raise ValueError(f"the bundled default model is corrupted: {path} does not match its manifest "
                             f"(expected {want['bytes']} bytes, SHA-256 {want['sha256'][:12]}...); {REINSTALL}")
    return folder


def write_manifest(folder: str | os.PathLike) -> dict:
    """Write the manifest of every file under ``folder`` (but itself) and return it."""
    folder = Path(folder)
    manifest = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest
