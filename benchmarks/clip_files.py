"""Clip file sizes: GIF, lossless WebP, lossy WebP (quality 90), MP4 (H.264) for a video model's clips.

    python benchmarks/clip_files.py VIDEO_MODEL_DIR [--frames 8] [--steps 20] [--enlarge 4]

Generates three clips (seed 0) and prints the bytes each format takes, summed over the clips, at the clips' own
size and enlarged ``--enlarge`` times (bicubic, as a larger model's smooth frames would be); the numbers behind
save_webp's lossless choice (ARCHITECTURE.md, "Clip files").
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

from latentdiff.images import save_animation, save_mp4
from latentdiff.pipeline import load

PROMPTS = ["a small red circle moving to the right on a black background",
           "a blue square growing on a gray background",
           "a green triangle moving up on a white background"]


def sizes(clips, folder: Path, fps: float) -> dict[str, int]:
    total: dict[str, int] = {}
    for i, clip in enumerate(clips):
        files = {suffix: save_animation(clip, folder / f"{i}{suffix}", fps) for suffix in (".gif", ".webp", ".mp4")}
        files["mp4 (own size)"] = save_mp4(clip, folder / f"{i}_own.mp4", fps, min_size=1)
        files["webp q90"] = folder / f"{i}_q90.webp"
        clip[0].save(files["webp q90"], format="WEBP", save_all=True, append_images=clip[1:],
                     duration=round(1000 / fps), loop=0, quality=90)
        for name, path in files.items():
            total[name] = total.get(name, 0) + path.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--enlarge", type=int, default=4)
    args = parser.parse_args()
    clips = load(args.model).generate(PROMPTS, steps=args.steps, frames=args.frames, seed=0)
    w, h = clips[0][0].size
    big = [[f.resize((w * args.enlarge, h * args.enlarge), Image.BICUBIC) for f in clip] for clip in clips]
    print("| frames | gif | webp (lossless) | webp q90 | mp4 | mp4 (own size) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, group in ((f"{w}x{h}", clips), (f"{w * args.enlarge}x{h * args.enlarge}", big)):
            folder = Path(tmp) / name
            total = sizes(group, folder, 8.0)
            row = [total[k] for k in (".gif", ".webp", "webp q90", ".mp4", "mp4 (own size)")]
            print(f"| {len(group)} x {args.frames} at {name} | " + " | ".join(f"{b / 1000:.1f} kB" for b in row) + " |")


if __name__ == "__main__":
    main()
