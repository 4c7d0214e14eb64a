"""Write the bundled default model from a trained model folder: every weight as fp16, configs as they are.

    python -m latentdiff.default.build RUN/model [--guide GUIDE_MODEL] [--out latentdiff/default/model]

The weights are rounded to fp16 (half the bytes; the model is loaded back into fp32 modules), then the folder
is loaded strictly once to prove it opens, and a manifest of sizes and SHA-256 sums is written beside it.
``--guide`` adds a weaker model of the same run (``latentdiff export-checkpoint``) as ``guide/``, for
autoguidance.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from latentdiff.components import load_autoencoder, load_denoiser, load_text_encoder
from latentdiff.config import from_dict, parse_override
from latentdiff.default import FOLDER, verify, write_manifest
from latentdiff.io import atomic_folder, write_safetensors
from latentdiff.model_index import GenerationSettings, ModelIndex


def _copy_half(source: Path, target: Path) -> None:
    """Copy a model folder with every floating-point weight as fp16."""
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} is not a latentdiff model folder (no model_index.json)")
    for path in sorted(source.rglob("*")):
        if path.is_dir():
            continue
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            state = load_file(path)
            write_safetensors(out, {k: v.half() if v.is_floating_point() else v for k, v in state.items()})
        else:
            shutil.copyfile(path, out)


def build(source: str | Path, out: str | Path = FOLDER, guide: str | Path | None = None,
          generation: dict | None = None) -> Path:
    """Copy the model folder ``source`` (and ``guide`` as guide/) to ``out`` with fp16 weights and a manifest;
    ``generation`` (sampler, steps, guidance, schedule, guidance_method, pag_scale) becomes the index's
    recommended settings."""
    source, out = Path(source), Path(out)
    with atomic_folder(out) as tmp:
        _copy_half(source, tmp)
        if guide is not None:
            _copy_half(Path(guide), tmp / "guide")
        if generation:
            index = ModelIndex.read(tmp)
            settings = from_dict(GenerationSettings, {**dataclasses.asdict(index.generation), **generation},
                                 "--generation")
            dataclasses.replace(index, generation=settings).write(tmp)
        write_manifest(tmp)
    verify(out)
    for folder in (out, out / "guide") if guide is not None else (out,):
        load_autoencoder(folder / "autoencoder")  # strict loads: every tensor matched, nothing missing or unused
        load_denoiser(folder / "denoiser")
        load_text_encoder(folder / "text_encoder")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a trained latentdiff model folder (RUN/model)")
    ap.add_argument("--guide", default=None, help="a weaker model of the same run, for autoguidance (guide/)")
    ap.add_argument("--generation", action="append", default=[], metavar="KEY=VALUE",
                    help="a recommended generation setting for the index (sampler, steps, guidance, schedule, "
                         "guidance_method, pag_scale); repeatable")
    ap.add_argument("--out", default=str(FOLDER), help="where to write it (default: the package's bundled model)")
    args = ap.parse_args(argv)
    out = build(args.source, args.out, args.guide, dict(parse_override(o) for o in args.generation))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
