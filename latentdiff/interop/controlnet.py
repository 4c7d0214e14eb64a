"""ControlNets from disk: our folders (``save_controlnet``), diffusers ``ControlNetModel`` folders, and the original
single files (lllyasviel's ``control_*.safetensors`` / ``.pth``, ``cldm.py`` names, ``control_model.`` prefix or none).

A diffusers ControlNet folder is ``config.json`` (``_class_name: ControlNetModel``) + ``diffusion_pytorch_model
.safetensors`` (or ``.bin``). Our ControlNet carries diffusers' parameter names, so the state dict loads as it is
(the key map is the identity; ``ControlNetModel.time_proj`` has no parameters); only the config is translated, through
the U-Net's translation (the encoder half of ``UNet2DConditionModel``'s config) plus the control image's embedding.
A single file holds no config: it is built for the base model it is added to (``base``, the U-Net's config) with the
control image's embedding read off the ``input_hint_block`` shapes, and mapped by ``keymaps.controlnet_rules``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from latentdiff.interop.diffusers_folder import WEIGHT_NAMES, _require, unet_config_from_diffusers
from latentdiff.interop.files import SAFETENSORS, TORCH_FILES, read_state_file
from latentdiff.interop.keymaps import KeyMap, controlnet_rules
from latentdiff.io import CONFIG_NAME, LoadReport, load_state_strict, read_json, reading
from latentdiff.models.controlnet import ControlNet, ControlNetConfig, for_unet, load_controlnet
from latentdiff.models.unet import UNetConfig

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


ORIGINAL_PREFIX = "control_model."


def read_original_controlnet(path: str | Path, base: UNetConfig) -> tuple[ControlNet, LoadReport]:
    """An original-layout ControlNet file, built for the base U-Net ``base``; every tensor used, shapes checked."""
    if not isinstance(base, UNetConfig):
        raise ValueError(f"{path}: a ControlNet needs a U-Net denoiser; this model's is a {type(base).__name__}")  # noqa: TRY004
    state = read_state_file(path)
    prefix = ORIGINAL_PREFIX if any(k.startswith(ORIGINAL_PREFIX) for k in state) else ""
    hint = sorted(int(k[len(prefix) + 17:].split(".")[0]) for k in state
                  if k.startswith(prefix + "input_hint_block.") and k.endswith(".weight"))
    if not hint:
        raise ValueError(f"{path} is not a ControlNet checkpoint (no input_hint_block): give a ControlNet file, a "
                         "diffusers ControlNetModel folder or a folder from `latentdiff train-controlnet`")
    widths = [state[f"{prefix}input_hint_block.{i}.weight"].shape[0] for i in hint[:-1]]  # conv_in, blocks
    hint_channels = state[f"{prefix}input_hint_block.0.weight"].shape[1]
    cfg = dataclasses.replace(for_unet(base, 2 ** (len(widths[1::2])), conditioning_channels=hint_channels),
                              conditioning_embedding_channels=(widths[0], *widths[2::2]))
    table = KeyMap(controlnet_rules(cfg, len(hint) - 2), original_prefix=prefix)
    ours, absent, _ = table.to_ours(state)
    unused = sorted(set(state) - table.original_keys())
    if absent or unused:
        raise ValueError(f"{path} does not fit a ControlNet of this model's U-Net: {len(absent)} tensor(s) missing "
                         f"(e.g. {absent[:2]}), {len(unused)} unused (e.g. {unused[:2]}); it was made for another "
                         "base model")
    controlnet = ControlNet(cfg)
    try:
        report = load_state_strict(controlnet, ours, "controlnet")
    except ValueError as e:
        raise ValueError(f"{path}: {e}; it was made for another base model") from e
    return controlnet.eval(), report


def open_controlnet(path: str | Path, base: UNetConfig | None = None) -> tuple[ControlNet, LoadReport]:
    """A ControlNet folder, ours (``latentdiff train-controlnet``) or diffusers' (``ControlNetModel``), or an original
    single file (``base``: the U-Net config of the model it is for)."""
    folder = Path(path)
    if folder.is_file() or folder.suffix.lower() in SAFETENSORS + TORCH_FILES:
        if base is None:
            raise ValueError(f"{folder}: a single-file ControlNet holds no config; add it to a model "
                             "(Pipeline.add_controlnet), which supplies its U-Net's")
        return read_original_controlnet(folder, base)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a ControlNet folder (no {CONFIG_NAME}): give the folder that "
                                "`latentdiff train-controlnet` wrote, or a diffusers ControlNetModel folder")
    if is_diffusers_controlnet(folder):
        return read_diffusers_controlnet(folder)
    return load_controlnet(folder)
