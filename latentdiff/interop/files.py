"""Reading weight files safely: safetensors, or pickle-free torch files; nothing else is executed.

``.safetensors`` is read with safetensors (a header plus raw tensors: no code can run). ``.ckpt``,
``.pt``, ``.pth`` and ``.bin`` go through ``torch.load(weights_only=True)``, which refuses any pickle
that would build something other than tensors and plain containers; such a file is refused with a
message naming the safer formats. A file that is neither is named as not a checkpoint.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from torch import Tensor

from latentdiff.io import safe_torch_load

SAFETENSORS = (".safetensors",)
TORCH_FILES = (".ckpt", ".pt", ".pth", ".bin")
SAFER = "convert it to .safetensors (or a diffusers folder) with a tool you trust, then load that"


def _looks_like_torch_file(path: Path) -> bool:
    """A torch.save file is a zip archive (since torch 1.6) or a raw pickle (first byte 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ... for damaged files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); it is truncated or damaged: "
                         "download or copy it again") from e


def read_torch_file(path: Path) -> dict[str, Tensor]:
    if not _looks_like_torch_file(path):
        raise ValueError(f"{path} is not a checkpoint (neither a safetensors file nor a torch.save archive)")
    try:
        obj = safe_torch_load(path)
    except ValueError as e:
        raise ValueError(f"{path} cannot be read without executing pickled code, which latentdiff refuses; "
                         f"{SAFER}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / CompVis training checkpoints nest the weights
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{path} holds no tensors")
    return state


def read_state_file(path: str | Path) -> dict[str, Tensor]:
    """All tensors of one weights file, by suffix; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS:
        return read_safetensors(path)
    if suffix in TORCH_FILES:
        return read_torch_file(path)
    raise ValueError(f"{path}: unknown weights format {suffix!r}; expected one of "
                     f"{', '.join(SAFETENSORS + TORCH_FILES)}")
