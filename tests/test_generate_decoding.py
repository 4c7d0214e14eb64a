"""Generation's decoding options end to end on a tiny model folder: tiles (explicit and automatic), low-precision
decoding with the fp32 fallback, and live previews from the folder's preview decoder (Python API and CLI)."""

import numpy as np
import pytest
import torch
from _tiny import one_thread  # noqa: F401 (autouse)
from PIL import Image

from latentdiff import cli
from latentdiff.components import DenoiserSpec, build_denoiser
from latentdiff.conditioning.text import TextEncoderConfig, build_text_encoder
from latentdiff.images import to_pil
from latentdiff.models import vae_inference
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.preview import PreviewConfig, PreviewDecoder, save_preview_decoder
from latentdiff.models.unet import UNetConfig
from latentdiff.models.vae_inference import tiled_decode
from latentdiff.pipeline import load
from latentdiff.train.denoiser import save_model_folder

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random model folder (factor-2 autoencoder, 2-level U-Net, hashed text encoder) with a preview decoder,
    and the same folder without one."""
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8))
    spec = DenoiserSpec(unet=UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                        attention_levels=(1,), num_heads=2, context_dim=16, vector_dim=16,
                                        norm_groups=8))
    text = build_text_encoder(TextEncoderConfig(dim=16, vocab_size=64, num_layers=1, num_heads=2))
    plain = save_model_folder(root / "plain", build_denoiser(spec), text, spec, ae, 32)
    with_preview = save_model_folder(root / "with_preview", build_denoiser(spec), text, spec, ae, 32)
    save_preview_decoder(with_preview / "preview_decoder",
                         PreviewDecoder(PreviewConfig(latent_channels=4, factor=2, channels=8, min_channels=8)))
    return plain, with_preview


def test_tiled_and_auto_tiled_decoding(model, monkeypatch):
    pipe = load(model[0])
    pipe.tile, pipe.tile_overlap = 16, 8  # 24x24 latents (48 px): 2 x 2 tiles
    kw = {"steps": 2, "seed": 1, "height": 48, "width": 48, "output": "pt"}
    z = pipe.generate(PROMPT, **{**kw, "output": "latent"})
    untiled = pipe.generate(PROMPT, tiled=False, **kw)
    torch.testing.assert_close(untiled, pipe.autoencoder.decode(z))
    tiled = pipe.generate(PROMPT, tiled=True, **kw)
    torch.testing.assert_close(tiled, tiled_decode(pipe.autoencoder, z, tile=16, overlap=8))
    assert 0 < (tiled - untiled).abs().max() < 0.5  # really tiled; close (tests/test_vae_inference.py: exactness)
    # Automatic: tiles only above AUTO_TILE_LATENTS latent positions.
    torch.testing.assert_close(pipe.generate(PROMPT, **kw), untiled)
    monkeypatch.setattr(vae_inference, "AUTO_TILE_LATENTS", 23 * 23)
    torch.testing.assert_close(pipe.generate(PROMPT, **kw), tiled)


def test_low_precision_decoding_falls_back_to_fp32(model, capsys):
    pipe = load(model[0])
    kw = {"steps": 2, "seed": 1, "output": "pt"}
    reference = pipe.generate(PROMPT, **kw)
    bf16 = pipe.generate(PROMPT, decode_precision="bf16", **kw)
    assert (bf16 - reference).abs().max() < 0.1 and "fp32" not in capsys.readouterr().err

    def overflow(module, inputs, output):  # an fp16-style overflow wherever the layer ran in low precision
        return output if output.dtype == torch.float32 else torch.full_like(output, float("inf"))

    handle = pipe.autoencoder.decoder.conv_out.register_forward_hook(overflow)
    try:
        for tiled in (False, True):
            out = pipe.generate(PROMPT, decode_precision="fp16", tiled=tiled, **kw)
            assert torch.isfinite(out).all()
            assert "decode in fp16 gave non-finite values; decoding again in fp32" in capsys.readouterr().err
        torch.testing.assert_close(out, pipe.generate(PROMPT, tiled=True, **kw))
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="precision must be one of"):
        pipe.generate(PROMPT, decode_precision="int8", **kw)


def test_previews_come_from_the_preview_decoder(model):
    pipe = load(model[1])
    assert pipe.preview_decoder is not None
    seen, estimates = [], {}
    pipe.generate([PROMPT, "a blue square"], steps=4, seed=0, preview=lambda i, im: seen.append((i, im)),
                  preview_every=2, callback=lambda info: estimates.__setitem__(info["i"], info["denoised"]))
    assert [i for i, _ in seen] == [0, 2] and sorted(estimates) == [0, 1, 2, 3]  # user callback still called
    assert seen[0][1].size == (2 * 32 + 3 * 2, 32 + 2 * 2)  # a grid of the two 32 px previews, 2 px padding
    one = []
    pipe.generate(PROMPT, steps=4, seed=0, preview=lambda i, im: one.append(im), preview_every=3,
                  callback=lambda info: estimates.__setitem__(info["i"], info["denoised"]))
    expected = to_pil(pipe.preview_decoder(estimates[3]))[0]
    assert len(one) == 2 and np.array_equal(np.asarray(one[1]), np.asarray(expected))
    with pytest.raises(ValueError, match="has no preview decoder: distill one"):
        load(model[0]).generate(PROMPT, steps=2, preview=lambda i, im: None)


def test_generate_cli_tiles_and_writes_previews(model, tmp_path, capsys):
    out, previews = tmp_path / "out.png", tmp_path / "previews"
    cli.main(["generate", PROMPT, "--model", str(model[1]), "--steps", "3", "--tiled", "--height", "64",
              "--width", "64", "--preview-every", "2", str(previews), "-o", str(out)])
    assert Image.open(out).size == (64, 64)
    assert sorted(p.name for p in previews.iterdir()) == ["step_000.png", "step_002.png"]
    for argv, message in (
        (["--preview-every", "2", str(previews)], "has no preview decoder"),
        (["--preview-every", "x", str(previews)], "--preview-every N must be a positive whole number"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", PROMPT, "--model", str(model[0]), "--steps", "1", "-o", str(out), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
