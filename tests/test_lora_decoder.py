"""LoRA on the autoencoder's decoder (models/lora.py's ``decoder`` targets, our files' ``autoencoder.`` keys,
``train-lora --set decoder_rank=R``): zero-init changes nothing, merge / unmerge bit for bit, one file holds the
denoiser's and the decoder's adapters and routes each to its part, mismatches are refused naming the keys, and a
short training run lowers the decoder's reconstruction error of the new colour."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import _randomize, _state

import latentdiff
from latentdiff.interop.lora import lora_for_model
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.lora import METADATA_KEY, LoRA, LoRAConv2d, LoRALinear, read_lora_metadata, save_lora
from latentdiff.models.unet import PRESETS as UNET_PRESETS
from latentdiff.models.unet import UNet


def _autoencoder(width: int = 8) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(base_channels=width, channel_mult=(1, 2), num_res_blocks=1,
                                           latent_channels=4, norm_groups=4)).eval()


def _latents(ae: AutoencoderKL) -> torch.Tensor:
    return torch.randn(2, ae.latent_channels, 4, 4, generator=torch.Generator().manual_seed(1))


def test_decoder_targets_are_its_convolutions_and_zero_init_changes_nothing():
    ae = _autoencoder()
    z = _latents(ae)
    y0 = ae.decode(z)
    lora = LoRA.create(ae, rank=4, targets=("decoder",)).attach(ae)
    assert lora.names and all(n.startswith("decoder.") for n in lora.names)
    assert {"decoder.conv_in", "decoder.conv_out", "decoder.up_blocks.0.upsamplers.0.conv"} <= set(lora.names)
    assert all(isinstance(ae.get_submodule(n), LoRAConv2d) for n in lora.names)  # the attention stays plain
    assert not any(isinstance(m, (LoRAConv2d, LoRALinear)) for m in ae.encoder.modules())
    assert torch.equal(ae.decode(z), y0)


def test_decoder_merge_unmerge_bitwise():
    ae = _autoencoder()
    z = _latents(ae)
    before, y0 = _state(ae), ae.decode(z)
    lora = _randomize(LoRA.create(ae, rank=4, alpha=2, targets=("decoder",))).attach(ae)
    y = ae.decode(z)
    assert (y - y0).abs().max() > 1e-3  # the adapters act
    lora.merge()
    torch.testing.assert_close(ae.decode(z), y, atol=1e-5, rtol=1e-5)
    lora.unmerge()
    assert all(torch.equal(ae.state_dict()[k], before[k]) for k in before)
    assert torch.equal(ae.decode(z), y)
    lora.detach()
    assert all(torch.equal(ae.state_dict()[k], before[k]) for k in before)


def _pair(tmp_path):
    """A denoiser LoRA and a decoder LoRA of other alphas in one file, and the outputs they give when attached."""
    torch.manual_seed(0)
    net, ae = UNet(UNET_PRESETS["shapes-tiny"]).eval(), _autoencoder()
    den = _randomize(LoRA.create(net, rank=4, alpha=8, targets=("attention",), family="unet"))
    dec = _randomize(LoRA.create(ae, rank=2, alpha=3, targets=("decoder",)), seed=1)
    z = _latents(ae)
    dec.attach(ae)
    y = ae.decode(z)
    dec.detach()
    path = save_lora(tmp_path / "both.safetensors", den, {"base_model": "tiny"}, autoencoder=dec)
    return net, ae, den, dec, z, y, path


def test_one_file_routes_denoiser_and_decoder_keys(tmp_path):
    net, ae, den, dec, z, y, path = _pair(tmp_path)
    meta = read_lora_metadata(path)
    assert meta["version"] == 2 and meta["alpha"] == 8
    assert meta["autoencoder"] == {"rank": 2, "alpha": 3.0, "targets": list(dec.targets)}
    before_net, before_ae = _state(net), _state(ae)
    loaded = lora_for_model(path, net, autoencoder=ae)
    parts = {lora.name: (lora, root) for lora, root in zip(loaded.loras, loaded.roots)}
    assert sorted(parts) == ["both:autoencoder", "both:denoiser"]
    (on_ae, ae_root), (on_net, net_root) = parts["both:autoencoder"], parts["both:denoiser"]
    assert ae_root is ae and net_root is net and sorted(on_ae.names) == sorted(dec.names) \
        and sorted(on_net.names) == sorted(den.names)
    assert all(layer.alpha == 3.0 for layer in on_ae.layers)  # the decoder's own alpha, not the file's
    assert all(layer.alpha == 8.0 for layer in on_net.layers)
    loaded.attach()
    assert torch.equal(ae.decode(z), y)
    loaded.merge()
    torch.testing.assert_close(ae.decode(z), y, atol=1e-5, rtol=1e-5)
    loaded.unmerge().detach()
    assert all(torch.equal(ae.state_dict()[k], before_ae[k]) for k in before_ae)
    assert all(torch.equal(net.state_dict()[k], before_net[k]) for k in before_net)
    # A denoiser-only file stays version 1 (older latentdiff reads it).
    assert read_lora_metadata(save_lora(tmp_path / "den.safetensors", den))["version"] == 1


def test_decoder_keys_that_fit_nothing_are_refused(tmp_path):
    net, ae, *_, path = _pair(tmp_path)
    before = _state(ae)
    with pytest.raises(ValueError, match="2 autoencoder .decoder. layers|autoencoder \\(decoder\\) layers"):
        lora_for_model(path, net)  # no autoencoder to load them on
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(path)
    odd = {**state, "autoencoder.decoder.up_blocks.9.resnets.0.conv1.lora_A.weight": torch.zeros(2, 8, 3, 3),
           "autoencoder.decoder.up_blocks.9.resnets.0.conv1.lora_B.weight": torch.zeros(8, 2, 1, 1)}
    save_file(odd, tmp_path / "odd.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"1 LoRA layers match no layer.*autoencoder: decoder\.up_blocks\.9\.resnets"):
        lora_for_model(tmp_path / "odd.safetensors", net, autoencoder=ae)
    with pytest.raises(ValueError, match="made for another architecture"):
        lora_for_model(path, net, autoencoder=_autoencoder(width=16))  # same names, other widths
    assert json.loads(meta[METADATA_KEY])["autoencoder"]["rank"] == 2
    assert all(torch.equal(ae.state_dict()[k], before[k]) for k in before)
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in [*ae.modules(), *net.modules()])


def test_train_lora_with_decoder_rank_lowers_the_new_colours_reconstruction_error(tmp_path):
    """train-lora --set decoder_rank=4 on a tiny orange cache of the bundled model: one file with both LoRAs, which
    Pipeline.load_lora attaches; the decoder's round trip of the training scenes gets closer to the images."""
    from latentdiff.cli import main
    from latentdiff.data.cache import LatentCache
    from latentdiff.data.shapes import render, scene_from_dict, to_tensor
    from latentdiff.default import verify

    model = verify()
    main(["cache", "--autoencoder", str(model / "autoencoder"), "--out", str(tmp_path / "cache"),
          "--set", "num_images=8", "--set", "image_size=32", "--set", 'extra_colors=["orange"]'])
    args = ["train-lora", "--preset", "shapes-test", "--cache", str(tmp_path / "cache"), "--set", "decoder_rank=4",
            "--set", "lr=3e-3", "--set", "lr_schedule=constant", "--set", "save_every=6"]
    main([*args, "--out", str(tmp_path / "run"), "--set", "steps=12"])
    path = tmp_path / "run" / "lora.safetensors"
    assert read_lora_metadata(path)["autoencoder"]["rank"] == 4
    # Exact resume: 6 steps, then on to 12 from the checkpoint, write the same file as 12 in one go.
    main([*args, "--out", str(tmp_path / "half"), "--set", "steps=6"])
    main([*args, "--out", str(tmp_path / "half"), "--set", "steps=12", "--resume"])
    assert load_file(tmp_path / "half" / "lora.safetensors").keys() == load_file(path).keys()
    assert all(torch.equal(v, load_file(path)[k]) for k, v in load_file(tmp_path / "half" / "lora.safetensors").items())
    cache = LatentCache(tmp_path / "cache")
    images = torch.stack([to_tensor(render(scene_from_dict(m["scene"]), 32, seed=i)) for i, m in enumerate(cache.meta)])
    pipe = latentdiff.load()
    before = _state(pipe.autoencoder)

    def error() -> float:
        with torch.no_grad():
            return (pipe.autoencoder.decode(pipe.autoencoder.encode(images)) - images).abs().mean().item()

    base = error()
    lora = pipe.load_lora(path)
    assert len(lora.loras) == 2 and any(root is pipe.autoencoder for root in lora.roots)
    tuned = error()
    assert tuned < 0.9 * base, (base, tuned)
    pipe.unload_loras()
    assert error() == base
    assert all(torch.equal(pipe.autoencoder.state_dict()[k], before[k]) for k in before)


def test_decoder_rank_needs_a_cache_with_scenes():
    from latentdiff.train.lora import LoRATrainConfig, check_scenes

    class Cache(list):  # a folder cache's items: captions, no scenes
        def __init__(self):
            super().__init__([0, 0])
            self.meta = [{"caption": "a cat", "scene": None}, {"caption": "a dog"}]

    with pytest.raises(ValueError, match="2 of the 2 items of c have none: use a cache of shapes data"):
        check_scenes(Cache(), LoRATrainConfig(cache="c", decoder_rank=8))
