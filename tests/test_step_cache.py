"""DeepCache step caching (``unet.StepCache``): interval 1 is the plain network exactly; a shallow step on deep
features of the same input is the whole network exactly; the pipeline option."""

import pytest
import torch
from _tiny import one_thread, tiny_model_folder  # noqa: F401 (autouse)

from latentdiff.models.dit import DiT, DiTConfig
from latentdiff.models.unet import StepCache, UNet, UNetConfig
from latentdiff.pipeline import load
from latentdiff.types import Cond


def _unet(num_res_blocks: int = 1, attention_levels=(0, 1)) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=num_res_blocks,
                           attention_levels=attention_levels, num_heads=2, context_dim=8, norm_groups=8)).eval()


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g) * 999, \
        Cond(context=torch.randn(2, 3, 8, generator=g))


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_shallow_step_on_its_own_deep_features_is_the_whole_network(num_res_blocks):
    net = _unet(num_res_blocks)
    x, c, cond = _inputs(0)
    with torch.no_grad():
        full, deep = net.forward_deep_cache(x, c, cond, keep_deep=True)
        assert torch.equal(full, net(x, c, cond))
        shallow, _ = net.forward_deep_cache(x, c, cond, deep)
        assert torch.equal(shallow, full)
        # On another step's deep features it is an approximation, not the network.
        x2, c2, cond2 = _inputs(1)
        assert not torch.equal(net.forward_deep_cache(x2, c2, cond2, deep)[0], net(x2, c2, cond2))


def test_interval_one_is_no_caching_and_interval_n_runs_whole_every_n_calls():
    net = _unet()
    plain, cached, every3 = [], StepCache(net, 1), StepCache(net, 3)
    with torch.no_grad():
        for seed in range(4):
            x, c, cond = _inputs(seed)
            want = net(x, c, cond)
            assert torch.equal(cached(x, c, cond), want)
            got = every3(x, c, cond)
            assert torch.equal(got, want) == (seed in (0, 3)), seed  # calls 0 and 3 run the whole network
            plain.append(want)
    with pytest.raises(ValueError, match="cache_interval must be a whole number >= 1"):
        StepCache(net, 0)
    with pytest.raises(TypeError, match="works on our U-Net"):
        StepCache(DiT(DiTConfig(sample_size=8, hidden_size=32, depth=1, num_heads=2)), 2)


def test_pipeline_cache_interval(tmp_path):
    pipe = load(tiny_model_folder(tmp_path / "m"))
    want = pipe.generate("a red circle", steps=6, output="pt")
    assert torch.equal(pipe.generate("a red circle", steps=6, output="pt", cache_interval=1), want)
    cached = pipe.generate("a red circle", steps=6, output="pt", cache_interval=2)
    assert not torch.equal(cached, want) and torch.isfinite(cached).all()
    assert pipe.denoiser.network.__class__ is UNet  # the pipeline's own modules are unchanged
    with pytest.raises(ValueError, match="cache_interval"):
        pipe.generate("a red circle", steps=2, cache_interval=0)
