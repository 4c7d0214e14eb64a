"""Token merging for Stable Diffusion, Bolya & Hoffman 2023 ("ToMe for SD", after ToMe, Bolya et al. 2023).

Before a transformer block's self-attention, ``ratio`` of the image tokens are merged (averaged) into similar ones,
attention runs on the fewer tokens, and its output is copied back to every merged token ("unmerge"). The
destination tokens are one per 2x2 window of the token grid (its top-left token: tomesd's ``use_rand=False``), so
merges stay spread over the image; every other token is a source, and the ``r`` sources most similar (cosine) to
their best destination are merged into it: bipartite soft matching. ``r = int(tokens * ratio)``, at most the number
of sources (three quarters of the tokens). As in tomesd's defaults only the self-attention is merged (not the
cross-attention or the MLP), and only at the highest-resolution transformer blocks (``unet.UNet``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


def check_ratio(ratio: float) -> float:
    """A merge ratio must be a number in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"token merging ratio (tome) must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


@lru_cache(maxsize=32)
def grid_split(height: int, width: int, sy: int = 2, sx: int = 2) -> tuple[Tensor, Tensor]:
    """Token indices (row-major grid) of the destinations, the top-left token of each full sy x sx window, and of
    the sources (every other token, rows and columns left over by the windows included): (dst (Nd,), src (Ns,))."""
    dst = [i * width + j for i in range(0, height - height % sy, sy) for j in range(0, width - width % sx, sx)]
    chosen = set(dst)
    src = [k for k in range(height * width) if k not in chosen]
    return torch.tensor(dst, dtype=torch.long), torch.tensor(src, dtype=torch.long)


@dataclass
class TokenMerge:
    """One block's matching: ``merge`` (B, N, C) -> (B, N - r, C) and ``unmerge`` back to (B, N, C)."""

    dst: Tensor  # (Nd,) grid indices of the destinations
    src: Tensor  # (Ns,) grid indices of the sources
    kept: Tensor  # (B, Ns - r) positions (in ``src``) of the sources left as they are
    merged: Tensor  # (B, r) positions (in ``src``) of the sources merged away
    into: Tensor  # (B, r) position (in ``dst``) each merged source goes into

    def merge(self, x: Tensor) -> Tensor:
        """Tokens -> [kept sources, destinations (each the mean of itself and the sources merged into it)]."""
        C = x.shape[-1]
        src, dst = x[:, self.src], x[:, self.dst]  # (B, Ns, C), (B, Nd, C)
        kept = src.gather(1, _rows(self.kept, C))  # (B, Ns - r, C)
        moved = src.gather(1, _rows(self.merged, C))  # (B, r, C)
        dst = dst.scatter_reduce(1, _rows(self.into, C), moved, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)  # (B, N - r, C)

    def unmerge(self, y: Tensor) -> Tensor:
        """Merged tokens -> every original position; a merged source gets its destination's value."""
        B, _, C = y.shape
        n_kept = self.kept.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]  # (B, Ns - r, C), (B, Nd, C)
        out = y.new_empty(B, self.src.numel() + self.dst.numel(), C)
        out[:, self.dst] = dst
        out.scatter_(1, _rows(self.src[self.kept], C), kept)
        out.scatter_(1, _rows(self.src[self.merged], C), dst.gather(1, _rows(self.into, C)))
        return out  # (B, N, C)


def _rows(index: Tensor, channels: int) -> Tensor:
    """(B, K) token positions -> (B, K, C), for gather / scatter along the token axis."""
    return index[..., None].expand(*index.shape, channels)


def bipartite_soft_matching(metric: Tensor, height: int, width: int, ratio: float) -> TokenMerge | None:
    """The matching of ``metric`` (B, N = height * width, C) tokens: None when ``ratio`` merges no token."""
    N = metric.shape[1]
    if N != height * width:
        raise ValueError(f"{N} tokens are not a {height}x{width} grid")
    dst, src = grid_split(height, width)
    r = min(int(N * ratio), src.numel())
    if r <= 0:
        return None
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = m[:, src] @ m[:, dst].transpose(1, 2)  # (B, Ns, Nd) cosine similarity
        best, into = scores.max(dim=-1)  # (B, Ns) each source's most similar destination
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # (B, Ns) most similar first
        merged = order[:, :r]
        return TokenMerge(dst, src, order[:, r:], merged, into.gather(1, merged))
