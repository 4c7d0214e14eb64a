"""Write the bundled default model from a trained model folder: every weight as fp16, configs as they are.

    python -m latentdiff.default.build RUN/model [--out latentdiff/default/model]

The weights are rounded to fp16 (half the bytes; the model is loaded back into fp32 modules), then the folder
is loaded strictly once to prove it opens, and a manifest of sizes and SHA-256 sums is written beside it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from latentdiff.components import load_autoencoder, load_denoiser, load_text_encoder
from latentdiff.default import FOLDER, verify, write_manifest
from latentdiff.io import atomic_folder, write_safetensors


def build(source: str | Path, out: str | Path = FOLDER) -> Path:
    """Copy the model folder ``source`` to ``out`` with fp16 weights and a manifest; return ``out``."""
    source, out = Path(source), Path(out)
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} is not a latentdiff model folder (no model_index.json)")
    with atomic_folder(out) as tmp:
        for path in sorted(source.rglob("*")):
            if path.is_dir():
                continue
            target = tmp / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                state = load_file(path)
                write_safetensors(target, {k: v.half() if v.is_floating_point() else v for k, v in state.items()})
            else:
                shutil.copyfile(path, target)
        write_manifest(tmp)
    verify(out)
    load_autoencoder(out / "autoencoder")  # strict loads: every tensor matched, nothing missing or unused
    load_denoiser(out / "denoiser")
    load_text_encoder(out / "text_encoder")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a trained latentdiff model folder (RUN/model)")
    ap.add_argument("--out", default=str(FOLDER), help="where to write it (default: the package's bundled model)")
    args = ap.parse_args(argv)
    out = build(args.source, args.out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
