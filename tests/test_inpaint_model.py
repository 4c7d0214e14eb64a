"""Inpainting models: a denoiser that sees the mask and the masked image's latents as concat channels (SD
inpainting's 9-channel U-Net layout).

The proofs: a tiny random-weight diffusers StableDiffusionInpaintPipeline saved with ``save_pretrained`` and opened
by ``latentdiff.load`` gives diffusers' own image to 1/255 (same seed, steps and scheduler) at strength 1 and 0.6;
the same model as a single original-layout file and exported back to a diffusers folder loads to identical
parameters; an inpainting model without its image and mask is refused before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.interop import open_model
from latentdiff.interop.convert import save_diffusers
from latentdiff.interop.single_file import read_single_file, to_original_state
from latentdiff.io import write_safetensors

diffusers = pytest.importorskip("diffusers", reason="diffusers builds the reference pipeline")
pytest.importorskip("transformers", reason="the SD text encoders are transformers CLIP models")

from interop_tiny import SD1_OVERRIDES, one_thread, tiny_sd_pipeline, tiny_unet


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    """A tiny StableDiffusionInpaintPipeline (9-channel U-Net). Its VAE posterior is made near-certain (logvar
    -30): diffusers encodes to a posterior sample, latentdiff to its mode (tests/test_interop_load.py, img2img)."""
    tmp = tmp_path_factory.mktemp("inpaint")
    base = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline(tmp / "sd"), safety_checker=None)
    with torch.no_grad():
        base.vae.quant_conv.weight[4:] = 0
        base.vae.quant_conv.bias[4:] = -30
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=tiny_unet("sd1", in_channels=9),
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "inpaint")
    return tmp / "inpaint"


@pytest.fixture(scope="module")
def picture_and_mask():
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.repeat(np.repeat(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), 4, 0), 4, 1))
    mask = np.zeros((16, 16), np.uint8)
    mask[3:11, 5:14] = 255  # not aligned to the latent grid: the nearest-neighbour downsampling matters
    return image, Image.fromarray(mask)


def _images01(pt: torch.Tensor) -> np.ndarray:
    return ((pt.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def test_inpainting_folder_matches_diffusers(inpaint_folder, picture_and_mask, capsys):
    image, mask = picture_and_mask
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(inpaint_folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    pipe = latentdiff.load(inpaint_folder)
    assert pipe.concat_inputs == "inpaint" and pipe.denoiser.network.config.concat_channels == 5
    kw = {"num_inference_steps": 5, "guidance_scale": 3.0, "output_type": "np"}
    ours = {"steps": 5, "sampler": "euler", "schedule": "leading", "guidance": 3.0, "output": "pt",
            "paste_back": False}  # diffusers pastes nothing back
    # Strength 1: diffusers draws the start noise first (its encodes of the masked image come after it).
    expected = ref("a red circle", image=image, mask_image=mask, strength=1.0,
                   generator=torch.Generator().manual_seed(7), **kw).images
    got = pipe.generate("a red circle", image=image, mask=mask, strength=1.0, seed=7, **ours)
    diff = np.abs(_images01(got) - expected).max()
    assert diff <= 1 / 255, f"strength 1: max pixel difference {diff * 255:.2f}/255"
    # Strength 0.6: diffusers samples the image's posterior first, then the noise: latentdiff is given that noise.
    expected = ref("a red circle", image=image, mask_image=mask, strength=0.6,
                   generator=torch.Generator().manual_seed(7), **kw).images
    g = torch.Generator().manual_seed(7)
    torch.randn(1, 4, 8, 8, generator=g)
    got = pipe.generate("a red circle", image=image, mask=mask, strength=0.6, latents=torch.randn(1, 4, 8, 8, generator=g),
                        **ours)
    diff = np.abs(_images01(got) - expected).max()
    assert diff <= 1 / 255, f"strength 0.6: max pixel difference {diff * 255:.2f}/255"
    # The mask reaches the network: another mask gives another image.
    other = pipe.generate("a red circle", image=image, mask=np.full((16, 16), 255, np.uint8), strength=1.0, seed=7,
                          **ours)
    assert (other - got).abs().max() > 0.01


def test_inpainting_model_needs_its_image_and_mask(inpaint_folder, picture_and_mask):
    image, _ = picture_and_mask
    pipe = latentdiff.load(inpaint_folder)
    for kw in ({}, {"image": image}):
        with pytest.raises(ValueError, match="is an inpainting model .* pass image= and mask="):
            pipe.generate("a red circle", steps=2, **kw)


def test_inpainting_single_file_and_export_round_trip(inpaint_folder, picture_and_mask, tmp_path, capsys):
    model = open_model(inpaint_folder)
    path = tmp_path / "inpaint.safetensors"
    write_safetensors(path, to_original_state(model))
    back = read_single_file(path, tokenizer=inpaint_folder, overrides=SD1_OVERRIDES)
    assert back.spec.unet == model.spec.unet and back.index.concat == "inpaint"
    assert any("inpainting U-Net" in note for note in back.notes)
    for name, p in model.denoiser.network.state_dict().items():
        assert torch.equal(p, back.denoiser.network.state_dict()[name]), name
    # Exported to diffusers: a StableDiffusionInpaintPipeline folder again, the same image.
    save_diffusers(model, tmp_path / "exported")
    assert diffusers.StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "exported").unet.config.in_channels == 9
    image, mask = picture_and_mask
    kw = {"mask": mask, "steps": 2, "sampler": "euler", "seed": 3, "output": "pt"}
    a = latentdiff.load(inpaint_folder).generate("a cat", image=image, **kw)
    b = latentdiff.load(tmp_path / "exported").generate("a cat", image=image, **kw)
    assert torch.equal(a, b)
