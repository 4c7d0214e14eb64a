"""Random inpainting masks for training a denoiser that sees the mask (``train --set inpaint=true``).

Each sample gets, from its own generator: with probability ``full`` the whole image (so the model also does
text-to-image, as SD inpainting's training did); else, with probability ``objects`` when the data knows where its
objects are (the shapes set's scenes: ``shapes.object_boxes``), the box one of its objects may occupy (so the mask
hides a whole object, and the prompt says what belongs there); else a random box of 1/4 to 3/4 of each side.
White (1) is repainted, as everywhere in latentdiff.
"""

from __future__ import annotations

import torch
from torch import Tensor

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), fractions of the canvas side, y pointing down


def box_mask(box: Box, height: int, width: int) -> Tensor:
    """A (1, 1, H, W) mask of 1 on every pixel that overlaps ``box`` (an antialiased edge pixel of what the box
    holds is inside)."""
    x0, y0, x1, y1 = box
    rows, cols = torch.arange(height), torch.arange(width)
    inside = ((rows / height < y1) & ((rows + 1) / height > y0))[:, None] & \
        ((cols / width < x1) & ((cols + 1) / width > x0))[None, :]
    return inside.float()[None, None]


def random_mask(generator: torch.Generator, height: int, width: int, boxes: list[Box] | None = None, *,
                full: float = 0.25, objects: float = 0.5) -> Tensor:
    """One training mask (1, 1, H, W) of 0 / 1 drawn from ``generator`` (module docstring); always six draws,
    so a sample's later draws do not depend on which kind of mask it got."""
    kind, pick, w, h, x, y = torch.rand(6, generator=generator).tolist()
    if kind < full:
        return torch.ones(1, 1, height, width)
    if boxes and pick < objects:
        return box_mask(boxes[min(int(x * len(boxes)), len(boxes) - 1)], height, width)
    w, h = 0.25 + 0.5 * w, 0.25 + 0.5 * h
    x0, y0 = (1 - w) * x, (1 - h) * y
    return box_mask((x0, y0, x0 + w, y0 + h), height, width)
