"""Tiled encode/decode, padding, and low-precision decoding with an fp32 fallback."""

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from test_models import one_thread, tiny_vae  # noqa: F401 (one_thread: an autouse fixture)

from latentdiff.models.vae_inference import (
    WholeImageGroupNorm,
    _blend_tiles,
    _owned,
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
        def fn(w, owned=None):
            return F.interpolate(w * 2 + 1, scale_factor=4, mode="nearest")
        got = _blend_tiles(fn, x, tile=16, overlap=4, scale_num=4, scale_den=1, out_channels=3)
    else:
        def fn(w, owned=None):
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


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 8), (64, 32, 16), (20, 32, 8)])
def test_owned_regions_partition_the_line(length, tile, overlap):
    """Statistics count every position once: the tiles' owned ranges tile the line without gaps or overlap."""
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.int64)
    for s, (a, b) in zip(starts, _owned(starts, tile, length), strict=True):
        assert 0 <= a < b <= min(tile, length)
        covered[s + a : s + b] += 1
    assert (covered == 1).all()


def test_whole_image_group_norm_on_one_tile_is_group_norm():
    """With the whole image as the only tile, the tallied statistics are GroupNorm's own: same output, before
    and after freezing them."""
    torch.manual_seed(0)
    layer = torch.nn.GroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 8, 6, 10) * 3 + 1
    reference = layer(x)
    stats = WholeImageGroupNorm()
    run = stats.wrap(lambda window, norm: norm(layer, window))  # a tiled part whose only layer is the GroupNorm
    torch.testing.assert_close(run(x, (0, 6, 0, 10)), reference)
    stats.freeze()
    torch.testing.assert_close(run(x, (0, 6, 0, 10)), reference, atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(layer)  # the module itself is never changed


def test_tiled_decode_and_encode_match_untiled_away_from_seams():
    """With whole-image GroupNorm statistics (``passes=None``: exact) the tiles reproduce the untiled result to
    float precision wherever the convolutions' zero padding at tile edges does not reach; per-tile statistics
    (``passes=1``, what tiling did before) miss by far more. A random tiny network (2 channels per norm group)
    is a hard case: its per-tile statistics differ strongly between tiles."""
    torch.manual_seed(0)
    vae = tiny_vae()  # factor 2; decoder tiles run 9 GroupNorm layers, encoder tiles 4
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))  # 3 x 3 tiles of 32 latents
    full = vae.decode(z)
    away = seam_mask(128, [s * 2 for s in tile_starts(64, 32, 16)], 64, margin=24)
    away = away[:, None] & away[None, :]
    error = {}
    for passes in (1, 2, None):
        diff = (tiled_decode(vae, z, tile=32, overlap=16, passes=passes) - full).abs()
        error[passes] = (diff[..., away].max().item(), diff.max().item())
    # Measured: away from seams 0.058, 0.025, 8e-7; everywhere 0.17, 0.13, 0.0039 (output std 0.37).
    assert error[None][0] < 1e-5, error
    assert error[None][1] < 0.02, error  # seams: only the tile edges' zero padding, blended away
    assert error[1][0] > 1e3 * error[None][0] and error[2][0] < error[1][0], error

    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z_full = vae.encode(x)
    latents = {p: tiled_encode(vae, x, tile=64, overlap=32, passes=p) for p in (1, None)}
    assert latents[None].shape == z_full.shape
    # The mid self-attention runs on the whole feature map, so a seam error would spread everywhere: compare all.
    assert (latents[None] - z_full).abs().max() < 1e-5  # measured 1.1e-6
    assert (latents[1] - z_full).abs().max() > 0.01  # per-tile statistics: 0.05
    with pytest.raises(ValueError, match="multiples of the autoencoder's factor 2"):
        tiled_encode(vae, x, tile=47, overlap=16)
    with pytest.raises(ValueError, match="passes must be at least 1"):
        tiled_decode(vae, z, tile=32, overlap=16, passes=0)
    assert "forward" not in vars(vae.encoder) and "forward" not in vars(vae.decoder)


def test_tiled_calls_from_two_threads_give_the_serial_results():
    """Tiling changes no module (the statistics travel with the call), so one autoencoder serves tiled decodes and
    encodes from two threads at once, with exactly the results of the same calls one after another."""
    torch.manual_seed(0)
    vae = tiny_vae()
    latents = [torch.randn(1, 4, 48, 40, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    images = [smooth_images(size=96, seed=i) for i in range(2)]

    def work(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (tiled_decode(vae, latents[i], tile=32, overlap=16, passes=2),
                tiled_encode(vae, images[i], tile=64, overlap=32, passes=2))

    serial = [work(i) for i in range(2)]
    start = threading.Barrier(2)

    def repeatedly(i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        start.wait()  # both threads tile at the same time
        return [work(i) for _ in range(3)]

    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(repeatedly, range(2)))
    for i in range(2):
        for decoded, encoded in concurrent[i]:
            assert torch.equal(decoded, serial[i][0]) and torch.equal(encoded, serial[i][1])
    assert "forward" not in vars(vae.encoder) and "forward" not in vars(vae.decoder)


def test_tiles_run_a_vq_autoencoder_too():
    from test_vq import tiny_vq

    torch.manual_seed(0)
    vq = tiny_vq().eval()
    x = smooth_images(size=64)
    z = vq.encode(x)
    torch.testing.assert_close(tiled_encode(vq, x, tile=48, overlap=32, passes=None), z, atol=1e-4, rtol=1e-4)
    z = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    # The outer quarter of a 32-latent overlap (8) covers the tiny decoder's reach (about 7 latents).
    torch.testing.assert_close(tiled_decode(vq, z, tile=40, overlap=32, passes=None), vq.decode(z),
                               atol=1e-4, rtol=1e-4)


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
