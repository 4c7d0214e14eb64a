"""Token merging (``models/tome.py``, ``UNet.forward(tome=)``): ratio 0 is the plain U-Net bitwise; merging then
unmerging tokens that are exact duplicates of their window's destination is exact; merge against a loop oracle;
only the highest-resolution transformer blocks merge; small ratios stay close; the pipeline and CLI option."""

import pytest
import torch
from _tiny import cli, one_thread, tiny_model_folder  # noqa: F401 (autouse)

from latentdiff.models.tome import bipartite_soft_matching, grid_split
from latentdiff.models.unet import StepCache, TokenMerging, UNet, UNetConfig
from latentdiff.models.video_unet import VideoUNet, VideoUNetConfig
from latentdiff.pipeline import load
from latentdiff.types import Cond


def _unet(attention_levels=(0, 1)) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=attention_levels,
                           num_heads=2, context_dim=8, norm_groups=8)).eval()


def _inputs(seed: int = 0, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, size, size, generator=g), torch.rand(2, generator=g) * 999, \
        Cond(context=torch.randn(2, 3, 8, generator=g))


def _windows(h: int, w: int, C: int = 6, seed: int = 0) -> torch.Tensor:
    """(2, h*w, C) tokens equal within each 2x2 window (values on a 1/8 grid, so sums and means are exact)."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(-16, 16, (2, h // 2, w // 2, C), generator=g).float() / 8
    return cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, h * w, C)


def test_grid_split_partitions_the_tokens():
    dst, src = grid_split(5, 6)  # odd height: the last row is all sources
    assert dst.tolist() == [0, 2, 4, 12, 14, 16]
    assert sorted(dst.tolist() + src.tolist()) == list(range(30))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_round_trip_on_duplicate_tokens_is_exact(ratio):
    x = _windows(8, 8)
    m = bipartite_soft_matching(x, 8, 8, ratio)
    merged = m.merge(x)
    assert merged.shape == (2, 64 - int(64 * ratio), 6)
    assert torch.equal(m.unmerge(merged), x)
    # Every merged source went into its own window's destination (similarity 1).
    dst, src = grid_split(8, 8)
    window = lambda k: (k // 8 // 2, k % 8 // 2)
    for b in range(2):
        for s, d in zip(m.merged[b].tolist(), m.into[b].tolist()):
            assert window(src[s].item()) == window(dst[d].item())


def test_merge_is_the_mean_of_each_destination_and_its_sources():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 36, 5, generator=g, dtype=torch.float64)
    m = bipartite_soft_matching(x, 6, 6, 0.5)
    merged = m.merge(x)
    n_kept = m.kept.shape[1]
    for b in range(2):
        assert torch.equal(merged[b, :n_kept], x[b, m.src[m.kept[b]]])
        for d in range(m.dst.numel()):
            members = [m.dst[d].item()] + [m.src[s].item() for s, i in zip(m.merged[b], m.into[b]) if i == d]
            assert torch.allclose(merged[b, n_kept + d], x[b, members].mean(0))
        out = m.unmerge(merged)  # each token gets the value of the merged token it is in
        assert torch.equal(out[b, m.src[m.kept[b]]], merged[b, :n_kept])
        assert torch.equal(out[b, m.src[m.merged[b]]], merged[b, n_kept + m.into[b]])
    assert bipartite_soft_matching(x, 6, 6, 0.0) is None and bipartite_soft_matching(x, 6, 6, 0.01) is None
    assert bipartite_soft_matching(x, 6, 6, 0.99).merged.shape[1] == 27  # at most the 27 sources
    with pytest.raises(ValueError, match="not a 5x6 grid"):
        bipartite_soft_matching(x, 5, 6, 0.5)


def test_ratio_zero_is_the_plain_unet_bitwise():
    net = _unet()
    x, c, cond = _inputs()
    with torch.no_grad():
        want = net(x, c, cond)
        assert torch.equal(net(x, c, cond, tome=0.0), want)
        assert torch.equal(TokenMerging(net, 0)(x, c, cond), want)
        assert torch.equal(StepCache(net, 1, tome=0.0)(x, c, cond), want)


def test_only_the_highest_resolution_self_attentions_merge():
    net = _unet(attention_levels=(0, 1))
    seen = {}
    for name, module in net.named_modules():
        if name.endswith(("attn1", "attn2")):
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].shape[1]))
    x, c, cond = _inputs()
    with torch.no_grad():
        net(x, c, cond, tome=0.5)
    assert seen["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == 32  # 64 tokens, 32 merged
    assert seen["up_blocks.1.attentions.1.transformer_blocks.0.attn1"] == 32
    assert seen["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == 64  # cross-attention: not merged
    assert seen["down_blocks.1.attentions.0.transformer_blocks.0.attn1"] == 16  # 4x4 level: not merged
    assert seen["mid_block.attentions.0.transformer_blocks.0.attn1"] == 16
    # With attention only at the 4x4 level (as the default model), that level is the highest with transformers.
    net = _unet(attention_levels=(1,))
    seen.clear()
    for name, module in net.named_modules():
        if name.endswith("attn1"):
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0].shape[1]))
    with torch.no_grad():
        net(x, c, cond, tome=0.5)
    assert set(seen.values()) == {8}


def test_small_ratios_stay_close_to_the_plain_unet():
    net = _unet()
    x, c, cond = _inputs(size=16)
    with torch.no_grad():
        want = net(x, c, cond)
        err = {r: ((net(x, c, cond, tome=r) - want).norm() / want.norm()).item() for r in (0.1, 0.3, 0.6)}
    assert 0 < err[0.1] < err[0.6] < 0.2, err
    assert err[0.1] < 0.03, err
    with pytest.raises(ValueError, match=r"tome\) must be a number in \[0, 1\)"):
        TokenMerging(net, 1.0)
    with pytest.raises(TypeError, match="token merging"):
        TokenMerging(VideoUNet(VideoUNetConfig(**net.config.__dict__, temporal_head_dim=8)), 0.5)


def test_pipeline_and_cli_option(tmp_path):
    folder = tiny_model_folder(tmp_path / "m")
    pipe = load(folder)
    want = pipe.generate("a red circle", steps=4, output="pt")
    assert torch.equal(pipe.generate("a red circle", steps=4, output="pt", tome=0.0), want)
    merged = pipe.generate("a red circle", steps=4, output="pt", tome=0.5)
    assert not torch.equal(merged, want) and torch.isfinite(merged).all()
    both = pipe.generate("a red circle", steps=4, output="pt", tome=0.5, cache_interval=2)
    assert torch.isfinite(both).all() and not torch.equal(both, merged)
    assert type(pipe.denoiser.network) is UNet  # the pipeline's own modules are unchanged
    with pytest.raises(ValueError, match="tome"):
        pipe.generate("a red circle", steps=2, tome=-0.1)
    out = tmp_path / "a.png"
    done = cli(["generate", "a red circle", "--model", str(folder), "--steps", "2", "--tome", "0.5", "-o", str(out)],
               tmp_path)
    assert done.returncode == 0, done.stderr
    assert out.exists()
    bad = cli(["generate", "a red circle", "--model", str(folder), "--tome", "1.5", "-o", str(tmp_path / "b.png")],
              tmp_path)
    assert bad.returncode != 0 and "tome" in bad.stderr and not (tmp_path / "b.png").exists()
