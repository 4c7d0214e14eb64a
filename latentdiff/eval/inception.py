"""Inception-v3 in its FID variant (the TF 2015-12-05 graph), 2048-d pool features, Heusel et al. 2017.

The layer names are torchvision's ``Inception3`` (num_classes=1008, no aux head), so the standard FID
weight file ``pt_inception-2015-12-05-6726825d.pth`` (the one pytorch-fid, torchmetrics and clean-fid
use) loads strictly. The FID blocks differ from torchvision's in their pooling branches: average pools
that ignore padding (TF semantics) and a max pool in the last block. torch-fidelity's (and so torchmetrics')
``FeatureExtractorInceptionV3`` uses the same key names, so its ``weights-inception-2015-12-05-6726825d.pth``
loads as well.

Images of another size are resized to 299x299 bilinearly, in one of two conventions (``resize``):

- ``"bilinear"`` (default): ``F.interpolate(mode="bilinear", align_corners=False)``, half-pixel centres, as
  pytorch-fid does;
- ``"tf1"``: TensorFlow 1.x's ``resize_bilinear`` (source coordinate ``dst * in / out``, no half-pixel offset),
  as torch-fidelity and torchmetrics' FID do.

At 299x299 both are the identity. The features equal torch-fidelity's given the same weights and the same
input (``tests/test_eval_inception_parity.py``); note torch-fidelity maps uint8 ``u`` to ``(u - 128) / 128``
while pytorch-fid maps it to ``u / 127.5 - 1``: feed the former to reproduce torch-fidelity/torchmetrics.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentdiff.io import load_state_strict, safe_torch_load

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_ENV = "LATENTDIFF_INCEPTION_WEIGHTS"
TORCH_FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the same graph, torch-fidelity's file
RESIZE_MODES = ("bilinear", "tf1")


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as in TF), ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    """3x3 average pool, stride 1, that ignores the zero padding (TF's average pool)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: factorized 7x7 branches."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (average pool branch) and Mixed_7c (max pool branch, a quirk of the FID graph)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize as TensorFlow 1.x ``resize_bilinear(align_corners=False)`` computes it.

    Output pixel ``i`` samples the input at ``i * in / out`` (no half-pixel offset, unlike ``F.interpolate``),
    interpolating between ``floor`` and ``floor + 1`` clamped to the last pixel; no antialiasing when shrinking.
    This is the resize of the original TF FID code, torch-fidelity and torchmetrics.
    """
    h_out, w_out = size
    x = _lerp_taps(x, _tf1_taps(x.shape[-1], w_out, x.device), dim=-1)  # along rows first, as TF does
    return _lerp_taps(x, _tf1_taps(x.shape[-2], h_out, x.device), dim=-2)


def _tf1_taps(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Low index, high index and weight of the high tap for each output position (float32 coordinates)."""
    pos = torch.arange(n_out, dtype=torch.float32, device=device) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = pos.floor().long().clamp_max(n_in - 1)
    return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()


def _lerp_taps(x: Tensor, taps: tuple[Tensor, Tensor, Tensor], dim: int) -> Tensor:
    lo, hi, frac = taps
    shape = [1] * x.ndim
    shape[dim] = -1
    a, b = x.index_select(dim, lo), x.index_select(dim, hi)
    return a + (b - a) * frac.to(x.dtype).view(shape)


def resize_to(x: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize ``(B, C, H, W)`` to ``size`` in one of :data:`RESIZE_MODES` (see the module docstring)."""
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if mode == "tf1":
        return resize_bilinear_tf1(x, size)
    raise ValueError(f"unknown resize {mode!r}; choose one of {', '.join(RESIZE_MODES)}")


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3: images in [-1, 1] -> 2048-d pool features (``forward``) or 1008 logits.

    ``resize`` names how images of another size reach 299x299: ``"bilinear"`` (pytorch-fid) or ``"tf1"``
    (torch-fidelity / torchmetrics); see the module docstring.
    """

    dim = 2048

    def __init__(self, resize: str = "bilinear"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the TF graph's 1008 classes; unused by FID, kept for a strict load

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 2048): resize to 299 (``self.resize``), then the net."""
        x = resize_to(images.float(), (299, 299), self.resize)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # -> (B, 2048, 8, 8)
        return x.mean((2, 3))  # (B, 2048)

    def logits(self, images: Tensor) -> Tensor:
        return self.fc(self.forward(images))


def weight_candidates(path: str | os.PathLike | None = None) -> list[Path]:
    """Where the FID Inception weights are looked for, in order."""
    if path is not None:
        return [Path(path)]
    out = []
    if os.environ.get(WEIGHTS_ENV):
        out.append(Path(os.environ[WEIGHTS_ENV]))
    out.append(_default_path())
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    out.append(torch_home / "hub" / "checkpoints" / WEIGHTS_FILE)  # where pytorch-fid downloads it
    out.append(torch_home / "hub" / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILE)  # torch-fidelity / torchmetrics
    return out


def _default_path() -> Path:
    return Path.home() / ".cache" / "latentdiff" / WEIGHTS_FILE


def load_fid_inception(path: str | os.PathLike | None = None, resize: str = "bilinear") -> FIDInceptionV3:
    """The FID Inception with its standard weights from a local file (never downloaded here).

    pytorch-fid's and torch-fidelity's weight files both load (same key names); ``resize`` as in
    :class:`FIDInceptionV3`.
    """
    candidates = weight_candidates(path)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            "the FID Inception weights were not found; looked in: " + ", ".join(str(p) for p in candidates)
            + f". Download {WEIGHTS_URL} on a machine with network access and pass its path "
            "(latentdiff eval --extractor inception --feature-path PATH), "
            f"set {WEIGHTS_ENV}=PATH, or copy it to {_default_path() if path is None else candidates[0]}")
    if found.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(found))
    else:
        state = safe_torch_load(found)
    model = FIDInceptionV3(resize)
    # BatchNorm counters are not weights; files converted from TF may lack them.
    own = model.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    load_state_strict(model, state, f"FID Inception ({found})")
    return model.eval()
