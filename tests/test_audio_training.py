"""train-vae on tones, train-audio on the run engine, audio generation (Pipeline.generate_audio, `generate` writing
WAV files), bad input."""

import pytest
import torch
from _tiny import tiny_audio_model, tiny_model_folder

from latentdiff.audio import MelSpec, read_wav, read_wav_parameters
from latentdiff.cli import main
from latentdiff.components import read_model_folder
from latentdiff.images import read_parameters
from latentdiff.model_index import ModelIndex
from latentdiff.pipeline import load

PROMPT = "a piano note C5 played twice"


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    return tiny_audio_model(tmp_path_factory.mktemp("audio"))


def test_train_audio_writes_an_audio_model(audio_model):
    folder = read_model_folder(audio_model)
    assert folder.autoencoder.config.in_channels == 1
    assert folder.index.audio == MelSpec(n_mels=16) and folder.index.sample_size == 16
    assert (audio_model.parent / "samples" / "step_0000002.png").is_file()
    assert ModelIndex.read(audio_model) == folder.index  # the mel front end survives the index round trip


def test_generate_audio(audio_model):
    pipe = load(audio_model)
    waves, mels = pipe.generate_audio([PROMPT, "a flute note G4 played once"], steps=2)
    assert waves.shape == (2, 16 * 256) and mels.shape == (2, 1, 16, 16)
    assert torch.isfinite(waves).all() and waves.abs().max() <= 1
    again, _ = pipe.generate_audio([PROMPT, "a flute note G4 played once"], steps=2)
    torch.testing.assert_close(again, waves)  # same seed, same clips
    longer, mels = pipe.generate_audio(PROMPT, steps=2, seconds=0.512)
    assert longer.shape == (1, 32 * 256) and mels.shape == (1, 1, 16, 32)
    with pytest.raises(ValueError, match="multiple of 8 frames .* try 0.512 s"):
        pipe.generate_audio(PROMPT, seconds=0.5)
    with pytest.raises(ValueError, match="seconds"):
        pipe.generate_audio(PROMPT, seconds=-1.0)
    with pytest.raises(ValueError, match="sets height"):
        pipe.generate_audio(PROMPT, height=16)


def test_generate_command_writes_wav_files(audio_model, tmp_path, capsys):
    out = tmp_path / "clip.wav"
    main(["generate", PROMPT, "a flute note G4 played once", "--model", str(audio_model), "--steps", "2", "-o",
          str(out)])
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "clip_000.wav"), str(tmp_path / "clip_001.wav"), str(tmp_path / "clip.png")]
    wave, rate = read_wav(tmp_path / "clip_000.wav")
    assert rate == 16000 and wave.shape == (16 * 256,)
    params = read_parameters(tmp_path / "clip.png")
    assert params["prompt"] == [PROMPT, "a flute note G4 played once"] and params["sample_rate"] == 16000
    for i, prompt in enumerate([PROMPT, "a flute note G4 played once"]):  # each WAV: the grid's settings, its prompt
        own = read_wav_parameters(tmp_path / f"clip_{i:03d}.wav")
        assert own == {**params, "prompt": prompt, "index": i}
    # Bad lengths: an error before any work, nothing written.
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, "--model", str(audio_model), "-o", str(tmp_path / "bad.wav"), "--seconds", "0.3"])
    assert "try 0.256 s" in capsys.readouterr().err and not list(tmp_path.glob("bad*"))


def test_image_models_refuse_audio_requests(tmp_path, capsys):
    image = tiny_model_folder(tmp_path / "image")
    with pytest.raises(ValueError, match="image model"):
        load(image).generate_audio("a red circle")
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", "--model", str(image), "-o", str(tmp_path / "x.wav")])
    assert "image model" in capsys.readouterr().err and not (tmp_path / "x.wav").exists()


def test_train_audio_refuses_bad_setups(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train-audio", "--preset", "tones-test", "--out", str(tmp_path / "a")])
    assert "train-vae --preset tones" in capsys.readouterr().err
    rgb = tiny_model_folder(tmp_path / "image") / "autoencoder"  # a 3-channel autoencoder
    with pytest.raises(SystemExit):
        main(["train-audio", "--preset", "tones-test", "--out", str(tmp_path / "b"), "--set", f"autoencoder={rgb}"])
    assert "mel spectrograms have one channel" in capsys.readouterr().err
    assert not (tmp_path / "b" / "model").exists()


def test_train_audio_refuses_lengths_the_networks_cannot_take(audio_model, tmp_path, capsys):
    autoencoder = audio_model / "autoencoder"
    with pytest.raises(SystemExit):
        main(["train-audio", "--preset", "tones-test", "--out", str(tmp_path / "c"), "--set", f"autoencoder={autoencoder}",
              "--set", "frames=12"])
    assert "frames = 12 must be a multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-audio", "--preset", "tones-test", "--out", str(tmp_path / "d"), "--set", f"autoencoder={autoencoder}",
              "--set", "mel.f_max=9000"])
    assert "f_max" in capsys.readouterr().err
