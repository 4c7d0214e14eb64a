"""ControlNets from disk: our folders (``save_controlnet``) and diffusers ``ControlNetModel`` folders.

A diffusers ControlNet folder is ``config.json`` (``_class_name: ControlNetModel``) + ``diffusion_pytorch_model
.safetensors`` (or ``.bin``). Our ControlNet carries diffusers' parameter names, so the state dict loads as it is
(the key map is the identity; ``ControlNetModel.time_proj`` has no parameters); only the config is translated, through
the U-Net's translation (the encoder half of ``UNet2DConditionModel``'s config) plus the control image's embedding.
"""

from __future__ import annotations

from pathlib import Path

from latentdiff.interop.diffusers_folder import WEIGHT_NAMES, _require, unet_config_from_diffusers
from latentdiff.interop.files import read_state_file
from latentdiff.io import CONFIG_NAME, LoadReport, load_state_strict, read_json, reading
from latentdiff.models.controlnet import ControlNet, ControlNetConfig, load_controlnet

DIFFUSERS_CLASS = "ControlNetModel"


def controlnet_config_from_diffusers(d: dict, where: str = "controlnet/config.json") -> ControlNetConfig:
    """diffusers ControlNetModel config -> ControlNetConfig (settings we do not implement are refused by name)."""
    _require(d, where, {"controlnet_conditioning_channel_order": ["rgb"], "global_pool_conditions": [False],
                        "addition_embed_type_num_heads": [64]})
    with reading(where, "the ControlNet folder is damaged, or of a layout latentdiff does not read"):
        down = list(d["down_block_types"])
        mirrored = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down)]
        unet = unet_config_from_diffusers({**d, "up_block_types": mirrored, "out_channels": d["in_channels"]}, where)
        widths = d.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        fields = {k: getattr(unet, k) for k in unet.__dataclass_fields__}
        return ControlNetConfig(**fields, conditioning_channels=d.get("conditioning_channels", 3),
                                conditioning_embedding_channels=tuple(widths))


def is_diffusers_controlnet(folder: Path) -> bool:
    config = Path(folder) / CONFIG_NAME
    return config.is_file() and read_json(config, "").get("_class_name") == DIFFUSERS_CLASS


def read_diffusers_controlnet(folder: str | Path) -> tuple[ControlNet, LoadReport]:
    """A diffusers ControlNetModel folder -> our ControlNet, loaded strictly."""
    folder = Path(folder)
    cfg = controlnet_config_from_diffusers(read_json(folder / CONFIG_NAME, "not a ControlNet folder"),
                                           str(folder / CONFIG_NAME))
    weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has no weights (expected one of {', '.join(WEIGHT_NAMES)})")
    controlnet = ControlNet(cfg)
    try:
        report = load_state_strict(controlnet, read_state_file(weights), "controlnet")
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from e
    return controlnet.eval(), report


def open_controlnet(path: str | Path) -> tuple[ControlNet, LoadReport]:
    """A ControlNet folder, ours (``latentdiff train-controlnet``) or diffusers' (``ControlNetModel``)."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a ControlNet folder (no {CONFIG_NAME}): give the folder that "
                                "`latentdiff train-controlnet` wrote, or a diffusers ControlNetModel folder")
    if is_diffusers_controlnet(folder):
        return read_diffusers_controlnet(folder)
    return load_controlnet(folder)
