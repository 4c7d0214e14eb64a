"""The README's picture: the bundled model on eight held-out prompts, 4x nearest-neighbour, captions below.

    python docs/make_grid.py [--out docs/default_grid.png]
"""

from __future__ import annotations

import argparse
import textwrap

from PIL import Image, ImageDraw

import latentdiff
from latentdiff.data.shapes import heldout_prompts

SCALE, COLUMNS, CAPTION = 4, 4, 40  # pixels per model pixel, images per row, caption band height


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/default_grid.png")
    args = ap.parse_args()
    prompts = [c for c, _ in heldout_prompts(8, seed=0, phrasing="paraphrase")]
    images = latentdiff.load().generate(prompts, seed=0)
    side = images[0].width * SCALE
    rows = (len(images) + COLUMNS - 1) // COLUMNS
    grid = Image.new("RGB", (COLUMNS * side, rows * (side + CAPTION)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x, y = i % COLUMNS * side, i // COLUMNS * (side + CAPTION)
        grid.paste(image.resize((side, side), Image.NEAREST), (x, y))
        draw.multiline_text((x + 3, y + side + 2), "\n".join(textwrap.wrap(prompt, 21)[:3]), fill="black", spacing=1)
    grid.save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
