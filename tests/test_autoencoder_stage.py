"""Autoencoder stage: presets, per-channel latent statistics, the latent-stats command."""

import json

import pytest
import torch
from test_models import one_thread, tiny_vae  # noqa: F401 (one_thread: an autouse fixture)

from latentdiff.cli import main
from latentdiff.components import load_autoencoder, save_autoencoder
from latentdiff.data.cache import LatentCache, build_cache
from latentdiff.models.autoencoder import (
    PRESETS,
    AutoencoderConfig,
    AutoencoderKL,
    compute_latent_stats,
    set_latent_stats,
)


def images(b=4, size=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------- presets and latent statistics


@pytest.mark.parametrize("f", [4, 8, 16])
@pytest.mark.parametrize("c", [4, 8, 16])
def test_small_presets_have_the_factor_and_channels_in_their_name(f, c):
    cfg = PRESETS[f"small-f{f}c{c}"]
    assert cfg.factor == f and cfg.latent_channels == c
    if f == 16 and c == 8:  # build one and check the latent shape end to end
        z = AutoencoderKL(cfg).eval().encode(torch.zeros(1, 3, 32, 48))
        assert z.shape == (1, 8, 2, 3)


def test_per_channel_stats_give_each_channel_zero_mean_unit_variance():
    torch.manual_seed(0)
    vae = tiny_vae()
    with torch.no_grad():  # make channels very different so a single scalar could not normalize them all
        vae.quant_conv.weight.mul_(torch.tensor([1.0, 5.0, 0.2, 3.0] * 2).view(-1, 1, 1, 1))
        vae.quant_conv.bias.add_(torch.tensor([0.0, 2.0, -1.0, 0.5, 0, 0, 0, 0]))
    batches = [images(seed=s) for s in range(3)]
    scale, shift = compute_latent_stats(vae, batches, sample=False, per_channel=True)
    assert isinstance(scale, tuple) and len(scale) == 4 and len(shift) == 4
    set_latent_stats(vae, scale, shift)
    with torch.no_grad():
        lat = torch.cat([vae.encode(b) for b in batches])  # (N, 4, h, w)
    mean, rms = lat.mean(dim=(0, 2, 3)), lat.pow(2).mean(dim=(0, 2, 3)).sqrt()
    torch.testing.assert_close(mean, torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(rms, torch.ones(4), atol=1e-4, rtol=0)
    # A scalar scale cannot do that: the per-channel spread stays.
    set_latent_stats(vae, *compute_latent_stats(vae, batches, sample=False))
    with torch.no_grad():
        spread = torch.cat([vae.encode(b) for b in batches]).std(dim=(0, 2, 3))
    assert spread.max() / spread.min() > 3
    # normalize and denormalize are inverses in both modes.
    z = torch.randn(2, 4, 3, 3)
    set_latent_stats(vae, scale, shift)
    torch.testing.assert_close(vae.denormalize(vae.normalize(z)), z)


def test_channel_stats_are_checked_and_round_trip_through_the_folder(tmp_path):
    with pytest.raises(ValueError, match="one value per channel"):
        AutoencoderConfig(latent_channels=4, channel_scale=(1.0, 2.0), channel_shift=(0.0, 0.0))
    with pytest.raises(ValueError, match="set both"):
        AutoencoderConfig(latent_channels=2, channel_scale=(1.0, 2.0))
    vae = tiny_vae()
    set_latent_stats(vae, (0.5, 1.0, 2.0, 4.0), (0.1, 0.2, 0.3, 0.4))
    save_autoencoder(tmp_path / "ae", vae)
    loaded = load_autoencoder(tmp_path / "ae")
    assert loaded.config.channel_scale == (0.5, 1.0, 2.0, 4.0)
    x = images()
    torch.testing.assert_close(loaded.encode(x), vae.encode(x))


def test_latent_stats_command_rewrites_the_config_that_cache_users_read(tmp_path, capsys):
    """`latentdiff latent-stats` stores per-channel stats in the autoencoder folder; the latent cache holds raw
    latents and the denoiser side normalizes them with that autoencoder's config, so they come out unit-scaled."""
    vae = tiny_vae()
    save_autoencoder(tmp_path / "ae", vae)
    main(["latent-stats", "--autoencoder", str(tmp_path / "ae"), "--data", "shapes", "--set", "num_images=16",
          "--set", "image_size=16", "--set", "per_channel=true"])
    out = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "ae" / "config.json").read_text())["config"]
    assert saved["channel_scale"] == pytest.approx(out["scale"]) and len(saved["channel_shift"]) == 4
    ae = load_autoencoder(tmp_path / "ae")
    from latentdiff.data.shapes import ShapesDataset

    cache = LatentCache(build_cache(ae, ShapesDataset(16, size=16, seed=0), tmp_path / "cache", quiet=True))
    raw, _ = cache.sample(torch.arange(16), torch.Generator().manual_seed(0))
    lat = ae.normalize(raw)
    assert lat.mean(dim=(0, 2, 3)).abs().max() < 0.2
    assert (lat.std(dim=(0, 2, 3)) - 1).abs().max() < 0.2


# ----------------------------------------------------------------------------- data: scikit-image photographs, folders


def test_skimage_crops_are_deterministic_and_held_out_images_whole():
    pytest.importorskip("skimage", reason="scikit-image (dev extra) provides the photographs")
    from latentdiff.data import make_image_dataset
    from latentdiff.data.natural import SKIMAGE_HELDOUT, SKIMAGE_TRAIN, skimage_heldout

    assert not set(SKIMAGE_TRAIN) & set(SKIMAGE_HELDOUT)
    crops = make_image_dataset("skimage", 5, 24, seed=3)
    a, b = crops[4]["image"], make_image_dataset("skimage", 5, 24, seed=3)[4]["image"]
    assert a.shape == (3, 24, 24) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(crops[0]["image"], crops[1]["image"])
    held = skimage_heldout(multiple=16, max_side=128)
    assert len(held) == 3 and all(x.shape[-1] % 16 == 0 and x.shape[-2] % 16 == 0 for x in held)
    assert max(x.shape[-1] for x in held) == 128


def test_train_vae_on_a_folder_of_mixed_sizes_formats_and_broken_files(tmp_path, capsys):
    """`latentdiff train-vae --data DIR` on the zoo of test_folder.py (PNG/JPEG, CMYK, 16-bit, palette,
    grayscale, RGBA, tiny, truncated, zero-byte, wide and tall): trains, names every skipped file."""
    from test_folder import BAD, build_folder

    data = tmp_path / "images"
    data.mkdir()
    build_folder(data)
    main(["train-vae", "--preset", "shapes-test", "--data", str(data), "--out", str(tmp_path / "run"),
          "--set", "image_size=16"])
    err = capsys.readouterr().err
    assert f"skipped {len(BAD)} unreadable or tiny image(s)" in err
    for name in BAD:
        assert name in err
    assert (tmp_path / "run" / "autoencoder" / "model.safetensors").is_file()


def test_a_huge_image_is_skipped_and_named(tmp_path, monkeypatch, capsys):
    """A decompression bomb (more pixels than Pillow's limit) is refused at scan time, not mid-epoch."""
    from PIL import Image

    from latentdiff.data.folder import ImageFolder

    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "ok.png")
    Image.new("RGB", (300, 300), (0, 0, 0)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300x300 > 2x the limit: a "bomb" at this limit
    folder = ImageFolder(tmp_path, 16)
    assert [p.name for p in folder.files] == ["ok.png"]
    assert "huge.png" in capsys.readouterr().err and "DecompressionBomb" in folder.skipped[0][1]


def test_diffusers_export_refuses_what_it_cannot_carry():
    from latentdiff.interop.diffusers_folder import vae_config_to_diffusers

    cfg = AutoencoderConfig(latent_channels=2)
    assert vae_config_to_diffusers(cfg)["scaling_factor"] == 1.0
    with pytest.raises(ValueError, match="per-channel latent statistics"):
        vae_config_to_diffusers(AutoencoderConfig(latent_channels=2, channel_scale=(1.0, 2.0), channel_shift=(0, 0)))
    with pytest.raises(ValueError, match="no diffusers AutoencoderKL form"):
        vae_config_to_diffusers(AutoencoderConfig(regularizer="vq"))
