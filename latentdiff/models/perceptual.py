"""The adversarial and perceptual parts of autoencoder training (Esser et al. 2021, taming transformers; LDM).

* ``LPIPS``: Zhang et al. 2018, the VGG16 variant used by taming-transformers and LDM. The module layout (and so
  the state-dict keys) is taming's: ``scaling_layer``, ``net.slice1`` .. ``net.slice5`` (torchvision's
  ``vgg16().features`` indices kept: ``net.slice2.5.weight`` is ``features.5.weight``), ``lin0`` .. ``lin4``
  (``lin0.model.1.weight``). No weights are bundled or downloaded: ``load_lpips`` reads local files, either one
  file with the whole state, or LPIPS's linear-layer file (``vgg.pth``) plus torchvision's VGG16 weights.
  Without weights there is no perceptual term: a random VGG is not a perceptual metric, so latentdiff
  says so and trains with the pixel loss (+ GAN) alone instead of pretending.
* ``PatchDiscriminator``: the PatchGAN of Isola et al. 2017 as configured in taming (``NLayerDiscriminator``:
  4x4 convs, BatchNorm, LeakyReLU 0.2, one logit per patch).
* ``hinge_d_loss``, ``adaptive_gan_weight``: the discriminator's hinge loss and Esser et al.'s weight
  ||grad_L nll|| / ||grad_L g_loss|| at the decoder's last layer L, which balances the two terms.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from latentdiff.io import load_state_strict, safe_torch_load

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]  # features[a:b] end at relu1_2, 2_2, 3_3, 4_3, 5_3
LPIPS_CHANNELS = [64, 128, 256, 512, 512]


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layer for layer (so its indices and weight names line up)."""
    layers, c = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers)


class _VGGSlices(nn.Module):
    def __init__(self):
        super().__init__()
        features = vgg16_features()
        for i, (a, b) in enumerate(SLICES, 1):
            block = nn.Sequential()
            for j in range(a, b):
                block.add_module(str(j), features[j])
            setattr(self, f"slice{i}", block)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            outs.append(x)
        return outs


class _ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class _NetLin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """Learned perceptual distance, Zhang et al. 2018: (B, 3, H, W) pairs in [-1, 1] -> (B,)."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _VGGSlices()
        for i, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{i}", _NetLin(c))
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen: dropout stays off

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((a - b).pow(2)).mean(dim=(2, 3))  # (B, 1)
        return total.flatten()


def _read_state(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights {path} not found")
    state = load_file(str(path)) if path.suffix == ".safetensors" else safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")  # noqa: TRY004 (bad file, not a bad call)
    return state


def _torchvision_to_slices(key: str) -> str:
    """``features.5.weight`` (torchvision VGG16) -> ``net.slice2.5.weight``; other keys unchanged."""
    m = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
    if not m:
        return key
    j = int(m.group(1))
    slice_no = next(i for i, (a, b) in enumerate(SLICES, 1) if a <= j < b)
    return f"net.slice{slice_no}.{j}.{m.group(2)}"


def load_lpips(path: str | Path, vgg_path: str | Path | None = None) -> LPIPS:
    """LPIPS from local files: one file with the full state, or the linear layers plus torchvision VGG16 weights.

    Loads strictly: every tensor must be found (torchvision's classifier weights are ignored).
    """
    state = dict(_read_state(path))
    if vgg_path:
        state.update(_read_state(vgg_path))
    state = {_torchvision_to_slices(k): v for k, v in state.items() if not k.startswith("classifier.")}
    model = LPIPS()
    for k, v in model.state_dict().items():  # the scaling constants are fixed numbers, not learned weights
        if k.startswith("scaling_layer."):
            state.setdefault(k, v)
    load_state_strict(model, state, "lpips")
    return model


def perceptual_loss_or_none(path: str, vgg_path: str, weight: float, quiet: bool = False) -> LPIPS | None:
    """The LPIPS module when weights are given and the term is on; otherwise None, said once on stderr."""
    if weight <= 0:
        return None
    if not path:
        if not quiet:
            print("no LPIPS weights given (lpips_path): training without a perceptual term "
                  "(pixel loss and, if enabled, the GAN loss only)", file=sys.stderr)
        return None
    return load_lpips(path, vgg_path or None)


# ----------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN, Isola et al. 2017 (taming's NLayerDiscriminator): image (B, 3, H, W) -> logits (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix initialization
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: (E relu(1 - D(x)) + E relu(1 + D(x_hat))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """Esser et al. 2021, eq. 7: ||grad_L nll|| / (||grad_L g_loss|| + 1e-4) at the last layer L, clamped, detached."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
