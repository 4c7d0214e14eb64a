"""Run ``latentdiff.cli`` while recording every file write below $AUDIT_ROOT (for the rank-0-only test).

Writes are seen through Python's audit events ("open" for writing, renames, removals, mkdir); the
record goes to $AUDIT_OUT/rank{RANK}.json when the command ends.
"""

import json
import os
import sys
from pathlib import Path

root = str(Path(os.environ["AUDIT_ROOT"]).resolve())
seen: list[str] = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under_root(path) -> bool:
    try:
        return str(Path(os.fsdecode(path)).resolve()).startswith(root)
    except (TypeError, ValueError, OSError):
        return False


def hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and _under_root(path):
            seen.append(f"open {path}")
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "shutil.move") and \
            args and _under_root(args[0]):
        seen.append(f"{event} {args[0]}")


if __name__ == "__main__":
    sys.addaudithook(hook)
    from latentdiff.cli import main

    try:
        main(sys.argv[1:])
    finally:
        record = list(seen)
        seen.clear()
        out = Path(os.environ["AUDIT_OUT"]) / f"rank{os.environ.get('RANK', '0')}.json"
        root = "\0"  # stop recording our own write
        out.write_text(json.dumps(record))
