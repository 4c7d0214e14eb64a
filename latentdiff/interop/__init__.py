"""Pretrained checkpoints: diffusers folders, single-file original SD checkpoints, explicit key maps.

``open_model(path)`` routes a path to the right reader and returns an ``SDModel`` (components, spec,
model index with the detected family and scheduler hint, load reports); ``latentdiff.load`` turns it
into a Pipeline.
"""

from __future__ import annotations

from pathlib import Path

from latentdiff.interop.common import SamplerHint, SDModel, save_latentdiff
from latentdiff.interop.diffusers_folder import is_diffusers_folder, read_diffusers
from latentdiff.interop.files import SAFETENSORS, TORCH_FILES
from latentdiff.interop.single_file import UnsupportedCheckpoint, detect_family, read_single_file

__all__ = ["SDModel", "SamplerHint", "UnsupportedCheckpoint", "detect_family", "is_diffusers_folder",
           "open_model", "read_diffusers", "read_single_file", "save_latentdiff"]


def open_model(path: str | Path, *, tokenizer: str | Path | None = None, **kw) -> SDModel:
    """A diffusers folder or a single-file checkpoint -> SDModel (our own folders load through components)."""
    path = Path(path)
    if path.is_file() or path.suffix.lower() in SAFETENSORS + TORCH_FILES:
        return read_single_file(path, tokenizer=tokenizer, **kw)
    if is_diffusers_folder(path):
        return read_diffusers(path, **kw)
    raise ValueError(f"{path} is neither a single-file checkpoint nor a diffusers folder (model_index.json "
                     "with _class_name)")
