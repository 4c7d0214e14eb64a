"""Tiled encode/decode, padding, and low-precision decoding with an fp32 fallback."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from test_models import one_thread, tiny_vae  # noqa: F401 (one_thread: an autouse fixture)

from latentdiff.models.vae_inference import (
    _blend_tiles,
    decode_to_size,
    decode_with_fallback,
    encode_padded,
    tile_starts,
    tiled_decode,
    tiled_encode,
)


def smooth_images(b=1, size=64, seed=0) -> torch.Tensor:
    """Low-frequency images in [-1, 1] (closer to photos than white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, size // 8, size // 8, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (64, 32, 8), (33, 32, 4), (20, 32, 8), (512, 96, 16)])
def test_tile_starts_cover_everything_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and (starts[-1] + tile == length or (length <= tile and starts == [0]))
    for a, b in itertools.pairwise(starts):
        assert a + tile - b >= overlap  # neighbours share at least the overlap
        assert b > a
    with pytest.raises(ValueError, match="larger than the overlap"):
        tile_starts(100, 8, 8)


@pytest.mark.parametrize("up", [True, False])
def test_blending_is_exact_for_a_local_operation(up):
    """For an operation without any context (per pixel), tiling and blending must reproduce it exactly:
    this isolates the tile bookkeeping and the weight normalization from what GroupNorm does."""
    x = torch.randn(2, 3, 40, 56)
    if up:
        def fn(w):
            return F.interpolate(w * 2 + 1, scale_factor=4, mode="nearest")
        got = _blend_tiles(fn, x, tile=16, overlap=4, scale_num=4, scale_den=1, out_channels=3)
    else:
        def fn(w):
            return F.avg_pool2d(w * 2 + 1, 4)
        got = _blend_tiles(fn, x, tile=16, overlap=8, scale_num=1, scale_den=4, out_channels=3)
    torch.testing.assert_close(got, fn(x), atol=1e-5, rtol=1e-5)


def seam_mask(size: int, starts: list[int], tile: int, margin: int) -> torch.Tensor:
    """True away from tile edges: farther than ``margin`` pixels from every interior tile border."""
    ok = torch.ones(size, dtype=torch.bool)
    for s in starts:
        for edge in (s, s + tile):
            if 0 < edge < size:
                ok[max(0, edge - margin): edge + margin] = False
    return ok


def test_tiled_decode_and_encode_match_untiled_away_from_seams():
    """GroupNorm sees one tile's statistics instead of the image's, so a tiled result is close to, not equal
    to, the untiled one; the gap shrinks as tiles grow. A random tiny network (2 channels per group) magnifies
    the effect; benchmarks/autoencoder.py measures it for a trained autoencoder at 512-1024 px."""
    torch.manual_seed(0)
    vae = tiny_vae()  # factor 2
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))  # stationary: tiles alike
    full = vae.decode(z)
    away_error = {}
    for tile in (24, 32):
        diff = (tiled_decode(vae, z, tile=tile, overlap=8) - full).abs()
        mask1d = seam_mask(96, [s * 2 for s in tile_starts(48, tile, 8)], tile * 2, margin=8)
        away_error[tile] = diff[..., mask1d[:, None] & mask1d[None, :]].mean().item()
        assert diff.max() < 1.5 * full.abs().max()  # no seam blows up
    # Measured: 0.030 and 0.020 against a mean |output| of 0.28 (std 0.37).
    assert away_error[24] < 0.15 * full.std() and away_error[32] < 0.8 * away_error[24], away_error
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    zt, z_full = tiled_encode(vae, x, tile=48, overlap=16), vae.encode(x)
    assert zt.shape == z_full.shape
    assert (zt - z_full).abs().mean() < 0.1 * z_full.abs().mean()  # measured 0.015 vs 0.31
    with pytest.raises(ValueError, match="multiples of the autoencoder's factor 2"):
        tiled_encode(vae, x, tile=47, overlap=16)


def test_one_tile_is_the_untiled_result_exactly():
    vae = tiny_vae()
    x = smooth_images(size=32)
    z = vae.encode(x)
    torch.testing.assert_close(tiled_decode(vae, z, tile=64, overlap=8), vae.decode(z))
    torch.testing.assert_close(tiled_encode(vae, x, tile=64, overlap=8), z)


def test_sizes_the_factor_does_not_divide_are_refused_or_padded():
    vae = tiny_vae()  # factor 2
    x = smooth_images(size=32)[..., :31, :29]
    with pytest.raises(ValueError, match="not divisible by the autoencoder's factor 2: pad or crop"):
        vae.encode(x)
    z, size = encode_padded(vae, x)
    assert size == (31, 29) and z.shape[-2:] == (16, 15)
    out = decode_to_size(vae, z, size)
    assert out.shape == x.shape
    z2, _ = encode_padded(vae, x, tile=16, overlap=4)  # tiled path takes the same padding
    assert decode_to_size(vae, z2, size, tile=8, overlap=2).shape == x.shape


def test_low_precision_decode_falls_back_to_fp32_when_not_finite(capsys):
    vae = tiny_vae()
    z = vae.encode(smooth_images(size=32))
    reference = vae.decode(z)
    ok = decode_with_fallback(vae, z, "bf16")
    assert ok.dtype == torch.float32 and torch.isfinite(ok).all()
    assert (ok - reference).abs().max() < 0.1  # bf16 keeps ~3 significant digits
    assert "fp32" not in capsys.readouterr().err

    def overflow_in_low_precision(module, inputs, output):
        """What an fp16 overflow looks like: inf wherever the layer did not run in fp32."""
        return output if output.dtype == torch.float32 else torch.full_like(output, float("inf"))

    handle = vae.decoder.conv_out.register_forward_hook(overflow_in_low_precision)
    try:
        for precision in ("bf16", "fp16"):
            out = decode_with_fallback(vae, z, precision)
            torch.testing.assert_close(out, reference)
            assert f"decode in {precision} gave non-finite values; decoding again in fp32" in capsys.readouterr().err
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the hook really does break a low-precision decode
            assert not torch.isfinite(vae.decode(z)).all()
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="precision must be one of"):
        decode_with_fallback(vae, z, "int8")
