"""Video: the inflated U-Net starts as the image model frame by frame; moving-shapes clips, captions and judge."""

import numpy as np
import pytest
import torch

from latentdiff.components import DenoiserSpec, build_denoiser
from latentdiff.data.moving_shapes import (
    HELDOUT_TRIPLES,
    MOTIONS,
    Clip,
    clip_caption,
    clip_tensor,
    judge_clip,
    parse_clip_caption,
    render_clip,
    sample_clip,
    score_clips,
    still_caption,
    validate_clips,
)
from latentdiff.diffusion.sampling import sample_dpmpp_2m, sample_euler
from latentdiff.diffusion.schedules import flow_sigmas
from latentdiff.models.families import family_of
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.models.video_unet import VideoUNet, VideoUNetConfig, inflate
from latentdiff.types import Cond

TINY = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), head_dim=8, context_dim=12, vector_dim=6, norm_groups=8)


def _image_unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    with torch.no_grad():  # non-trivial outputs everywhere (conv_out is not zero-initialized here anyway)
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return unet


def _cond(B: int) -> Cond:
    return Cond(context=torch.randn(B, 5, 12), vector=torch.randn(B, 6))


@pytest.mark.parametrize("temporal", [{}, {"temporal_conv": False}, {"temporal_attention": False},
                                      {"temporal_cross_attention": True}])
def test_inflated_unet_is_the_image_model_per_frame(temporal):
    unet = _image_unet()
    video = inflate(unet, temporal_head_dim=8, **temporal).eval()
    x, c, cond = torch.randn(2, 4, 5, 8, 8), torch.rand(2), _cond(2)
    with torch.no_grad():
        out = video(x, c, cond)  # (B, C, F, h, w)
        frames = torch.stack([unet(x[:, :, f], c, cond) for f in range(5)], dim=2)
    assert out.shape == x.shape
    torch.testing.assert_close(out, frames, rtol=1e-5, atol=1e-5)


def test_temporal_layers_mix_frames_once_trained():
    video = inflate(_image_unet(), temporal_head_dim=8).eval()
    with torch.no_grad():
        for p in video.temporal_parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, c, cond = torch.randn(1, 4, 4, 8, 8), torch.rand(1), _cond(1)
    x2 = x.clone()
    x2[:, :, 3] += 1.0  # change the last frame only
    with torch.no_grad():
        a, b = video(x, c, cond), video(x2, c, cond)
    assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-4  # the first frame sees the last


def test_temporal_cross_attention_reads_the_prompt_per_frame():
    video = inflate(_image_unet(), temporal_head_dim=8, temporal_conv=False, temporal_attention=False,
                    temporal_cross_attention=True).eval()
    with torch.no_grad():
        for p in video.temporal_parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, c, cond = torch.randn(1, 4, 1, 8, 8).expand(1, 4, 4, 8, 8).contiguous(), torch.rand(1), _cond(1)  # 4 equal frames
    other = Cond(context=cond.context + torch.randn_like(cond.context), vector=cond.vector)
    with torch.no_grad():
        a, b = video(x, c, cond), video(x, c, other)
    assert (a[:, :, 0] - a[:, :, 3]).abs().max() > 1e-4  # equal frames come out different: the frame position
    assert (a - b).abs().max() > 1e-4  # the prompt's tokens reach the temporal layers
    with pytest.raises(ValueError, match="cond.context"):  # the U-Net refuses a missing prompt first
        video(x, c, Cond(vector=cond.vector))
    with pytest.raises(ValueError, match="context_dim"):
        VideoUNet(VideoUNetConfig(**{**TINY.__dict__, "context_dim": None}, temporal_head_dim=8,
                                  temporal_cross_attention=True))


def test_heldout_triples_split_and_still_captions():
    rng = np.random.default_rng(0)
    triples = {(c.color, c.shape, c.motion) for c in (sample_clip(rng, "heldout") for _ in range(60))}
    assert triples <= HELDOUT_TRIPLES and len(triples) > 10
    train = [sample_clip(rng, "train") for _ in range(300)]
    assert not {(c.color, c.shape, c.motion) for c in train} & HELDOUT_TRIPLES
    assert {c.motion for c in train} == set(MOTIONS)  # every motion still trained
    assert {m for _, _, m in HELDOUT_TRIPLES} == set(MOTIONS) and len(HELDOUT_TRIPLES) == 18
    with pytest.raises(ValueError, match="unknown clip split"):
        sample_clip(rng, "test")
    only = [sample_clip(rng, "heldout", ("recolor", "grow")) for _ in range(40)]
    assert {c.motion for c in only} == {"recolor", "grow"}
    assert all((c.color, c.shape, c.motion) in HELDOUT_TRIPLES for c in only)
    for bad in ((), ("spin",)):
        with pytest.raises(ValueError, match="motions must be"):
            sample_clip(rng, motions=bad)
    clip = Clip("circle", "red", "black", "recolor", "large", "blue")
    assert [still_caption(clip, f, 4) for f in (0, 3)] == [
        "a large red circle in the middle on a black background", "a large blue circle in the middle on a black background"]
    assert still_caption(Clip("square", "red", "gray", "grow"), 3, 4).startswith("a large red square")


def test_temporal_parameters_are_only_the_new_layers():
    unet = _image_unet()
    video = inflate(unet, temporal_head_dim=8)
    temporal = {id(p) for p in video.temporal_parameters()}
    names = [n for n, p in video.named_parameters() if id(p) in temporal]
    assert names and all(n.startswith("temporal.") for n in names)
    spatial = {n for n, _ in video.named_parameters()} - set(names)
    assert spatial == {n for n, _ in unet.named_parameters()}


def test_video_unet_refuses_bad_input():
    video = inflate(_image_unet(), temporal_head_dim=8, max_frames=4)
    with pytest.raises(ValueError, match=r"\(B, C, F, h, w\)"):
        video(torch.randn(1, 4, 8, 8), torch.rand(1), _cond(1))
    with pytest.raises(ValueError, match="1 to 4 frames"):
        video(torch.randn(1, 4, 5, 8, 8), torch.rand(1), _cond(1))
    with pytest.raises(TypeError, match="already has temporal layers"):
        inflate(video)
    with pytest.raises(ValueError, match="temporal_conv, temporal_attention or temporal_cross_attention"):
        VideoUNetConfig(temporal_conv=False, temporal_attention=False)


def test_samplers_run_on_video_latents_and_the_family_is_known():
    spec = DenoiserSpec(network="video_unet", parameterization="flow",
                        video_unet=VideoUNetConfig(**TINY.__dict__, temporal_head_dim=8))
    denoiser = build_denoiser(spec).eval()
    assert isinstance(denoiser.network, VideoUNet) and family_of(denoiser.network) == "video_unet"
    assert family_of(UNet(TINY)) == "unet"
    noise = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = flow_sigmas(3)
    with torch.no_grad():
        for sampler in (sample_euler, sample_dpmpp_2m):
            z = sampler(denoiser, noise, sigmas, _cond(2))
            assert z.shape == noise.shape and torch.isfinite(z).all()


def test_judge_reads_rendered_clips():
    result = validate_clips(n=60, seed=3)
    assert result["frame_accuracy"] == 1.0 and result["motion_accuracy"] == 1.0, result


@pytest.mark.parametrize("motion", MOTIONS)
def test_each_motion_is_read(motion):
    clip = Clip("square", "red", "gray", motion, "small", "blue" if motion == "recolor" else None)
    frames = render_clip(clip, frames=8, size=32, seed=1)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    assert judge_clip(frames).motion == motion
    assert judge_clip(clip_tensor(frames)).motion == motion  # (3, F, H, W) in [-1, 1] too


def test_captions_parse_back():
    rng = np.random.default_rng(0)
    for _ in range(200):
        clip = sample_clip(rng)
        assert parse_clip_caption(clip_caption(clip)) == clip
    assert clip_caption(Clip("circle", "red", "black", "right")) == \
        "a small red circle moving to the right on a black background"
    assert parse_clip_caption("a red circle on a black background") is None  # no motion
    assert parse_clip_caption("a red circle moving up and growing on a black background") is None  # two
    assert parse_clip_caption("a red circle turning red on a black background") is None


def test_video_judge_rendered_still_frames_read_as_their_still_captions():
    """benchmarks/video_judge.py --rendered --rendered-still: each frame's still caption rendered as the shapes data
    draws it (here through an identity "autoencoder") reads back as that caption: shape, colour at that frame,
    background, and the object in the middle (so no motion but grow / recolor)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "video_judge.py"
    spec = importlib.util.spec_from_file_location("video_judge", path)
    judge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(judge)

    class Pixels(torch.nn.Module):  # encode = the pixels themselves
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def encode(self, x):
            return x * self.scale

    clips = [Clip("triangle", "red", "gray", "recolor", end_color="blue"), Clip("square", "green", "black", "grow"),
             Clip("circle", "yellow", "white", "left")]
    z = judge.still_latents(Pixels(), clips, 4, 32, seed=0)
    assert z.shape == (3, 3, 4, 32, 32)
    frames = [((clip.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy() for clip in z]
    scores = score_clips(frames, clips)
    assert scores["frame_accuracy"] == 1.0
    assert scores["by_motion"] == {"left": 0.0, "grow": 1.0, "recolor": 1.0}
    assert scores["frames_by_motion"] == {"left": 1.0, "grow": 1.0, "recolor": 1.0}
    frames[0] = np.concatenate([frames[1][:1], frames[0][1:]])  # the recolour clip's first frame: the green square
    scores = score_clips(frames, clips)
    assert scores["frames_by_motion"] == {"left": 1.0, "grow": 1.0, "recolor": 0.75}
    assert scores["frame_accuracy"] == pytest.approx(11 / 12)
