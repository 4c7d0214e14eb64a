"""Configs (presets, TOML, overrides, unknown keys) and files (atomic writes, strict loads)."""

import json
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from latentdiff.config import build_config, parse_override
from latentdiff.io import (
    atomic_folder,
    atomic_path,
    load_state_strict,
    read_config,
    read_weights,
    save_component,
    write_json,
)
from latentdiff.types import Cond


@dataclass
class Inner:
    kind: str = "a"  # which
    dim: int = 4  # size


@dataclass
class Outer:
    steps: int = 10  # steps
    lr: float = 1e-3  # rate
    names: tuple = ("x",)  # names
    inner: Inner = field(default_factory=Inner)  # a table


def test_layers_apply_in_order(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 20\nnames = ["p", "q"]\n[inner]\nkind = "b"\n')
    cfg = build_config(Outer, {"fast": {"steps": 5, "lr": 0.5}}, "fast", toml, {"inner.dim": 8})
    assert cfg == Outer(steps=20, lr=0.5, names=("p", "q"), inner=Inner(kind="b", dim=8))


@pytest.mark.parametrize("where", ["preset", "toml", "override"])
def test_unknown_key_is_named(tmp_path, where):
    toml = tmp_path / "c.toml"
    toml.write_text("stepz = 3\n" if where == "toml" else "")
    presets = {"p": {"stepz": 1} if where == "preset" else {}}
    overrides = {"inner.dimm": 3} if where == "override" else {}
    with pytest.raises(ValueError, match="unknown key.*(stepz|dimm).*valid keys"):
        build_config(Outer, presets, "p", toml, overrides)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets: fast"):
        build_config(Outer, {"fast": {}}, "nope", None, {})


@dataclass
class Typed:
    steps: int = 10  # an int
    lr: float = 1e-3  # a float
    flag: bool = False  # a bool
    name: str = "a"  # a string
    size: tuple[int, int] = (1, 2)  # exactly two ints
    names: tuple = ("x",)  # any sequence, kept as a tuple
    maybe: str | None = None  # a string or nothing
    inner: Inner = field(default_factory=Inner)  # a table


@pytest.mark.parametrize("key, value, expected", [
    ("steps", "abc", "steps = 'abc' is not a valid int"),
    ("steps", 2.5, "steps = 2.5 is not a valid int"),
    ("steps", True, "steps = True is not a valid int"),
    ("lr", "fast", "lr = 'fast' is not a valid float"),
    ("flag", 1, "flag = 1 is not a valid bool"),
    ("name", 3, "name = 3 is not a valid str"),
    ("size", [1, 2, 3], r"size = \[1, 2, 3\] is not a valid tuple\[int, int\]"),
    ("size", [1, "b"], r"size\[1\] = 'b' is not a valid int"),
    ("maybe", 5, "maybe = 5 is not a valid str"),
    ("inner.dim", "x", r"\[inner\]: dim = 'x' is not a valid int"),
])
def test_set_values_are_checked_against_the_annotations(key, value, expected):
    """A value of the wrong type is refused up front, naming the key, the value and the expected type."""
    with pytest.raises(ValueError, match=f"command-line overrides.*{expected}"):
        build_config(Typed, {}, None, None, {key: value})


def test_values_that_fit_are_kept_or_widened(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 1\nsize = [3, 4]\nnames = ["p"]\n')
    cfg = build_config(Typed, {}, None, toml, {"maybe": "x", "steps": 7})
    assert cfg == Typed(steps=7, lr=1.0, size=(3, 4), names=("p",), maybe="x")
    assert isinstance(cfg.lr, float) and isinstance(cfg.size, tuple)
    toml.write_text('steps = "many"\n')
    with pytest.raises(ValueError, match=r"c.toml: steps = 'many' is not a valid int \(got str\)"):
        build_config(Typed, {}, None, toml, {})
    with pytest.raises(ValueError, match="preset 'p': flag = 'yes' is not a valid bool"):
        build_config(Typed, {"p": {"flag": "yes"}}, "p", None, {})


def test_cli_set_with_a_wrong_type_is_refused_before_any_work(tmp_path, capsys):
    from latentdiff.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--cache", str(tmp_path / "no-cache"), "--out", str(tmp_path / "run"), "--set", "steps=abc"])
    assert e.value.code == 2
    assert "steps = 'abc' is not a valid int (got str)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_parse_override_reads_toml_literals():
    assert parse_override("steps=5") == ("steps", 5)
    assert parse_override("lr=1e-4") == ("lr", 1e-4)
    assert parse_override("flag=true") == ("flag", True)
    assert parse_override("name=hello") == ("name", "hello")
    with pytest.raises(ValueError, match="key=value"):
        parse_override("steps")


def test_atomic_path_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_folder_swaps_whole_folder(tmp_path):
    folder = tmp_path / "model"
    with atomic_folder(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyError), atomic_folder(folder) as tmp:
        (tmp / "a").write_text("2")
        raise KeyError("crash")
    assert (folder / "a").read_text() == "1"
    with atomic_folder(folder) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in folder.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_a_plain_write_gives(tmp_path, umask):
    """Files 0666 and folders 0777 less the umask, as open() and mkdir() give; a replaced file keeps its mode."""
    import os
    import stat

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("x")
        with atomic_folder(tmp_path / "folder") as tmp:
            (tmp / "b").write_text("1")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "a.json") == mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(tmp_path / "folder") == mode(tmp_path / "plain") == 0o777 & ~umask
    os.chmod(tmp_path / "a.json", 0o640)
    write_json(tmp_path / "a.json", {"a": 2})
    assert mode(tmp_path / "a.json") == 0o640 and json.loads((tmp_path / "a.json").read_text()) == {"a": 2}


def test_progress_lines_are_plain_lines_off_a_terminal(capsys):
    from latentdiff.io import end_progress, progress_line

    progress_line("step 1/2")
    progress_line("step 2/2")
    end_progress()
    assert capsys.readouterr().err == "step 1/2\nstep 2/2\n"  # no carriage returns in a log file


def test_strict_load_refuses_partial_and_reports(tmp_path):
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    save_component(tmp_path / "c", src, {"type": "Linear"})
    report = load_state_strict(dst, read_weights(tmp_path / "c"), "linear")
    assert report.ok and report.matched == 2
    assert torch.equal(dst.weight, src.weight)
    with pytest.raises(ValueError, match="missing 1.*bias"):
        load_state_strict(nn.Linear(3, 2), {"weight": src.weight.detach()}, "linear")
    with pytest.raises(ValueError, match="unused 1.*extra"):
        load_state_strict(nn.Linear(3, 2), {**src.state_dict(), "extra": torch.zeros(1)}, "linear")
    with pytest.raises(ValueError, match="wrong shape"):
        load_state_strict(nn.Linear(3, 4), src.state_dict(), "linear")


def test_corrupt_component_files_give_clear_errors(tmp_path):
    save_component(tmp_path / "c", nn.Linear(3, 2), {"type": "Linear"})
    (tmp_path / "c" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_weights(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_config(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="not a latentdiff component folder"):
        read_config(tmp_path / "missing")
    # Each error names the file, so the user knows which one to replace.
    for read, name in ((read_weights, "model.safetensors"), (read_config, "config.json")):
        with pytest.raises(ValueError) as e:
            read(tmp_path / "c")
        assert str(tmp_path / "c" / name) in str(e.value)


def test_cond_cat_map_repeat():
    a = Cond(context=torch.ones(2, 3, 4), context_mask=torch.ones(2, 3, dtype=torch.bool), vector=torch.ones(2, 5))
    b = Cond(context=torch.zeros(1, 3, 4), context_mask=torch.zeros(1, 3, dtype=torch.bool), vector=torch.zeros(1, 5))
    c = a.cat(b)
    assert c.context.shape == (3, 3, 4) and c.vector[2].sum() == 0 and c.concat is None
    assert a.repeat(2).context.shape == (4, 3, 4)
    with pytest.raises(ValueError, match="only one of them"):
        a.cat(Cond(context=torch.zeros(1, 3, 4)))
    with pytest.raises(ValueError, match="pad both"):
        a.cat(Cond(context=torch.zeros(1, 2, 4), context_mask=torch.zeros(1, 2, dtype=torch.bool),
                   vector=torch.zeros(1, 5)))
