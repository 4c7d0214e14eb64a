"""train-video on the run engine, video generation (Pipeline.generate(frames=N), `generate --frames`), bad input."""

import numpy as np
import pytest
import torch
from _tiny import tiny_model_folder
from _tiny import train_video as _train
from PIL import Image

from latentdiff.cli import main
from latentdiff.components import read_model_folder
from latentdiff.images import read_parameters
from latentdiff.pipeline import load

PROMPT = "a small red circle moving to the right on a black background"


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("image") / "model")


@pytest.fixture(scope="module")
def video_model(image_model, tmp_path_factory):
    return _train(image_model, tmp_path_factory.mktemp("video") / "run")


def test_train_video_trains_only_the_temporal_layers(image_model, video_model):
    image, video = read_model_folder(image_model), read_model_folder(video_model)
    assert video.spec.network == "video_unet" and video.index.frames == 4
    spatial = image.denoiser.network.state_dict()
    state = video.denoiser.network.state_dict()
    assert set(state) - set(spatial) and all(k.startswith("temporal.") for k in set(state) - set(spatial))
    for k, v in spatial.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)  # frozen image weights
    zero_init = [k for k in state if k.endswith(("conv.weight", "to_out.0.weight"))]
    assert zero_init and any(state[k].abs().max() > 0 for k in zero_init)  # the temporal layers moved
    assert (video_model.parent / "samples" / "step_0000002.png").is_file()


def test_train_video_all_trains_the_image_weights_too(image_model, tmp_path):
    folder = _train(image_model, tmp_path / "run", "--set", "train=all")
    spatial = read_model_folder(image_model).denoiser.network.state_dict()
    state = read_model_folder(folder).denoiser.network.state_dict()
    assert any(not torch.equal(state[k], v) for k, v in spatial.items())


def test_generate_clips_in_every_output(video_model):
    pipe = load(video_model)
    clips = pipe.generate([PROMPT, "a blue square growing on a gray background"], steps=2)
    assert len(clips) == 2 and all(len(c) == 4 and c[0].size == (16, 16) for c in clips)  # the model's 4 frames
    arr = pipe.generate(PROMPT, steps=2, frames=3, output="np", num_images=2)
    assert arr.shape == (2, 3, 16, 16, 3) and arr.dtype == np.uint8
    pt = pipe.generate(PROMPT, steps=2, frames=3, output="pt")
    assert pt.shape == (1, 3, 3, 16, 16)
    z = pipe.generate(PROMPT, steps=2, frames=3, output="latent")
    assert z.shape == (1, 4, 3, 8, 8)
    again = pipe.generate(PROMPT, steps=2, frames=3, output="latent")
    torch.testing.assert_close(z, again, rtol=0, atol=0)  # same seed, same clip
    for method in ({"guidance_method": "apg"}, {"pag_scale": 1.0}):  # guidance is shape-generic
        z = pipe.generate(PROMPT, steps=2, frames=3, output="latent", **method)
        assert z.shape == (1, 4, 3, 8, 8) and torch.isfinite(z).all()


def test_bad_frames_are_refused(image_model, video_model, capsys):
    with pytest.raises(ValueError, match="image model: its denoiser has no temporal layers"):
        load(image_model).generate(PROMPT, frames=4)
    pipe = load(video_model)
    with pytest.raises(ValueError, match="1 to 16 frames"):
        pipe.generate(PROMPT, frames=17)
    with pytest.raises(ValueError, match="frames"):
        pipe.generate(PROMPT, frames=0)
    with pytest.raises(ValueError, match="no video editing"):
        pipe.generate(PROMPT, frames=2, image=torch.zeros(1, 3, 16, 16))
    with pytest.raises(SystemExit):
        main(["train-video", "--preset", "moving-shapes-test", "--set", "frames=20", "--set", "dry_run=true"])
    assert "frames (20) must be at most max_frames (16)" in capsys.readouterr().err


def test_cli_writes_gif_and_frame_grid(video_model, image_model, tmp_path, capsys):
    out = tmp_path / "clip.png"
    main(["generate", PROMPT, "--model", str(video_model), "--frames", "3", "--steps", "2", "-o", str(out)])
    gif = Image.open(tmp_path / "clip.gif")
    assert gif.n_frames == 3 and gif.size == (16, 16)
    grid = Image.open(out)
    assert grid.size == (3 * 18 + 2, 18 + 2)  # one row of 3 frames, 2-pixel padding
    assert read_parameters(out)["frames"] == 3 and read_parameters(out)["prompt"] == PROMPT
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, "--model", str(image_model), "--frames", "3", "-o", str(tmp_path / "x.png")])
    assert "no temporal layers" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.gif").exists()


def test_cli_writes_webp_and_mp4_clips(video_model, image_model, tmp_path, capsys):
    """OUT's suffix picks the clip format (the grid is OUT with .png); a bad suffix or an image model is refused
    before any sampling, and nothing is written."""
    main(["generate", PROMPT, "--model", str(video_model), "--frames", "3", "--steps", "2", "--fps", "4",
          "-o", str(tmp_path / "clip.webp")])
    webp = Image.open(tmp_path / "clip.webp")
    assert webp.format == "WEBP" and webp.n_frames == 3 and webp.size == (16, 16)
    webp.load()
    assert webp.info["duration"] == 250
    grid = Image.open(tmp_path / "clip.png")  # the frames, lossless in both: the WebP's first frame is the grid's
    np.testing.assert_array_equal(np.asarray(webp.convert("RGB")), np.asarray(grid.convert("RGB"))[2:18, 2:18])
    assert read_parameters(tmp_path / "clip.png")["fps"] == 4
    av = pytest.importorskip("av")
    main(["generate", PROMPT, "--model", str(video_model), "--frames", "3", "--steps", "2", "--num-images", "2",
          "-o", str(tmp_path / "m.mp4")])
    assert {p.name for p in tmp_path.glob("m*")} == {"m_000.mp4", "m_001.mp4", "m.png"}
    with av.open(str(tmp_path / "m_001.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (128, 128, 3)  # 16 px frames enlarged 8x, nearest neighbour
    capsys.readouterr()
    for model, out, message in [("no/such/model", "x.avi", "must end in .png"),
                                (image_model, "x.webp", "not a video model")]:
        with pytest.raises(SystemExit):
            main(["generate", PROMPT, "--model", str(model), "-o", str(tmp_path / out)])
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))


def test_train_video_resumes_bitwise(image_model, tmp_path):
    straight = _train(image_model, tmp_path / "a", "--set", "steps=4")
    _train(image_model, tmp_path / "b", "--set", "steps=2")  # a checkpoint at step 2
    resumed = _train(image_model, tmp_path / "b", "--set", "steps=4", "--resume")
    a = read_model_folder(straight).denoiser.network.state_dict()
    b = read_model_folder(resumed).denoiser.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_video_with_temporal_cross_attention_and_the_judges_checkpoint_loader(image_model, tmp_path):
    import importlib.util
    from pathlib import Path

    folder = _train(image_model, tmp_path / "run", "--set", "temporal_cross_attention=true")
    video = read_model_folder(folder)
    assert video.spec.video_unet.temporal_cross_attention
    state = video.denoiser.network.state_dict()
    assert any(k.startswith("temporal.") and ".cross." in k for k in state)
    # benchmarks/video_judge.py --checkpoint: the last checkpoint's EMA weights are the model folder's
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "video_judge.py"
    spec = importlib.util.spec_from_file_location("video_judge", path)
    judge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(judge)
    pipe = load(folder)
    with torch.no_grad():
        for p in pipe.denoiser.network.temporal_parameters():
            p.zero_()
    last = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    judge.load_ema(pipe, last)
    for k, v in pipe.denoiser.network.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_train_video_init_fine_tunes_a_video_model_with_a_lower_spatial_lr(image_model, tmp_path):
    import json

    start = _train(image_model, tmp_path / "all", "--set", "train=all")  # spatial weights differ from the image's
    # train = temporal from it: the frozen spatial weights are the init's, not the image model's
    tuned = _train(image_model, tmp_path / "tuned", "--set", f"init={start}")
    init, image = read_model_folder(start).denoiser.network.state_dict(), read_model_folder(image_model)
    state = read_model_folder(tuned).denoiser.network.state_dict()
    spatial = image.denoiser.network.state_dict()
    assert any(not torch.equal(init[k], v) for k, v in spatial.items())
    for k in spatial:
        torch.testing.assert_close(state[k], init[k], rtol=0, atol=0)
    assert any(not torch.equal(state[k], init[k]) for k in state if k.startswith("temporal."))
    # train = all with spatial_lr: the image weights' group runs at spatial_lr / lr of the schedule
    _train(image_model, tmp_path / "both", "--set", f"init={start}", "--set", "train=all", "--set", "lr=1e-3",
           "--set", "spatial_lr=1e-4")
    last = tmp_path / "both" / "checkpoints" / (tmp_path / "both" / "checkpoints" / "latest").read_text().strip()
    groups = json.loads((last / "optimizer.json").read_text())["param_groups"]
    assert len(groups) == 2 and groups[0]["lr"] > 0
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] / 10) and groups[1]["lr_scale"] == pytest.approx(0.1)


def test_train_video_init_refuses_what_it_cannot_start_from(image_model, video_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(image_model, tmp_path / "a", "--set", f"init={image_model}")
    assert "is a unet model, not a train-video one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(image_model, tmp_path / "b", "--set", f"init={video_model}", "--set", "temporal_cross_attention=true")
    assert "differing: temporal_cross_attention" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train(image_model, tmp_path / "c", "--set", "spatial_lr=1e-4")  # train = temporal trains no image weight
    assert "only train = 'all' trains" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_video_guidance_is_the_folders_recommendation(image_model, video_model, tmp_path):
    assert read_model_folder(video_model).index.generation.guidance == read_model_folder(image_model).index.generation.guidance
    folder = _train(image_model, tmp_path / "run", "--set", "guidance=1.5", "--set", "steps=1")
    assert read_model_folder(folder).index.generation.guidance == 1.5
    assert load(folder).settings().guidance == 1.5 and load(folder).settings(guidance=3.0).guidance == 3.0


@pytest.mark.parametrize("preset", ["moving-shapes", "moving-shapes-ft", "moving-shapes-polish", "moving-shapes-test"])
def test_video_presets_are_valid_configs(preset):
    from latentdiff.config import from_dict
    from latentdiff.train.video import VIDEO_PRESETS, VideoTrainConfig

    cfg = from_dict(VideoTrainConfig, VIDEO_PRESETS[preset])
    assert cfg.frames <= cfg.max_frames and (cfg.train == "all" or not cfg.spatial_lr)
    if preset == "moving-shapes-polish":  # the -ft run's layers (init must match them) at a third of its lr
        ft = from_dict(VideoTrainConfig, VIDEO_PRESETS["moving-shapes-ft"])
        assert cfg.temporal_cross_attention == ft.temporal_cross_attention and cfg.train == ft.train == "all"
        assert cfg.lr == pytest.approx(ft.lr * 0.3) and cfg.spatial_lr == pytest.approx(ft.spatial_lr * 0.3)
        assert cfg.ema_decay > ft.ema_decay
