"""bf16 / fp16 inference on the CPU with channels-last convolutions (``runtime.low_precision_layout``): the
layout is switched on only for low precision on the CPU, restored afterwards, and gives the results of the
contiguous (NCHW) low-precision path to bf16 rounding; fp32 does not change at all."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_generate_decoding import PROMPT, model  # noqa: F401 (model: a module-scoped fixture)
from test_models import one_thread, tiny_vae  # noqa: F401 (one_thread: an autouse fixture)

from latentdiff.models import runtime
from latentdiff.models.runtime import autocast, low_precision_layout
from latentdiff.models.vae_inference import decode_with_fallback, tiled_decode, tiled_encode
from latentdiff.pipeline import load


def conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.ndim == 4 and p.shape[-1] > 1]  # 3x3 kernels: NHWC != NCHW


def nhwc(p: torch.Tensor) -> bool:
    return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS of a - b relative to the RMS of b (b: the reference)."""
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def smooth(size: int, seed: int = 0) -> torch.Tensor:
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic").clamp(-1, 1)


def test_layout_only_for_low_precision_on_the_cpu_and_restored():
    vae = tiny_vae()
    params = list(vae.parameters())
    cpu = torch.device("cpu")
    for precision in ("bf16", "fp16"):
        with low_precision_layout(precision, cpu, vae):
            assert all(nhwc(p) for p in conv_weights(vae))
        assert all(p.is_contiguous() for p in vae.parameters())
        assert list(vae.parameters()) == params  # the same Parameter objects (optimizers, hooks keep working)
    before = [p.data_ptr() for p in vae.parameters()]
    with low_precision_layout("fp32", cpu, vae), low_precision_layout("bf16", torch.device("meta"), vae):
        assert [p.data_ptr() for p in vae.parameters()] == before  # nothing touched: fp32, or not the CPU
    with pytest.raises(RuntimeError, match="boom"), low_precision_layout("bf16", cpu, vae):
        raise RuntimeError("boom")
    assert all(p.is_contiguous() for p in vae.parameters())  # restored on an exception too
    vae.to(memory_format=torch.channels_last)  # a module the user keeps channels-last stays so
    with low_precision_layout("bf16", cpu, vae):
        pass
    assert all(nhwc(p) for p in conv_weights(vae))


def test_one_autocast_for_inference_and_training():
    """``runtime.autocast`` is the only switch: fp32 leaves autocast off, bf16/fp16 turn it on, and training
    (which does no loss scaling) refuses fp16."""
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(precision, torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    with autocast("bf16", "cpu", training=True):
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="'fp32' or 'bf16' for training"), autocast("fp16", "cpu", training=True):
        pass


@torch.no_grad()
def test_decode_and_encode_match_the_contiguous_low_precision_path():
    torch.manual_seed(0)
    vae = tiny_vae()
    x = smooth(64)
    z = vae.encode(x)
    fp32 = vae.decode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what decode_with_fallback did before: NCHW bf16
        nchw = vae.decode(z).float()
        z_nchw = vae.encode(x).float()
    fast = decode_with_fallback(vae, z, "bf16")
    assert fast.is_contiguous() and fast.dtype == torch.float32
    assert all(p.is_contiguous() for p in vae.parameters())
    # Relative RMS errors, measured: NHWC vs NCHW bf16 1.9 %, NHWC vs fp32 2.6 %, NCHW vs fp32 2.6 % (a random
    # tiny decoder, 2 channels per norm group, amplifies bf16's 8-bit rounding): the same size, bf16 rounding.
    assert 0 < rel(fast, nchw) < 0.06  # > 0: the bf16 path really ran
    assert rel(fast, fp32) < 1.5 * rel(nchw, fp32)
    torch.testing.assert_close(decode_with_fallback(vae, z, "fp32"), fp32, rtol=0, atol=0)  # fp32: unchanged

    with autocast("bf16", "cpu", vae):
        assert all(nhwc(p) for p in conv_weights(vae))
        z_fast = vae.encode(x).float()
    assert rel(z_fast, z_nchw) < 0.03 and rel(z_fast, z) < 1.5 * rel(z_nchw, z)  # measured 0.7 %; 0.9 % vs 0.9 %
    with pytest.raises(ValueError, match="precision must be one of"), autocast("int8", "cpu", vae):
        pass


@torch.no_grad()
def test_tiled_low_precision_still_matches():
    """Tiles in bf16 (channels-last inside the tiles, whole-image GroupNorm in fp32) against fp32 tiles and
    against the untiled bf16 decode, with exact statistics and an overlap that hides the tile edges."""
    torch.manual_seed(0)
    vae = tiny_vae()
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))  # 2 x 2 tiles of 32 latents
    tiled32 = tiled_decode(vae, z, tile=32, overlap=16, passes=None)
    tiled16 = tiled_decode(vae, z, tile=32, overlap=16, passes=None, precision="bf16")
    untiled16 = decode_with_fallback(vae, z, "bf16")
    # Measured: 1.4 % and 1.2 % relative RMS (tiled vs untiled fp32 here: 0.07 %, the tile edges).
    assert rel(tiled16, tiled32) < 0.04 and rel(tiled16, untiled16) < 0.04
    x = smooth(96)
    with autocast("bf16", "cpu", vae):
        zt = tiled_encode(vae, x, tile=64, overlap=32, passes=None).float()
    z32 = vae.encode(x)
    assert rel(zt, z32) < 0.03  # measured 0.75 %
    assert all(p.is_contiguous() for p in vae.parameters()) and "forward" not in vars(vae.decoder)


def test_generate_in_bf16_uses_channels_last_and_fp32_is_unchanged(model, monkeypatch):  # noqa: F811
    pipe = load(model[1])  # with a preview decoder: it runs inside the sampling loop, at the same precision
    kw = {"steps": 3, "seed": 2, "output": "latent", "preview": lambda i, image: None}
    seen = []
    conv = pipe.denoiser.network.conv_in
    hook = conv.register_forward_pre_hook(lambda m, a: seen.append(nhwc(m.weight)))
    fp32 = pipe.generate(PROMPT, **kw)
    assert seen and not any(seen)  # fp32: weights never touched
    pipe.precision = "bf16"
    seen.clear()
    fast = pipe.generate(PROMPT, **kw)
    assert seen and all(seen)
    hook.remove()
    assert all(p.is_contiguous() for p in [*pipe.denoiser.parameters(), *pipe.preview_decoder.parameters()])
    monkeypatch.setattr(runtime, "low_precision_layout", lambda *a: contextlib.nullcontext())
    nchw = pipe.generate(PROMPT, **kw)  # the old bf16 path: contiguous weights
    pipe.precision = "fp32"
    torch.testing.assert_close(pipe.generate(PROMPT, **kw), fp32, rtol=0, atol=0)
    # Relative RMS, measured: NHWC vs NCHW bf16 1.7 %, NHWC vs fp32 1.8 %, NCHW vs fp32 1.7 % (3 steps, random).
    assert 0 < rel(fast, nchw) < 0.04 and rel(fast, fp32) < 1.5 * rel(nchw, fp32) + 1e-3
