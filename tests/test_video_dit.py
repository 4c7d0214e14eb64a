"""Video DiT: an inflated DiT starts as the image DiT frame by frame; its temporal blocks mix frames once trained;
model folders keep it; train-video inflates a DiT image model and generates clips from it."""

import pytest
import torch
from _tiny import tiny_model_folder
from _tiny import train_video as _train

from latentdiff.components import (
    DenoiserSpec,
    build_denoiser,
    load_denoiser,
    read_model_folder,
    save_denoiser,
)
from latentdiff.models.dit import DiT, DiTConfig
from latentdiff.models.families import family_of, is_video_network
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.models.video_dit import VideoDiT, VideoDiTConfig, inflate
from latentdiff.pipeline import load
from latentdiff.types import Cond

TEXT = DiTConfig(in_channels=4, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=12,
                 vector_dim=6)
LABELS = DiTConfig(in_channels=4, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                   learn_sigma=True)
PROMPT = "a small red circle moving to the right on a black background"


def _image_dit(cfg: DiTConfig = TEXT) -> DiT:
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    with torch.no_grad():  # DiT zero-initializes its adaLN and output layers: make every path non-trivial
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit


def _cond(B: int) -> Cond:
    return Cond(context=torch.randn(B, 5, 12), vector=torch.randn(B, 6), context_mask=torch.ones(B, 5, dtype=torch.bool))


def _perturbed(video: VideoDiT) -> VideoDiT:
    with torch.no_grad():
        for p in video.temporal_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return video


@pytest.mark.parametrize("temporal", [{}, {"temporal_head_dim": 8}, {"temporal_cross_attention": True},
                                      {"temporal_attention": False, "temporal_cross_attention": True}])
def test_inflated_dit_is_the_image_dit_per_frame(temporal):
    dit = _image_dit()
    video = inflate(dit, **temporal).eval()
    x, c, cond = torch.randn(2, 4, 5, 8, 8), torch.rand(2) * 999, _cond(2)
    with torch.no_grad():
        out = video(x, c, cond)  # (B, C, F, h, w)
        frames = torch.stack([dit(x[:, :, f], c, cond) for f in range(5)], dim=2)
    assert out.shape == x.shape and frames.abs().max() > 0.1
    torch.testing.assert_close(out, frames, rtol=1e-6, atol=1e-6)


def test_inflated_class_conditional_dit_is_the_image_dit_per_frame():
    dit = _image_dit(LABELS)
    video = inflate(dit).eval()
    x, c, cond = torch.randn(2, 4, 3, 8, 8), torch.rand(2) * 999, Cond(vector=torch.tensor([1, 5]))  # 5: no class
    with torch.no_grad():
        out = video(x, c, cond)
        frames = torch.stack([dit(x[:, :, f], c, cond) for f in range(3)], dim=2)
    assert out.shape == x.shape  # learned sigma: the mean half, as the image DiT
    torch.testing.assert_close(out, frames, rtol=1e-6, atol=1e-6)


def test_temporal_blocks_mix_frames_once_trained():
    video = _perturbed(inflate(_image_dit())).eval()
    x, c, cond = torch.randn(1, 4, 4, 8, 8), torch.rand(1) * 999, _cond(1)
    x2 = x.clone()
    x2[:, :, 3] += 1.0  # change the last frame only
    with torch.no_grad():
        a, b = video(x, c, cond), video(x2, c, cond)
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-4  # the first frame sees the last
    same = x[:, :, :1].expand(1, 4, 4, 8, 8).contiguous()  # 4 equal frames
    with torch.no_grad():
        out = video(same, c, cond)
    assert (out[:, :, 0] - out[:, :, 3]).abs().max() > 1e-4  # come out different: the frame position


def test_temporal_cross_attention_reads_the_prompt():
    video = _perturbed(inflate(_image_dit(), temporal_attention=False, temporal_cross_attention=True)).eval()
    x, c, cond = torch.randn(1, 4, 3, 8, 8), torch.rand(1) * 999, _cond(1)
    other = Cond(context=cond.context + torch.randn_like(cond.context), vector=cond.vector,
                 context_mask=cond.context_mask)
    plain = _perturbed(inflate(_image_dit(), temporal_attention=False, temporal_cross_attention=True)).eval()
    plain.load_state_dict(video.state_dict())
    with torch.no_grad():
        for block in plain.temporal:
            block.cross.to_out[0].weight.zero_()
            block.cross.to_out[0].bias.zero_()
        delta = (video(x, c, cond) - video(x, c, other)) - (plain(x, c, cond) - plain(x, c, other))
    assert delta.abs().max() > 1e-4  # the prompt's tokens reach the output through the temporal blocks
    same = x[:, :, :1].expand(1, 4, 3, 8, 8).contiguous()  # 3 equal frames
    with torch.no_grad():
        out = video(same, c, cond)
    assert (out[:, :, 0] - out[:, :, 2]).abs().max() > 1e-4  # each frame reads the prompt with its own position


def test_temporal_parameters_are_only_the_new_blocks():
    dit = _image_dit()
    video = inflate(dit, temporal_cross_attention=True)
    temporal = {id(p) for p in video.temporal_parameters()}
    names = [n for n, p in video.named_parameters() if id(p) in temporal]
    assert names and all(n.startswith("temporal.") for n in names)
    assert {n for n, _ in video.named_parameters()} - set(names) == {n for n, _ in dit.named_parameters()}
    assert len(video.temporal) == TEXT.depth


def test_video_dit_refuses_bad_input():
    video = inflate(_image_dit(), max_frames=4)
    with pytest.raises(ValueError, match=r"video DiT takes latents \(B, C, F, h, w\)"):
        video(torch.randn(1, 4, 8, 8), torch.rand(1), _cond(1))
    with pytest.raises(ValueError, match="1 to 4 frames"):
        video(torch.randn(1, 4, 5, 8, 8), torch.rand(1), _cond(1))
    with pytest.raises(ValueError, match="1 to 4 frames"):
        video(torch.randn(1, 4, 0, 8, 8), torch.rand(1), _cond(1))
    with pytest.raises(ValueError, match="no cond.concat or cond.control"):
        video(torch.randn(1, 4, 2, 8, 8), torch.rand(1), Cond(concat=torch.randn(1, 5, 8, 8)))
    with pytest.raises(ValueError, match=r"c_noise must have shape \(B,\)"):
        video(torch.randn(1, 4, 2, 8, 8), torch.rand(3), _cond(1))
    with pytest.raises(ValueError, match="cond.context"):
        video(torch.randn(1, 4, 2, 8, 8), torch.rand(1), Cond(vector=torch.randn(1, 6)))
    with pytest.raises(TypeError, match="already has temporal layers"):
        inflate(video)
    with pytest.raises(TypeError, match="inflates a DiTConfig"):
        inflate(UNet(UNetConfig(model_channels=16, channel_mult=(1,), num_res_blocks=1, attention_levels=(),
                                norm_groups=8)))
    with pytest.raises(TypeError, match="needs a VideoDiTConfig"):
        VideoDiT(TEXT)
    with pytest.raises(ValueError, match="temporal_attention or temporal_cross_attention"):
        VideoDiTConfig(temporal_attention=False)
    with pytest.raises(ValueError, match="needs a DiT with cross-attention"):
        VideoDiTConfig(temporal_cross_attention=True)
    with pytest.raises(ValueError, match="divisible by temporal_head_dim 24"):
        VideoDiTConfig(**{**TEXT.__dict__, "temporal_head_dim": 24})
    with pytest.raises(ValueError, match="max_frames must be at least 1"):
        VideoDiTConfig(max_frames=0)


def test_video_dit_denoiser_saves_and_loads(tmp_path):
    spec = DenoiserSpec(network="video_dit", parameterization="flow",
                        video_dit=VideoDiTConfig(**TEXT.__dict__, max_frames=6, temporal_cross_attention=True))
    denoiser = build_denoiser(spec).eval()
    _perturbed(denoiser.network)
    assert family_of(denoiser.network) == "video_dit" and is_video_network(denoiser.network)
    assert family_of(DiT(TEXT)) == "dit" and not is_video_network(DiT(TEXT)) and not is_video_network(None)
    save_denoiser(tmp_path / "denoiser", denoiser, spec)
    loaded, spec2 = load_denoiser(tmp_path / "denoiser")
    assert spec2 == spec and isinstance(loaded.network, VideoDiT)
    x, sigma, cond = torch.randn(2, 4, 3, 8, 8), torch.rand(2) + 0.1, _cond(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, cond), denoiser(x, sigma, cond), rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    video = _perturbed(inflate(_image_dit(), temporal_cross_attention=True)).train()
    x, c, cond = torch.randn(1, 4, 3, 8, 8), torch.rand(1) * 999, _cond(1)
    grads = []
    for ckpt in (False, True):
        video.config.gradient_checkpointing = ckpt
        video.zero_grad()
        video(x, c, cond).square().mean().backward()
        grads.append([p.grad.clone() for p in video.temporal_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------- train-video from a DiT model


@pytest.fixture(scope="module")
def dit_image(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("dit-image") / "model", dit=True)


@pytest.fixture(scope="module")
def dit_video(dit_image, tmp_path_factory):
    return _train(dit_image, tmp_path_factory.mktemp("dit-video") / "run", "--set", "temporal_cross_attention=true")


def test_train_video_inflates_a_dit_and_trains_only_its_temporal_blocks(dit_image, dit_video):
    image, video = read_model_folder(dit_image), read_model_folder(dit_video)
    assert video.spec.network == "video_dit" and video.index.frames == 4
    assert video.spec.video_dit.temporal_head_dim == 8 and video.spec.video_dit.temporal_cross_attention
    spatial, state = image.denoiser.network.state_dict(), video.denoiser.network.state_dict()
    assert set(state) - set(spatial) and all(k.startswith("temporal.") for k in set(state) - set(spatial))
    for k, v in spatial.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)  # frozen image weights
    zero_init = [k for k in state if k.startswith("temporal.") and k.endswith(("norm1.linear.weight",
                                                                                "cross.to_out.0.weight"))]
    assert zero_init and all(state[k].abs().max() > 0 for k in zero_init)  # the temporal blocks moved


def test_generate_clips_from_a_video_dit(dit_video):
    pipe = load(dit_video)
    clips = pipe.generate(PROMPT, steps=2, num_images=2)
    assert len(clips) == 2 and all(len(c) == 4 and c[0].size == (16, 16) for c in clips)  # the model's 4 frames
    z = pipe.generate(PROMPT, steps=2, frames=3, output="latent")
    assert z.shape == (1, 4, 3, 8, 8) and torch.isfinite(z).all()
    for method in ({"guidance_method": "apg"}, {"pag_scale": 1.0}):  # PAG perturbs the temporal attention too
        z = pipe.generate(PROMPT, steps=2, frames=3, output="latent", **method)
        assert z.shape == (1, 4, 3, 8, 8) and torch.isfinite(z).all()
    with pytest.raises(TypeError, match="not on VideoDiT"):  # DeepCache is the U-Net's
        pipe.generate(PROMPT, steps=2, frames=3, cache_interval=2)
    with pytest.raises(ValueError, match="1 to 16 frames"):
        pipe.generate(PROMPT, frames=17)


def test_train_video_dit_init_and_train_all(dit_image, dit_video, tmp_path):
    tuned = _train(dit_image, tmp_path / "tuned", "--set", f"init={dit_video}", "--set",
                   "temporal_cross_attention=true", "--set", "train=all", "--set", "steps=1")
    start, state = read_model_folder(dit_video).denoiser.network.state_dict(), \
        read_model_folder(tuned).denoiser.network.state_dict()
    spatial = read_model_folder(dit_image).denoiser.network.state_dict()
    assert any(not torch.equal(state[k], start[k]) for k in spatial)  # train = all moved the image weights


def test_train_video_dit_refuses_unet_keys_and_mismatched_inits(dit_image, dit_video, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(dit_image, tmp_path / "a", "--set", "temporal_conv=true")
    assert "temporal_conv is a U-Net key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(dit_image, tmp_path / "b", "--set", f"init={dit_video}")  # without its cross-attention
    assert "differing: temporal_cross_attention" in capsys.readouterr().err
    unet_image = tiny_model_folder(tmp_path / "unet")
    with pytest.raises(SystemExit):
        _train(unet_image, tmp_path / "c", "--set", f"init={dit_video}")
    assert "is a video_dit model, but" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(dit_image, tmp_path / "d", "--set", "temporal_head_dim=12")
    assert "divisible by temporal_head_dim 12" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcd")
