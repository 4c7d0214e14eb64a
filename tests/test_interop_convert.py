"""``latentdiff convert``: diffusers <-> ours <-> single file, checked by diffusers reopening what we wrote."""

from __future__ import annotations

import json

import pytest
import torch

import latentdiff
from latentdiff.cli import main
from latentdiff.components import (
    DenoiserSpec,
    build_denoiser,
    save_autoencoder,
    save_denoiser,
    save_text_encoder,
)
from latentdiff.conditioning.text import HashedTextEncoder, TextEncoderConfig
from latentdiff.interop import open_model
from latentdiff.interop.single_file import to_original_state
from latentdiff.io import write_safetensors
from latentdiff.model_index import ModelIndex
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.unet import UNetConfig
from latentdiff.types import Cond

diffusers = pytest.importorskip("diffusers", reason="diffusers reopens the folders we write")
pytest.importorskip("transformers", reason="the SD text encoders are transformers CLIP models")

from interop_tiny import SD1_OVERRIDES, one_thread, tiny_sd_pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def _text_state(model) -> dict:
    from latentdiff.conditioning.clip import canonical_clip_key

    return {canonical_clip_key(k): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def test_diffusers_to_ours_to_diffusers_reopens_in_diffusers(sd_folder, tmp_path, capsys):
    main(["convert", str(sd_folder), str(tmp_path / "ours")])
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--format", "diffusers"])
    assert "wrote diffusers folder" in capsys.readouterr().out
    a = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    b = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "back", safety_checker=None)
    _same_state(a.unet.state_dict(), b.unet.state_dict())
    _same_state(a.vae.state_dict(), b.vae.state_dict())
    _same_state(_text_state(a.text_encoder), _text_state(b.text_encoder))
    assert a.unet.config.attention_head_dim == b.unet.config.attention_head_dim
    for key in ("prediction_type", "timestep_spacing", "steps_offset", "beta_schedule", "beta_start", "beta_end"):
        assert a.scheduler.config[key] == b.scheduler.config[key], key
    assert a.tokenizer("a red circle").input_ids == b.tokenizer("a red circle").input_ids


def test_single_file_to_our_folder(sd_folder, tmp_path, capsys):
    model = open_model(sd_folder)
    path = tmp_path / "sd.safetensors"
    write_safetensors(path, to_original_state(model))
    main(["convert", str(path), str(tmp_path / "ours"), "--tokenizer", str(sd_folder),
          "--overrides-json", json.dumps(SD1_OVERRIDES)])
    assert "detected sd1" in capsys.readouterr().out
    pipe = latentdiff.load(tmp_path / "ours")
    _same_state(pipe.denoiser.network.state_dict(), model.denoiser.network.state_dict())
    _same_state(pipe.autoencoder.state_dict(), model.autoencoder.state_dict())
    _same_state(pipe.text_encoder.canonical_state_dict(), model.text_encoder.canonical_state_dict())
    assert pipe.index.scheduler.steps_offset == 1 and pipe.index.scheduler.vp_init


def test_our_model_with_builtin_text_encoder_to_diffusers(tmp_path, capsys):
    torch.manual_seed(0)
    unet_cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                          head_dim=8, context_dim=32, norm_groups=8)
    spec = DenoiserSpec(parameterization="v", unet=unet_cfg)
    denoiser = build_denoiser(spec)
    vae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                                          scale_factor=0.5))
    text = HashedTextEncoder(TextEncoderConfig(dim=32, num_heads=4, num_layers=1))
    ours = tmp_path / "ours"
    save_autoencoder(ours / "autoencoder", vae)
    save_denoiser(ours / "denoiser", denoiser, spec)
    save_text_encoder(ours / "text_encoder", text)
    ModelIndex(sample_size=16).write(ours)
    main(["convert", str(ours), str(tmp_path / "dif"), "--format", "diffusers"])
    assert "no diffusers counterpart" in capsys.readouterr().out
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "dif" / "unet").eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx).sample, denoiser.network(x, t, Cond(context=ctx)))
    dvae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "dif" / "vae")
    assert dvae.config.scaling_factor == 0.5
    _same_state(dvae.state_dict(), vae.state_dict())
    sched = json.loads((tmp_path / "dif" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"


def test_convert_bad_input_exits_2_and_leaves_destination(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(SystemExit) as e:
        main(["convert", str(junk), str(dst), "--tokenizer", str(tmp_path)])
    assert e.value.code == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "old"
