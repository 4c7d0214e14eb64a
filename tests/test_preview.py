"""The tiny preview decoder: shapes, FLOPs against the full decoder, distillation, save/load, CLI."""

import pytest
import torch
from test_models import one_thread, tiny_vae  # noqa: F401 (one_thread: an autouse fixture)

from latentdiff.cli import main
from latentdiff.components import save_autoencoder
from latentdiff.eval.reconstruction import psnr
from latentdiff.models.autoencoder import PRESETS, AutoencoderKL
from latentdiff.models.preview import (
    PreviewConfig,
    PreviewDecoder,
    flops,
    load_preview_decoder,
)
from latentdiff.train.preview import distill_preview


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_shapes_and_range(factor):
    dec = PreviewDecoder(PreviewConfig(latent_channels=4, factor=factor, channels=16, min_channels=8))
    out = dec(torch.randn(2, 4, 3, 5) * 10)
    assert out.shape == (2, 3, 3 * factor, 5 * factor) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="power of two"):
        PreviewConfig(factor=6)


def test_tens_of_times_fewer_flops_than_the_full_decoders():
    z = torch.zeros(1, 4, 8, 8)
    preview = flops(PreviewDecoder(PreviewConfig(4, 8)), z)  # default width
    sd = flops(AutoencoderKL(PRESETS["sd"]).eval().decode, z)  # the Stable Diffusion decoder's architecture
    assert sd / preview > 100, sd / preview  # measured 275x
    narrow = flops(PreviewDecoder(PreviewConfig(4, 8, channels=32, min_channels=8)), z)
    small = flops(AutoencoderKL(PRESETS["small-f8c4"]).eval().decode, z)
    assert small / narrow > 10, small / narrow  # measured 19x against our small CPU preset


def test_distillation_imitates_the_teacher_and_reloads(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_vae()  # factor 2
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2)]
    config = PreviewConfig(4, 2, channels=16, min_channels=8)
    with torch.no_grad():
        z = teacher.encode(batches[0])
        target = teacher.decode(z).clamp(-1, 1)
        before = psnr(PreviewDecoder(config)(z), target).mean()
    student = distill_preview(teacher, batches, steps=60, batch_size=8, lr=3e-3, config=config)
    with torch.no_grad():
        after = psnr(student(z), target).mean()
    assert after > before + 1, (before, after)  # learns the teacher's mapping (measured 14.9 -> 16.6 dB; a
    # random teacher on noise is a hard target: benchmarks/autoencoder.py measures a trained one)
    from latentdiff.models.preview import save_preview_decoder

    save_preview_decoder(tmp_path / "preview", student)
    loaded = load_preview_decoder(tmp_path / "preview")
    torch.testing.assert_close(loaded(z), student(z))
    with pytest.raises(ValueError, match="does not fit the autoencoder"):
        distill_preview(teacher, batches, steps=1, config=PreviewConfig(4, 8))


def test_distill_preview_cli(tmp_path):
    teacher = tiny_vae()
    save_autoencoder(tmp_path / "ae", teacher)
    main(["distill-preview", "--autoencoder", str(tmp_path / "ae"), "--data", "shapes", "--out",
          str(tmp_path / "pv"), "--steps", "2", "--set", "num_images=8", "--set", "image_size=16",
          "--set", "channels=8"])
    dec = load_preview_decoder(tmp_path / "pv")
    assert dec.config.factor == 2 and dec(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 8, 8)
