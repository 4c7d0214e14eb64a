"""Configs: dataclass defaults, then a named preset, then a TOML file, then command-line overrides.

Each command's config is a dataclass (fields commented where they are defined); nested dataclasses
are TOML tables (``[text_encoder]``). Overrides are dotted keys (``text_encoder.kind=pretrained``).
Any key that the dataclass does not have is an error that names it and lists the valid ones, any
value that does not fit the field's annotation (``steps = "abc"`` for ``steps: int``) an error that names
the key, the value and the type, and any value outside the range its class declares (``BOUNDS``, a plain
class attribute: field -> ``Bound``; a subclass adds to its bases') an error that names the key, the value
and what is allowed: at every layer, before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import operator
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

import tomllib

from latentdiff.io import check_writable

T = TypeVar("T")


@dataclass(frozen=True)
class Bound:
    """What a value must be beyond its type: within [lo, hi] (either end open, either missing), one of
    ``choices``; a bounded number is also finite unless ``finite`` is False (never NaN). A list or tuple is
    checked element by element."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    finite: bool = True

    def allows(self, value) -> bool:
        if isinstance(value, (list, tuple)):
            return all(self.allows(v) for v in value)
        if value is None:
            return True
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # the type check speaks for values of the wrong type
        if math.isnan(value) or (self.finite and math.isinf(value)):
            return False
        return not ((self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo))
                    or (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)))

    def __str__(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}" + ("" if self.finite else " (inf allowed)")
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "a finite number"


def at_least(lo: float) -> Bound:
    return Bound(lo=lo)


def above(lo: float) -> Bound:
    return Bound(lo=lo, lo_open=True)


def between(lo: float, hi: float, *, hi_open: bool = False) -> Bound:
    return Bound(lo=lo, hi=hi, hi_open=hi_open)


def one_of(*choices) -> Bound:
    return Bound(choices=choices)


FINITE = Bound()  # any finite number
FRACTION = between(0, 1)  # a probability or a share
COUNT = at_least(1)  # steps, images, batch sizes, intervals that may not be 0
IMAGE_SIDE = between(8, 16384)  # pixels of a training or evaluation image side


def bounds(table: Mapping[str, Bound]) -> Mapping[str, Bound]:
    """A config class's ``BOUNDS``: field -> Bound, read only."""
    return types.MappingProxyType(dict(table))


def bounds_of(cls) -> dict[str, Bound]:
    """The ``BOUNDS`` a config class and its bases declare (a subclass's entries win)."""
    out: dict[str, Bound] = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("BOUNDS", {}))
    return out


def check_bounds(table: Mapping[str, Bound], values: dict[str, Any], where: str) -> None:
    """Refuse the first value of ``values`` outside its bound, naming the key, the value and what is allowed."""
    for key, value in values.items():
        bound = table.get(key)
        if bound is not None and not bound.allows(value):
            raise ValueError(f"{where}: {key} = {value!r} is not allowed: {key} must be {bound}")


def _hints(cls) -> dict[str, Any]:
    """The resolved annotations of a dataclass's fields (``from __future__ import annotations`` makes them text)."""
    return typing.get_type_hints(cls)


def _optional(hint) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = tuple(a for a in typing.get_args(hint) if a is not type(None))
        if len(args) < len(typing.get_args(hint)):
            return functools.reduce(operator.or_, args), True
    return hint, False


def _nested_types(cls) -> dict[str, type]:
    """Fields of ``cls`` annotated with a dataclass (or one | None): TOML tables."""
    out = {}
    for name, hint in _hints(cls).items():
        inner, _ = _optional(hint)
        if dataclasses.is_dataclass(inner) and isinstance(inner, type):
            out[name] = inner
    return out


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _coerce(hint, value, key: str, where: str):
    """``value`` checked against the annotation ``hint`` (ints pass as floats, lists as tuples); a ValueError
    naming the key, the value and the expected type if it does not fit. Types it cannot check pass unchanged."""

    def bad():
        return ValueError(f"{where}: {key} = {value!r} is not a valid {_type_name(hint)} "
                          f"(got {type(value).__name__})")

    inner, optional = _optional(hint)
    if value is None:
        if optional or hint is Any:
            return None
        raise bad()
    hint = inner
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
    elif hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and isinstance(value, float)):
            raise bad()
        if hint is float and math.isnan(value):
            raise ValueError(f"{where}: {key} = nan is not a number")
        return hint(value)
    elif hint is str:
        if not isinstance(value, str):
            raise bad()
    elif hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        fixed = origin is tuple and args[1:] != (...,)  # tuple[int, int]: one type per position
        if fixed and len(args) != len(value):
            raise bad()
        if args:
            value = [_coerce(args[i] if fixed else args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(value) if tuple in (hint, origin) else list(value)
    elif hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad()
        if args:
            return {k: _coerce(args[1], v, f"{key}.{k}", where) for k, v in value.items()}
    elif origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(option, value, key, where)
            except ValueError:
                pass
        raise bad()
    return value


def _check_keys(cls, data: dict, where: str) -> None:
    """Refuse keys ``cls`` does not have, values that do not fit their annotations and values out of bounds."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table of keys (a JSON object, a TOML table), got "  # noqa: TRY004
                         f"{type(data).__name__} {data!r:.60}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    nested, hints, table = _nested_types(cls), _hints(cls), bounds_of(cls)
    for name, value in data.items():
        if name in nested and value is not None:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {name} must be a table of keys, got {value!r}")
            _check_keys(nested[name], value, f"{where} [{name}]")
        elif name not in nested:
            check_bounds(table, {name: _coerce(hints[name], value, name, where)}, where)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build a (possibly nested) config dataclass from a dict, refusing unknown keys and ill-typed values."""
    _check_keys(cls, data, where)
    nested, hints = _nested_types(cls), _hints(cls)
    kwargs = {}
    for name, v in data.items():
        if name in nested and v is not None:
            v = from_dict(nested[name], v, f"{where} [{name}]")
        elif name not in nested:
            v = _coerce(hints[name], v, name, where)
        kwargs[name] = v
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
    """A command's ``--preset`` (when it has presets), ``--config FILE.toml`` and ``--set KEY=VALUE``, its keys and
    defaults in the help."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "config keys (for --config and --set), with their defaults:\n" + "\n".join(
        f"  {k} = {v!r}" for k, v in dataclasses.asdict(cls()).items())
    if presets:
        p.add_argument("--preset", default=None, help=f"named preset ({', '.join(sorted(presets))})")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="TOML file of config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (dotted for tables, e.g. text_encoder.kind=pretrained); repeatable")


def add_options(p: argparse.ArgumentParser, cls, specs: dict[str, str | dict], show_defaults: bool = False) -> None:
    """One flag per config key in ``specs`` (key -> help, or argparse keywords as ``_opt`` takes them); the type
    comes from the annotation, bools are switches. Unset flags stay None, so config files and presets show."""
    hints, defaults = typing.get_type_hints(cls), {f.name: f.default for f in dataclasses.fields(cls)}
    to_config = {}
    for name, spec in specs.items():
        kw = {"help": spec} if isinstance(spec, str) else dict(spec)
        flags, to_config[name] = kw.pop("flags", (f"--{name.replace('_', '-')}",)), kw.pop("to_config", None)
        kind = typing.get_args(hints[name])[0] if typing.get_origin(hints[name]) else hints[name]  # X | None -> X
        if kind is bool:  # a switch: sets True, or ``const`` (False for a --no-... flag of a default-on setting)
            kw.update(action="store_const", const=kw.get("const", True))
        elif not ({"action", "choices", "type"} & set(kw)) and to_config[name] is None:
            kw["type"] = kind
        default = defaults[name]
        if show_defaults and default is not None and not isinstance(default, bool) and default not in ("", ()):
            kw["help"] += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
        p.add_argument(*flags, dest=name, default=None, **kw)
    p.set_defaults(options=to_config)


def config_from_args(cls: type[T], presets: dict[str, dict], args: argparse.Namespace,
                     shortcuts: dict | None = None) -> T:
    """defaults <- --preset <- --config <- --set <- the command's own flags (``add_options``, and ``shortcuts``:
    key -> value, None when the flag was not given)."""
    overrides = dict(parse_override(o) for o in args.overrides)
    for name, to_config in getattr(args, "options", {}).items():
        value = getattr(args, name)
        if value is not None:
            overrides.update(to_config(value) if to_config else {name: value})
    overrides.update({k: v for k, v in (shortcuts or {}).items() if v is not None})
    cfg = build_config(cls, presets, getattr(args, "preset", None), args.config, overrides)
    check_outputs(cfg)
    return cfg


def check_outputs(cfg) -> None:
    """Refuse, before any work, output paths that cannot be written: the fields its class names in ``OUTPUTS``
    (default: ``out``, where it has one); a dry run writes nothing and is not checked."""
    if getattr(cfg, "dry_run", False):
        return
    for name in getattr(type(cfg), "OUTPUTS", ("out",)):
        if getattr(cfg, name, None):
            check_writable(getattr(cfg, name), f"{name} path")
