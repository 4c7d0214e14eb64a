"""Configs: dataclass defaults, then a named preset, then a TOML file, then command-line overrides.

Each command's config is a dataclass (fields commented where they are defined); nested dataclasses
are TOML tables (``[text_encoder]``). Overrides are dotted keys (``text_encoder.kind=pretrained``).
Any key that the dataclass does not have is an error that names it and lists the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import tomllib

T = TypeVar("T")


def _nested_types(cls) -> dict[str, type]:
    """Fields of ``cls`` whose default is itself a dataclass (TOML tables)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if dataclasses.is_dataclass(value):
                out[f.name] = type(value)
    return out


def _check_keys(cls, data: dict, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    for name, sub in _nested_types(cls).items():
        if name in data:
            if not isinstance(data[name], dict):
                raise ValueError(f"{where}: {name} must be a table of keys, got {data[name]!r}")
            _check_keys(sub, data[name], f"{where} [{name}]")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build a (possibly nested) config dataclass from a dict, refusing unknown keys."""
    _check_keys(cls, data, where)
    nested = _nested_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        if f.name in nested:
            v = from_dict(nested[f.name], v, f"{where} [{f.name}]")
        elif isinstance(v, list) and isinstance(f.default, tuple):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as a TOML literal when it is one (numbers, booleans, lists)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. steps=500)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _dotted_to_nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def build_config(cls: type[T], presets: dict[str, dict], preset: str | None, toml_path: str | Path | None,
                 overrides: dict[str, Any]) -> T:
    """Defaults <- preset <- TOML file <- overrides (dotted keys), checked at every layer."""
    data: dict = {}
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(presets))}")
        _check_keys(cls, presets[preset], f"preset {preset!r}")
        data = _merge(data, presets[preset])
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from e
        _check_keys(cls, loaded, str(path))
        data = _merge(data, loaded)
    if overrides:
        nested = _dotted_to_nested(overrides)
        _check_keys(cls, nested, "command-line overrides")
        data = _merge(data, nested)
    return from_dict(cls, data)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def add_config_args(p: argparse.ArgumentParser, presets: dict, cls) -> None:
    """A command's ``--preset``, ``--config FILE.toml`` and ``--set KEY=VALUE``, its keys and defaults in the help."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "config keys (for --config and --set), with their defaults:\n" + "\n".join(
        f"  {k} = {v!r}" for k, v in dataclasses.asdict(cls()).items())
    p.add_argument("--preset", default=None, help=f"named preset ({', '.join(sorted(presets))})")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="TOML file of config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (dotted for tables, e.g. text_encoder.kind=pretrained); repeatable")


def config_from_args(cls: type[T], presets: dict[str, dict], args: argparse.Namespace, shortcuts: dict) -> T:
    """The config of a command parsed with ``add_config_args``: ``build_config`` with its ``--set`` overrides and
    the command's own flags (``shortcuts``: key -> value, None when the flag was not given) on top."""
    overrides = dict(parse_override(o) for o in args.overrides)
    for key, value in shortcuts.items():
        if value is not None:
            overrides[key] = value
    return build_config(cls, presets, args.preset, args.config, overrides)
