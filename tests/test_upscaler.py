"""SD's x4 upscaler layout: a U-Net that takes the low-res RGB image at the latent's size (7 input channels), the
image noised by its own DDPM schedule to a level the U-Net is told as a class label, a factor-4 VAE, v-prediction.

The proofs: a tiny random-weight diffusers StableDiffusionUpscalePipeline saved with ``save_pretrained`` and opened by
``latentdiff.load`` gives diffusers' own image to 1/255 (same seed, steps and scheduler; the low-res noise is drawn
first from the same generator, as diffusers does), at two noise levels; written as a latentdiff folder it loads to
the same image; bad sizes and noise levels are refused before any work, naming what would fit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.interop.convert import convert

diffusers = pytest.importorskip("diffusers", reason="diffusers builds the reference pipeline")
pytest.importorskip("transformers", reason="the SD text encoders are transformers CLIP models")

from interop_tiny import one_thread, x4_upscale_pipeline


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def upscale_folder(tmp_path_factory):
    return x4_upscale_pipeline(tmp_path_factory.mktemp("x4") / "upscaler")


@pytest.fixture(scope="module")
def low_res():
    rng = np.random.default_rng(0)
    return Image.fromarray(np.repeat(np.repeat(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), 2, 0), 2, 1))  # 8x8


OURS = {"steps": 4, "sampler": "ddim", "schedule": "leading", "guidance": 3.0, "output": "pt"}


def _images01(pt: torch.Tensor) -> np.ndarray:
    return ((pt.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def test_upscaler_folder_loads_in_its_layout(upscale_folder, capsys):
    pipe = latentdiff.load(upscale_folder)
    out = capsys.readouterr().out
    assert "super-resolution x4" in out and "noise_level 0..350 (default 20)" in out
    cfg = pipe.denoiser.network.config
    assert (cfg.in_channels, cfg.concat_channels, cfg.num_classes) == (4, 3, 1000)
    assert cfg.attention_levels == (1, 2) and cfg.cross_only_levels == (1,)
    assert pipe.concat_inputs == "low_res" and pipe.index.upscale == 4 and pipe.autoencoder.factor == 4
    assert pipe.index.noise_augmentation.betas == "upscaler" and pipe.index.noise_augmentation.max_level == 350
    assert pipe.autoencoder.config.scale_factor == pytest.approx(0.08333)


@pytest.mark.parametrize("noise_level", [20, 250])
def test_upscaler_matches_diffusers(upscale_folder, low_res, noise_level):
    ref = diffusers.StableDiffusionUpscalePipeline.from_pretrained(upscale_folder)
    ref.set_progress_bar_config(disable=True)
    expected = ref("a red circle", image=low_res, num_inference_steps=4, guidance_scale=3.0, noise_level=noise_level,
                   generator=torch.Generator().manual_seed(7), output_type="np").images
    pipe = latentdiff.load(upscale_folder)
    got = pipe.generate("a red circle", low_res=low_res, noise_level=noise_level, seed=7, **OURS)
    assert got.shape == (1, 3, 32, 32) and expected.shape == (1, 32, 32, 3)
    diff = np.abs(_images01(got) - expected).max()
    assert diff <= 1 / 255, f"noise level {noise_level}: max pixel difference {diff * 255:.2f}/255"


def test_noise_level_reaches_the_network(upscale_folder, low_res):
    """Another level noises the input differently and is another class label: both change the image; the default
    level is 20."""
    pipe = latentdiff.load(upscale_folder)
    at_20 = pipe.generate("a red circle", low_res=low_res, noise_level=20, seed=7, **OURS)
    assert torch.equal(pipe.generate("a red circle", low_res=low_res, seed=7, **OURS), at_20)
    assert (pipe.generate("a red circle", low_res=low_res, noise_level=0, seed=7, **OURS) - at_20).abs().max() > 1e-3


def test_upscaler_round_trips_through_a_latentdiff_folder(upscale_folder, low_res, tmp_path):
    convert(upscale_folder, tmp_path / "ours", "latentdiff")
    a = latentdiff.load(upscale_folder).generate("a red circle", low_res=low_res, noise_level=50, seed=3, **OURS)
    b = latentdiff.load(tmp_path / "ours").generate("a red circle", low_res=low_res, noise_level=50, seed=3, **OURS)
    assert torch.equal(a, b)


@pytest.mark.parametrize("noise_level", [-1, 351, 2.5])
def test_noise_level_out_of_range_is_refused(upscale_folder, low_res, noise_level):
    pipe = latentdiff.load(upscale_folder)
    with pytest.raises(ValueError, match=r"noise_level"):
        pipe.generate("a red circle", low_res=low_res, noise_level=noise_level, **OURS)


def test_low_res_size_the_unet_cannot_take_is_refused(upscale_folder):
    pipe = latentdiff.load(upscale_folder)
    with pytest.raises(ValueError, match=r"a 10x6 low-res image does not fit this model: its sides must be multiples "
                                         r"of 4 .* crop or resize it to 8x8"):
        pipe.generate("a red circle", low_res=np.zeros((6, 10, 3), np.uint8), **OURS)


def test_noise_level_on_another_model_is_refused(tmp_path):
    from interop_tiny import tiny_sd_pipeline

    pipe = latentdiff.load(tiny_sd_pipeline(tmp_path / "sd"))
    with pytest.raises(ValueError, match="noise_level given, but .* does not noise its low-res input"):
        pipe.generate("a red circle", noise_level=20, steps=1)


def test_upscale_command_on_the_upscaler_folder(upscale_folder, low_res, tmp_path, capsys):
    """`latentdiff upscale IN.png --model FOLDER --prompt ... --noise-level N` is generate(low_res=, noise_level=);
    the PNG records the level; --noise-level without --upscale is refused before loading."""
    from latentdiff.cli import main
    from latentdiff.images import read_parameters

    low_res.save(tmp_path / "low.png")
    main(["upscale", str(tmp_path / "low.png"), "-o", str(tmp_path / "up.png"), "--model", str(upscale_folder),
          "--prompt", "a red circle", "--steps", "2", "--sampler", "ddim", "--guidance", "3", "--noise-level", "40"])
    up = Image.open(tmp_path / "up.png")
    expected = latentdiff.load(upscale_folder).generate("a red circle", low_res=low_res, noise_level=40, steps=2,
                                                        sampler="ddim", guidance=3.0, output="np")
    assert up.size == (32, 32) and np.array_equal(np.asarray(up), expected[0])
    assert read_parameters(tmp_path / "up.png")["noise_level"] == 40
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "x", "-o", str(tmp_path / "g.png"), "--model", str(upscale_folder), "--noise-level", "5"])
    out = capsys.readouterr()
    assert "--noise-level is the noise added to an --upscale image" in out.err and "detected" not in out.out


def test_cross_only_levels_are_checked():
    from latentdiff.models.unet import UNet, UNetConfig

    base = {"model_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "num_heads": 2, "context_dim": 12,
            "norm_groups": 4, "attention_levels": (1,)}
    with pytest.raises(ValueError, match=r"cross_only_levels \[0\] have no attention"):
        UNetConfig(**base, cross_only_levels=(0,))
    with pytest.raises(ValueError, match="cross_only_levels cross-attend to cond.context: they need a context_dim"):
        UNetConfig(**{**base, "context_dim": None}, cross_only_levels=(1,))
    unet = UNet(UNetConfig(**base, cross_only_levels=(1,)))
    # The level's first attention reads the context (width 12); the middle block's stays self-attention.
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_k.in_features == 12
    assert unet.up_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.in_features == 12
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_k.in_features == 16


def test_upscaler_exports_as_a_diffusers_upscale_pipeline(upscale_folder, low_res, tmp_path):
    """convert --format diffusers writes a StableDiffusionUpscalePipeline (its low_res_scheduler and max_noise_level
    too) that diffusers opens and runs to the same image as the original (with the original's scheduler: our export
    writes an Euler one); a super-resolution model of another layout is refused before anything is written."""
    convert(upscale_folder, tmp_path / "back", "diffusers")
    orig = diffusers.StableDiffusionUpscalePipeline.from_pretrained(upscale_folder)
    back = diffusers.StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "back", scheduler=orig.scheduler)
    assert back.config.max_noise_level == 350
    assert torch.equal(back.low_res_scheduler.alphas_cumprod, orig.low_res_scheduler.alphas_cumprod)
    assert back.unet.config.only_cross_attention == [False, True, False]  # level 0 has no attention to restrict
    kw = {"image": low_res, "num_inference_steps": 2, "noise_level": 30, "output_type": "np"}
    for pipe in (orig, back):
        pipe.set_progress_bar_config(disable=True)
    a = orig("a red circle", generator=torch.Generator().manual_seed(1), **kw).images
    b = back("a red circle", generator=torch.Generator().manual_seed(1), **kw).images
    assert np.array_equal(a, b)

    from latentdiff.interop.convert import read_our_folder, save_diffusers

    convert(upscale_folder, tmp_path / "ours", "latentdiff")
    model = read_our_folder(tmp_path / "ours")
    model.index.noise_augmentation = None  # LDM's plain low-res concat: no diffusers pipeline takes it
    with pytest.raises(ValueError, match="only SD's x4 upscaler layout .* has a diffusers pipeline"):
        save_diffusers(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
