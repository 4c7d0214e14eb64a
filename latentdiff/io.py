"""Files on disk: atomic writes, component folders (config.json + model.safetensors), strict loads; progress lines.

Every write goes to a temporary name in the same folder, is flushed to disk (fsync) and then
renamed over the target, so a crash at any moment leaves either the old file or the new one.
Folders are written the same way: built under a temporary name, then swapped in.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse, before any work, an output path that cannot be written: a part of it is a file, or the folder it
    goes in (or the nearest one that exists) is read-only or not writable by us. Disk space is not foreseen."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise NotADirectoryError(f"cannot write the {what} {path}: {probe} is a file, not a folder; choose another "
                                 "path")
    folder = probe if probe != path or path.is_dir() else path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1)
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise PermissionError(f"cannot write the {what} {path}: {folder} {why}; write somewhere else")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path, create) -> Path:
    """A new name beside ``path``, made with ``create(name)`` (which raises FileExistsError if it is taken); an
    error of the file system (read-only, full, no permission) names ``path``, the file the caller writes."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise type(e)(e.errno, e.strerror, str(path)) from e


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    The file gets the permissions a plain ``open(path, "w")`` would give: the mode of the file it
    replaces, else 0666 less the umask (``tempfile.mkstemp`` would make every file 0600), also when the writer
    replaces the temporary file with one of its own (safetensors writes 0600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)))
    if path.exists():
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield Path(tmp)
        if stat.S_IMODE(tmp.stat().st_mode) != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if e.errno is not None and e.filename is not None and Path(os.fsdecode(e.filename)) == tmp:
            raise type(e)(e.errno, e.strerror, str(path)) from e  # (disk full, ...) name the file being written
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def progress_line(text: str) -> None:
    """A progress report on stderr: redrawn in place on a terminal, one plain line per call otherwise (logs)."""
    if sys.stderr.isatty():
        print(f"\r{text}", end="", file=sys.stderr, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


def end_progress() -> None:
    """End a run of ``progress_line`` reports (a newline after the last one redrawn on a terminal)."""
    if sys.stderr.isatty():
        print(file=sys.stderr)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (tensors are made contiguous CPU copies)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as e:  # safetensors' own error type wraps the operating system's (disk full, ...)
            raise OSError(f"could not write {path}: {e}") from e


@contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Build a folder under a temporary name, then swap it in for ``folder`` (mode 0777 less the umask, as ``mkdir``
    gives): ``folder`` -> ``.folder.old``, the new one -> ``folder``, ``.folder.old`` removed. A process killed
    between the two renames leaves ``.folder.old`` whole; the next swap of ``folder`` (or ``recover_swaps``) puts
    it back first."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    old = folder.with_name(f".{folder.name}.old")
    if old.exists() and not folder.exists():
        os.replace(old, folder)
    tmp = _temporary_name(folder, lambda p: os.mkdir(p, 0o777))
    try:
        yield tmp
        _fsync_dir(tmp)
        replaced = folder.exists()
        if replaced:
            if old.exists():
                _remove_folder(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
        if replaced:
            _remove_folder(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _remove_folder(folder: Path) -> None:
    """Rename, then delete: a process killed while deleting leaves a ``.tmp`` leftover, never half a folder under a
    name that ``recover_swaps`` would take for a whole one."""
    doomed = folder.with_name(f".{folder.name.lstrip('.')}.{secrets.token_hex(4)}.tmp")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


_SWAP_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")  # _temporary_name's names
_SWAP_OLD = re.compile(r"^\.(?P<name>.+)\.old$")  # atomic_folder's copy of the folder it replaces


def recover_swaps(folder: str | os.PathLike) -> list[str]:
    """Undo what a process killed inside ``atomic_path`` / ``atomic_folder`` left in ``folder``; return what was done.

    Killed between the two renames of a folder swap, ``NAME`` is gone and ``.NAME.old`` (the intact previous
    version) is renamed back; any other ``.NAME.old`` and every ``.NAME.XXXXXXXX.tmp`` (a write that never
    finished, or never got swapped in) is removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for entry in sorted(folder.iterdir()):
        old, tmp = _SWAP_OLD.match(entry.name), _SWAP_TEMPORARY.match(entry.name)
        if old and not (folder / old["name"]).exists():
            os.replace(entry, folder / old["name"])
            done.append(f"restored {folder / old['name']} from {entry.name} (a replacement was interrupted)")
        elif old or tmp:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            done.append(f"removed {entry} (left by an interrupted write)")
    return done


@dataclass
class LoadReport:
    """What a strict load matched, and what it found missing, unused or of the wrong shape."""

    name: str
    matched: int = 0
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unused or self.mismatched)

    def __str__(self) -> str:
        def few(keys):
            return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

        parts = [f"{self.name}: {self.matched} tensors matched"]
        if self.missing:
            parts.append(f"missing {len(self.missing)} [{few(self.missing)}]")
        if self.unused:
            parts.append(f"unused {len(self.unused)} [{few(self.unused)}]")
        if self.mismatched:
            parts.append(f"wrong shape {len(self.mismatched)} [{few(self.mismatched)}]")
        return "; ".join(parts)


def load_state_strict(module: nn.Module, state: dict[str, Tensor], name: str, assign: bool = False) -> LoadReport:
    """Load ``state`` into ``module``, refusing any missing, unused or mis-shaped tensor, and any holding NaN or inf
    (weights of a diverged run or a damaged file would only ever draw garbage).

    ``assign=True`` makes the module's parameters the given tensors (for a module built on the meta
    device: no second copy of the weights is ever allocated).
    """
    own = module.state_dict()
    report = LoadReport(name)
    for k, v in state.items():
        if k not in own:
            report.unused.append(k)
        elif own[k].shape != v.shape:
            report.mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            report.matched += 1
    report.missing = sorted(set(own) - set(state))
    if not report.ok:
        raise ValueError(f"refusing a partial load: {report}")
    damaged = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if damaged:
        raise ValueError(f"refusing {name}: {len(damaged)} tensor(s) hold NaN or inf values ({', '.join(damaged[:3])}"
                         f"{', ...' if len(damaged) > 3 else ''}); the weights are damaged (a training run that "
                         "diverged, or a corrupt file): load an earlier checkpoint or export the model again")
    module.load_state_dict(state, strict=True, assign=assign)
    return report


def save_component(folder: str | os.PathLike, module: nn.Module, config: dict) -> None:
    """Write one component: ``config.json`` and ``model.safetensors`` (weights may be empty)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    if state:
        write_safetensors(folder / WEIGHTS_NAME, state)
    write_json(folder / CONFIG_NAME, config)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON line to a log (metrics, eval and judge rows), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_json(path: str | os.PathLike, missing: str) -> dict:
    """Read a JSON object from a file; a missing file raises with ``missing`` (what it means), a corrupt one or one
    that holds something else than an object (a list, a number) says so."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {missing}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object of keys; the file is damaged or "  # noqa: TRY004
                         "not the one expected")
    return data


@contextmanager
def reading(path: str | os.PathLike, fix: str = "rebuild it, or restore it from a copy"):
    """Around code that takes a file's contents apart: a file of the wrong shape (a list where an object belongs,
    a missing key, a string where a number belongs) raises one ValueError that names it, not a KeyError."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{path} does not have the expected layout ({detail}): the file is damaged or was "
                         f"written by something else; {fix}") from e


def reads_file(param: str = "where", fix: str = "rebuild it, or restore it from a copy"):
    """Decorate a function that takes a file's contents apart, its argument ``param`` naming the file: errors of a
    file of the wrong shape name it, as in ``reading``."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            with reading(call.arguments[param], fix):
                return fn(*args, **kwargs)

        return wrapped

    return decorate


def read_config(folder: str | os.PathLike) -> dict:
    """Read a component's config.json with an error that names the folder."""
    return read_json(Path(folder) / CONFIG_NAME, f"{folder} is not a latentdiff component folder")


def read_component_config(folder: str | os.PathLike, kind: str, what: str) -> dict:
    """The ``config`` object of a component's config.json (``{"type": kind, "config": {...}}``), or an error naming
    the file: another type of component (``what`` is what was expected), or no ``config`` object."""
    cfg = read_config(folder)
    if cfg.get("type") != kind:
        raise ValueError(f"{folder} holds a {cfg.get('type')!r}, not {what}")
    if not isinstance(cfg.get("config"), dict):
        raise ValueError(f"{Path(folder) / CONFIG_NAME}: 'config' must be an object of keys, got "  # noqa: TRY004
                         f"{cfg.get('config')!r:.60}; the file is damaged")
    return cfg["config"]


def read_weights(folder: str | os.PathLike) -> dict[str, Tensor]:
    """Read a component's weights (empty when the component has none)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.exists():
        return {}
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several error types for a damaged file
        raise ValueError(f"{path} could not be read ({e}); the file is corrupt or truncated") from e


def load_component_weights(module: nn.Module, folder: str | os.PathLike, name: str) -> LoadReport:
    """Strictly load a component's weights into ``module`` and return the report (an error names the file)."""
    state = read_weights(folder)
    try:
        return load_state_strict(module, state, name)
    except ValueError as e:
        raise ValueError(f"{Path(folder) / WEIGHTS_NAME}: {e}") from e


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Read a .ckpt/.pt/.bin file without executing pickled code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} needs arbitrary code execution to load (a pickle beyond plain tensors), which latentdiff "
            "refuses; convert it to .safetensors with a tool you trust"
        ) from e


def file_digest(path: str | os.PathLike, length: int = 10) -> str:
    """Short sha256 of a file: ties cached features to the exact weights that made them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]
