"""Key-map tables: they cover our models exactly, invert, and agree with diffusers' own single-file converters."""

from __future__ import annotations

import pytest
import torch

from latentdiff.interop.diffusers_folder import unet_config_from_diffusers, vae_config_from_diffusers
from latentdiff.interop.keymaps import KeyMap, Rule, clip_rules, openclip_rules, unet_rules, vae_rules
from latentdiff.models.autoencoder import AutoencoderKL
from latentdiff.models.unet import UNet

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference for the key maps")
from diffusers.loaders import single_file_utils as sfu
from interop_tiny import clip_config, tiny_unet, tiny_vae


def _random_like(state: dict) -> dict:
    """Distinct random values for every tensor, so a swapped pair of names cannot go unnoticed."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_unet_table_covers_model_and_matches_diffusers(kind):
    ref = tiny_unet(kind)
    cfg = unet_config_from_diffusers(dict(ref.config))
    km = KeyMap(unet_rules(cfg), "model.diffusion_model.")
    ours = _random_like(UNet(cfg).state_dict())
    assert {k for r in km.rules for k in r.ours} == set(ours)  # the table names every tensor, once

    original, absent = km.to_original(ours)
    assert not absent and all(k.startswith("model.diffusion_model.") for k in original)
    back, absent, _ = km.to_ours(original)
    assert not absent and back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)

    # diffusers' own converter reads our original-layout dict into the same tensors.
    theirs = sfu.convert_ldm_unet_checkpoint(original, dict(ref.config))
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_vae_table_covers_model_reshapes_attention_and_matches_diffusers():
    ref = tiny_vae()
    cfg = vae_config_from_diffusers(dict(ref.config))
    km = KeyMap(vae_rules(cfg), "first_stage_model.")
    ours = _random_like(AutoencoderKL(cfg).state_dict())
    assert {k for r in km.rules for k in r.ours} == set(ours)
    original, absent = km.to_original(ours)
    assert not absent
    q = original["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.ndim == 4 and q.shape[2:] == (1, 1)  # a 1x1 conv in the original, a Linear in ours
    back, absent, _ = km.to_ours(original)
    assert not absent and all(torch.equal(back[k], ours[k]) for k in ours)
    theirs = sfu.convert_ldm_vae_checkpoint(original, dict(ref.config))
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def _canonical_state(model) -> dict:
    from latentdiff.conditioning.clip import canonical_clip_key

    return {canonical_clip_key(k): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def test_clip_table_is_the_identity_under_a_prefix_and_matches_diffusers():
    from transformers import CLIPTextModel

    model = CLIPTextModel(clip_config(40, layers=2))
    ours = _random_like(_canonical_state(model))
    km = KeyMap(clip_rules(2), "cond_stage_model.transformer.")
    original, absent = km.to_original(ours)
    assert not absent and len(original) == len(ours)
    theirs = sfu.convert_ldm_clip_checkpoint(original)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_openclip_table_splits_qkv_transposes_projection_and_matches_diffusers():
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(clip_config(40, hidden=32, layers=2, projection=24, act="gelu"))
    ours = _random_like(_canonical_state(model))
    km = KeyMap(openclip_rules(2, projection=True), "cond_stage_model.model.")
    assert {k for r in km.rules for k in r.ours} == set(ours)
    original, absent = km.to_original(ours)
    assert not absent
    assert original["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert original["cond_stage_model.model.text_projection"].shape == (32, 24)  # x @ P in OpenCLIP
    back, absent, _ = km.to_ours(original)
    assert not absent and all(torch.equal(back[k], ours[k]) for k in ours)
    km = KeyMap(km.rules, "conditioner.embedders.1.model.")  # SDXL prefix: diffusers keeps the projection there
    original, _ = km.to_original(ours)
    theirs = sfu.convert_open_clip_checkpoint(model, original, prefix="conditioner.embedders.1.model.")
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_keymap_refuses_malformed_tables():
    with pytest.raises(ValueError, match="twice"):
        KeyMap([Rule("a", ("x",)), Rule("b", ("x",))])
    with pytest.raises(ValueError, match="three targets"):
        KeyMap([Rule("a", ("x",), "split3")])
    with pytest.raises(ValueError, match="unknown transform"):
        KeyMap([Rule("a", ("x",), "flip")])
