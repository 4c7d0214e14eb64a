"""The denoiser network families (U-Net, DiT, MMDiT, and the video U-Net and DiT): their classes, presets, and how a preset meets the data.

Every family is a ``Network``: ``network(x, c_noise, cond) -> raw output`` of x's shape, configured by one
dataclass, with its presets in a dict next to it (``models/unet.py``, ``models/dit.py``, ``models/mmdit.py``).
Preset names are unique across families, so ``latentdiff train --set model=NAME`` finds the family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from . import video_dit, video_unet
from .dit import PRESETS as DIT_PRESETS
from .dit import DiT
from .mmdit import PRESETS as MMDIT_PRESETS
from .mmdit import MMDiT
from .unet import PRESETS as UNET_PRESETS
from .unet import UNet

# family name (also the DenoiserSpec field holding its config) -> (network class, presets)
FAMILIES: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "unet": (UNet, UNET_PRESETS),
    "dit": (DiT, DIT_PRESETS),
    "mmdit": (MMDiT, MMDIT_PRESETS),
    "video_unet": (video_unet.VideoUNet, video_unet.PRESETS),  # inflated from a U-Net (models/video_unet.py), no presets
    "video_dit": (video_dit.VideoDiT, video_dit.PRESETS),  # inflated from a DiT (models/video_dit.py), no presets
}
# image family -> (its video family, the inflated config of an image config, inflate)
INFLATABLE: dict[str, tuple[str, Any, Any]] = {
    "unet": ("video_unet", video_unet.inflated_config, video_unet.inflate),
    "dit": ("video_dit", video_dit.inflated_config, video_dit.inflate),
}
VIDEO_FAMILIES = tuple(video for video, _, _ in INFLATABLE.values())

_clash = set(UNET_PRESETS) & set(DIT_PRESETS) | set(UNET_PRESETS) & set(MMDIT_PRESETS) | set(DIT_PRESETS) & set(MMDIT_PRESETS)
assert not _clash, f"preset names must be unique across families: {_clash}"


def find_preset(name: str) -> tuple[str, Any]:
    """A preset name -> (family, a copy of its config)."""
    for family, (_, presets) in FAMILIES.items():
        if name in presets:
            return family, dataclasses.replace(presets[name])
    known = "; ".join(f"{family}: {', '.join(sorted(presets))}" for family, (_, presets) in FAMILIES.items())
    raise ValueError(f"unknown network preset {name!r}; known presets are {known}")


def for_text_data(family: str, config: Any, channels: int, text_dim: int, latent_size: int) -> Any:
    """A preset's config adapted to the training data: latent channels and size, text token and pooled widths.

    Text conditioning replaces class labels (DiT's ImageNet presets): tokens feed cross- or joint attention,
    the pooled vector joins the timestep embedding. DiT's learned sigma is switched off (nothing trains it).
    """
    if family == "unet":
        return dataclasses.replace(config, in_channels=channels, out_channels=channels, context_dim=text_dim,
                                   vector_dim=text_dim, num_classes=None)
    if family == "dit":
        return dataclasses.replace(config, in_channels=channels, sample_size=latent_size, context_dim=text_dim,
                                   vector_dim=text_dim, num_classes=None, learn_sigma=False)
    if family == "mmdit":
        grid = latent_size // config.patch_size
        return dataclasses.replace(config, in_channels=channels, context_dim=text_dim, vector_dim=text_dim,
                                   pos_embed_max_size=max(config.pos_embed_max_size, grid))
    raise ValueError(f"unknown network family {family!r}; known: {', '.join(FAMILIES)}")


def family_of(network: nn.Module) -> str | None:
    """The family name of a network instance (None for a network of no family here)."""
    exact = next((family for family, (cls, _) in FAMILIES.items() if type(network) is cls), None)
    return exact or next((family for family, (cls, _) in FAMILIES.items() if isinstance(network, cls)), None)


def is_video_network(network: nn.Module | None) -> bool:
    """Whether a network is a video one (temporal layers; latents (B, C, F, h, w)): a video U-Net or DiT."""
    return network is not None and family_of(network) in VIDEO_FAMILIES


def spatial_factor(family: str, config: Any) -> int:
    """What the latent's height and width must be multiples of: the U-Net's downsampling, a DiT's patch."""
    return 2 ** (len(config.channel_mult) - 1) if family in ("unet", "video_unet") else config.patch_size


def for_class_data(family: str, config: Any, num_classes: int) -> Any:
    """A text-adapted config (``for_text_data``) made class-conditional on ``num_classes`` labels.

    Labels replace the pooled text vector in ``cond.vector`` (tokens still feed attention); label
    ``num_classes`` is the null class that classifier-free guidance and label dropout use: the U-Net's
    embedding table gets ``num_classes + 1`` rows, DiT keeps its own null row (``class_dropout``).
    """
    if num_classes < 1:
        raise ValueError(f"class-conditional training needs at least one class, got {num_classes}")
    if family == "unet":
        return dataclasses.replace(config, vector_dim=None, num_classes=num_classes + 1)
    if family == "dit":
        return dataclasses.replace(config, vector_dim=None, num_classes=num_classes, class_dropout=True)
    raise ValueError(f"the {family} network has no class embedding (it needs pooled text in cond.vector): train "
                     "a U-Net or DiT preset on class labels, or set class_labels = false to ignore them")
