"""The mel front end (latentdiff/audio.py): filter-bank and spectrogram parity with librosa, Griffin-Lim round
trips, WAV files."""

import math

import numpy as np
import pytest
import torch

from latentdiff.audio import (
    MelSpec,
    hz_to_mel,
    mel_filterbank,
    mel_power,
    mel_to_hz,
    mel_to_wave,
    read_wav,
    wave_to_mel,
    write_wav,
)


def _tone(spec: MelSpec, freq: float = 523.25, seconds: float = 1.024) -> torch.Tensor:
    t = torch.arange(round(seconds * spec.sample_rate)) / spec.sample_rate
    wave = 0.4 * torch.sin(2 * math.pi * freq * t) + 0.15 * torch.sin(2 * math.pi * 3 * freq * t)
    return wave * ((t > 0.1) & (t < 0.6))  # a note with silence around it


@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax", [(16000, 1024, 64, 0.0, 8000.0), (22050, 512, 40, 50.0, 6000.0)])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax):
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, dtype=np.float64)
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_mel_scale_analytic():
    # Slaney's scale: 200/3 Hz per mel below 1 kHz (15 mels at 1 kHz), 27 mels per factor 6.4 above.
    assert float(hz_to_mel(torch.tensor(1000.0))) == pytest.approx(15.0)
    assert float(hz_to_mel(torch.tensor(6400.0))) == pytest.approx(42.0)
    hz = torch.tensor([0.0, 200.0, 999.0, 1000.0, 4000.0, 8000.0], dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(hz)), hz)


def test_mel_power_matches_librosa():
    librosa = pytest.importorskip("librosa")
    spec = MelSpec()
    wave = _tone(spec)
    ref = librosa.feature.melspectrogram(y=wave.numpy().astype(np.float64), sr=spec.sample_rate, n_fft=spec.n_fft,
                                         hop_length=spec.hop_length, n_mels=spec.n_mels, fmax=spec.f_max,
                                         pad_mode="reflect")
    ours = mel_power(wave[None], spec)[0].double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-6 * ref.max())


def test_griffin_lim_round_trip():
    spec = MelSpec()
    wave = _tone(spec)
    mel = wave_to_mel(wave[None], spec)  # (1, 1, 64, 64)
    assert mel.shape == (1, 1, spec.n_mels, 64) and mel.min() >= -1 and mel.max() <= 1
    back = mel_to_wave(mel, spec)
    assert back.shape == (1, 64 * spec.hop_length) and torch.isfinite(back).all()
    again = wave_to_mel(back, spec)
    err = (again - mel).abs()
    assert err.mean() < 0.06  # under 2.4 dB on average
    assert err[mel > -0.3].mean() < 0.1  # and under 4 dB where the note sounds
    # Silence stays silent: the frames before the note.
    assert again[..., :3].max() < -0.5
    # Random phases alone (no iterations) are much worse: the iterations do the work.
    assert (wave_to_mel(mel_to_wave(mel, spec, iters=0), spec) - mel).abs().mean() > 1.5 * err.mean()


def test_bad_mel_spec_and_shapes():
    with pytest.raises(ValueError, match="f_max"):
        MelSpec(f_max=9000.0)
    with pytest.raises(ValueError, match="hop_length"):
        MelSpec(n_fft=256, hop_length=512)
    with pytest.raises(ValueError, match="mel spectrograms of shape"):
        mel_to_wave(torch.zeros(1, 1, 32, 8), MelSpec())
    with pytest.raises(ValueError, match="waveforms of shape"):
        wave_to_mel(torch.zeros(100), MelSpec())


def test_wav_round_trip(tmp_path):
    wave = np.sin(np.linspace(0, 100, 1600)) * 0.5
    path = write_wav(tmp_path / "a.wav", torch.tensor(wave), 16000)
    back, rate = read_wav(path)
    assert rate == 16000 and back.shape == wave.shape
    np.testing.assert_allclose(back, wave, atol=1 / 32767)
    with pytest.raises(ValueError, match="non-finite"):
        write_wav(tmp_path / "b.wav", np.array([0.0, np.nan]), 16000)
    assert not (tmp_path / "b.wav").exists()
