"""Run several ``latentdiff.cli`` commands in one process (one start-up of torch), each with its own faults.

    python tests/_cli_batch.py CALLS.json   ->   stdout: JSON list of {"code", "stdout", "stderr"}

CALLS.json is a list of {"argv": [...], "env": {...}, "faults": [...]}. A fault makes the operating system's
answer for paths containing ``marker`` an error (``errno``: "EROFS", "ENOSPC", "EACCES", ...):
``{"on": "write", ...}`` creating or opening a file for writing, ``"read"`` opening one for reading, ``"list"``
listing a folder. ``{"on": "call", "target": "module:function", "error": "KeyError"}`` makes a function raise.
What we test this way is what the CLI makes of such errors: the machine it runs on need not be read-only or
full, and root (who may read anything) cannot make a file unreadable by chmod.
"""

import builtins
import contextlib
import errno
import importlib
import io
import json
import os
import sys
from unittest import mock


def _deny(fault: dict) -> OSError:
    code = getattr(errno, fault["errno"])
    return OSError(code, os.strerror(code))


def _patches(faults: list[dict]) -> list:
    real_open, real_os_open, real_scandir, real_mkdir = builtins.open, os.open, os.scandir, os.mkdir

    def hit(kind: str, path) -> dict | None:
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        return next((f for f in faults if f["on"] == kind and f["marker"] in text), None)

    def raise_for(fault: dict, path):
        e = _deny(fault)
        e.filename = os.fsdecode(path)
        raise e

    def fake_open(file, mode="r", *args, **kwargs):
        fault = hit("write" if any(c in mode for c in "wax+") else "read", file)
        if fault:
            raise_for(fault, file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
        fault = hit("write" if writing else "read", path)
        if fault:
            raise_for(fault, path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_scandir(path="."):
        fault = hit("list", path)
        if fault:
            raise_for(fault, path)
        return real_scandir(path)

    def fake_mkdir(path, *args, **kwargs):
        fault = hit("write", path)
        if fault:
            raise_for(fault, path)
        return real_mkdir(path, *args, **kwargs)

    patches = [mock.patch("builtins.open", fake_open), mock.patch("io.open", fake_open),
               mock.patch("os.open", fake_os_open), mock.patch("os.scandir", fake_scandir),
               mock.patch("os.mkdir", fake_mkdir)]
    for fault in faults:
        if fault["on"] == "call":
            module, name = fault["target"].split(":")
            error = getattr(builtins, fault["error"])
            patches.append(mock.patch.object(importlib.import_module(module), name,
                                              side_effect=error("injected")))
    return patches


def run(call: dict) -> dict:
    from latentdiff.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, call.get("env", {})))
        for p in _patches(call.get("faults", [])):
            stack.enter_context(p)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            main(call["argv"])
        except SystemExit as e:  # what the interpreter would make of it
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        calls = json.load(f)
    results = [run(c) for c in calls]
    sys.__stdout__.write(json.dumps(results))
