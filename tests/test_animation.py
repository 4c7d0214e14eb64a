"""Clip files: animated GIF / WebP (Pillow) and H.264 MP4 (PyAV) round trips, save_animation's dispatch, atomic
writes, save_clips' formats by OUT's suffix."""

import numpy as np
import pytest
from PIL import Image

from latentdiff import images as images_mod
from latentdiff.images import (
    ANIMATION_SUFFIXES,
    mp4_frame_size,
    save_animation,
    save_gif,
    save_mp4,
    save_webp,
)
from latentdiff.pipeline import clip_paths, save_clips

SIZES = [(32, 32), (33, 17)]  # (width, height); 33x17: odd sides, H.264 needs them even


def moving_square(width: int, height: int, n: int = 5) -> list[Image.Image]:
    """A red square moving right over a dark blue background, a green bar growing: every frame differs."""
    frames = []
    side = max(3, min(width, height) // 3)
    for i in range(n):
        a = np.zeros((height, width, 3), np.uint8)
        a[..., 2] = 60
        a[1:1 + side, 2 * i:2 * i + side] = (220, 30, 30)
        a[-2:, : (i + 1) * width // n] = (20, 200, 40)
        frames.append(Image.fromarray(a))
    return frames


def read_pillow(path) -> tuple[list[np.ndarray], list[int]]:
    with Image.open(path) as im:
        frames, durations = [], []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")).astype(int))
            durations.append(im.info["duration"])
    return frames, durations


def read_mp4(path):
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(stream)]
        return frames, stream.average_rate, stream.codec_context.name, stream.codec_context.pix_fmt


@pytest.mark.parametrize("size", SIZES)
def test_webp_is_lossless_and_timed_to_the_millisecond(tmp_path, size):
    clip = moving_square(*size)
    path = save_webp(clip, tmp_path / "c.webp", fps=8)
    frames, durations = read_pillow(path)
    assert len(frames) == 5 and durations == [125] * 5
    for got, want in zip(frames, clip):
        np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("size", SIZES)
def test_gif_round_trip(tmp_path, size):
    clip = moving_square(*size)
    path = save_gif(clip, tmp_path / "c.gif", fps=10)
    frames, durations = read_pillow(path)
    assert len(frames) == 5 and durations == [100] * 5  # GIF stores hundredths of a second
    for got, want in zip(frames, clip):  # few colours: the palette keeps them exactly
        np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("size", SIZES)
def test_mp4_round_trip(tmp_path, size):
    pytest.importorskip("av")
    clip = moving_square(*size)
    path = save_mp4(clip, tmp_path / "c.mp4", fps=12)
    frames, rate, codec, pix_fmt = read_mp4(path)
    scale, width, height = mp4_frame_size(*size)
    assert (scale, width, height) == ((4, 128, 128) if size == (32, 32) else (8, 264, 136))  # short side >= 128
    assert len(frames) == 5 and rate == 12 and codec == "h264" and pix_fmt == "yuv420p"
    assert frames[0].shape == (height, width, 3) and width % 2 == 0 and height % 2 == 0
    for got, want in zip(frames, clip):
        big = np.asarray(want).astype(int).repeat(scale, 0).repeat(scale, 1)  # nearest-neighbour enlargement
        assert np.abs(got[: big.shape[0], : big.shape[1]] - big).mean() < 3  # lossy (4:2:0, crf 18), but close
        # each source pixel's block decodes to about its colour: the frame read back at the source size
        small = got[: big.shape[0], : big.shape[1]].reshape(size[1], scale, size[0], scale, 3).mean((1, 3))
        assert np.abs(small - np.asarray(want)).mean() < 3


def test_mp4_without_enlarging_pads_odd_sides_by_replication(tmp_path):
    pytest.importorskip("av")
    clip = moving_square(33, 17)
    assert mp4_frame_size(33, 17, min_size=1) == (1, 34, 18)
    assert mp4_frame_size(512, 256) == (1, 512, 256) and mp4_frame_size(100, 300) == (2, 200, 600)
    frames, *_ = read_mp4(save_mp4(clip, tmp_path / "c.mp4", fps=8, min_size=1))
    assert len(frames) == 5 and frames[0].shape == (18, 34, 3)
    for got, want in zip(frames, clip):
        assert np.abs(got[:17, :33] - np.asarray(want)).mean() < 8  # 4:2:0 at 1x blurs the colour edges more
        assert np.abs(got[:, 33] - got[:, 32]).mean() < 8 and np.abs(got[17] - got[16]).mean() < 8  # replicated


def test_save_animation_dispatches_on_the_suffix_and_refuses_others(tmp_path):
    pytest.importorskip("av")
    clip = moving_square(16, 16, n=3)
    for suffix in ANIMATION_SUFFIXES:
        path = save_animation(clip, tmp_path / f"c{suffix.upper()}", fps=8)  # the suffix's case does not matter
        assert path.is_file()
    assert Image.open(tmp_path / "c.GIF").format == "GIF" and Image.open(tmp_path / "c.WEBP").format == "WEBP"
    assert read_mp4(tmp_path / "c.MP4")[2] == "h264"
    for bad in ("c.avi", "c.png", "c"):
        with pytest.raises(ValueError, match=r"\.gif, \.webp, \.mp4"):
            save_animation(clip, tmp_path / bad)
        assert not (tmp_path / bad).exists()
    with pytest.raises(ValueError, match="at least one frame"):
        save_animation([], tmp_path / "e.webp")
    with pytest.raises(ValueError, match="fps"):
        save_animation(clip, tmp_path / "e.webp", fps=0)
    with pytest.raises(ValueError, match="one size"):
        save_animation([*clip, Image.new("RGB", (8, 8))], tmp_path / "e.gif")
    assert not list(tmp_path.glob("e*")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("suffix", ANIMATION_SUFFIXES)
def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, suffix, monkeypatch):
    if suffix == ".mp4":
        av = pytest.importorskip("av")

        def broken(*args, **kwargs):
            raise RuntimeError("encoder failed")

        monkeypatch.setattr(av.VideoFrame, "from_ndarray", broken)
    else:
        def broken(self, *args, **kwargs):
            raise RuntimeError("encoder failed")

        monkeypatch.setattr(Image.Image, "save", broken)
    path = tmp_path / f"c{suffix}"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="encoder failed"):
        save_animation(moving_square(16, 16, n=3), path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_missing_pyav_says_how_to_install(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ImportError, match=r"pip install av .*latentdiff\[video\]"):
        images_mod.save_mp4(moving_square(16, 16), tmp_path / "c.mp4")
    from latentdiff.cli import main

    with pytest.raises(SystemExit):  # said before the model is looked for
        main(["generate", "a red circle", "--model", str(tmp_path / "no_model"), "-o", str(tmp_path / "c.mp4")])
    assert "pip install av" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_clip_paths_follow_outs_suffix(tmp_path):
    assert clip_paths(tmp_path / "a.webp", 1) == ([tmp_path / "a.webp"], tmp_path / "a.png")
    assert clip_paths(tmp_path / "a.mp4", 2) == ([tmp_path / "a_000.mp4", tmp_path / "a_001.mp4"], tmp_path / "a.png")
    assert clip_paths(tmp_path / "a.png", 1) == ([tmp_path / "a.gif"], tmp_path / "a.png")
    assert clip_paths(tmp_path / "a", 1) == ([tmp_path / "a.gif"], tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"\.gif, \.webp, \.mp4"):
        clip_paths(tmp_path / "a.avi", 1)


def test_save_clips_writes_webp_clips_and_the_grid(tmp_path):
    clips = [moving_square(16, 16, n=3), moving_square(16, 16, n=3)[::-1]]
    written = save_clips(clips, tmp_path / "v.webp", {"seed": 0}, [{"prompt": "a"}, {"prompt": "b"}], fps=4)
    assert [p.name for p in written] == ["v_000.webp", "v_001.webp", "v.png"]
    frames, durations = read_pillow(tmp_path / "v_001.webp")
    assert durations == [250] * 3 and all((f == np.asarray(w)).all() for f, w in zip(frames, clips[1]))
    from latentdiff.images import read_parameters

    params = read_parameters(tmp_path / "v.png")
    assert params["fps"] == 4 and params["frames"] == 3 and params["prompt"] == ["a"] * 3 + ["b"] * 3
    assert Image.open(tmp_path / "v.png").size == (3 * 18 + 2, 2 * 18 + 2)
