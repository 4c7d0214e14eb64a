"""Audio front end in torch only: mel spectrograms (``torch.stft`` and our own Slaney mel filter bank), their
inversion to waveforms (Griffin-Lim with momentum over ``torch.istft``), and 16-bit PCM WAV files (stdlib ``wave``)
that carry their generation parameters (JSON in a ``LIST``/``INFO`` ``ICMT`` chunk after the samples).

A mel spectrogram is an image to the rest of latentdiff: (1, n_mels, frames) in [-1, 1], low frequencies in row 0,
log power mapped linearly from [max_db - top_db, max_db] dB. ``MelSpec`` owns every constant of that mapping and is
stored in an audio model's ``model_index.json``.
"""

from __future__ import annotations

import io
import json
import math
import struct
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from latentdiff.config import COUNT, at_least, between, bounds
from latentdiff.io import atomic_path


@dataclass
class MelSpec:
    """How waveforms become mel spectrograms and back (an audio model's front end)."""

    sample_rate: int = 16000  # samples per second
    n_fft: int = 1024  # STFT window (Hann) and FFT size, in samples
    hop_length: int = 256  # samples between frames: a frame is hop_length / sample_rate seconds
    n_mels: int = 64  # mel bands (the spectrogram's height)
    f_min: float = 0.0  # lowest band edge in Hz
    f_max: float = 8000.0  # highest band edge in Hz (at most sample_rate / 2)
    max_db: float = 30.0  # mel power (dB) mapped to +1
    top_db: float = 80.0  # dynamic range: max_db - top_db dB (and anything quieter) maps to -1
    griffin_lim_iters: int = 64  # Griffin-Lim iterations when decoding to a waveform

    BOUNDS = bounds({"sample_rate": between(1000, 384000), "n_fft": between(16, 65536), "hop_length": COUNT,
                     "n_mels": between(2, 1024), "f_min": at_least(0), "f_max": at_least(1), "top_db": at_least(1),
                     "griffin_lim_iters": between(0, 10000)})

    def __post_init__(self):
        if not self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"mel band edges must satisfy 0 <= f_min < f_max <= sample_rate / 2, got f_min "
                             f"{self.f_min}, f_max {self.f_max}, sample_rate {self.sample_rate}")
        if self.hop_length > self.n_fft:
            raise ValueError(f"hop_length {self.hop_length} must be at most n_fft {self.n_fft}")

    def frames(self, seconds: float) -> int:
        """Spectrogram frames of a clip this many seconds long (rounded)."""
        return round(seconds * self.sample_rate / self.hop_length)

    def seconds(self, frames: int) -> float:
        """The length in seconds of a spectrogram of ``frames`` frames."""
        return frames * self.hop_length / self.sample_rate


def hz_to_mel(hz: Tensor) -> Tensor:
    """Slaney's mel scale (Auditory Toolbox; librosa's default): linear below 1 kHz, logarithmic above."""
    hz = torch.as_tensor(hz, dtype=torch.float64)
    linear = hz / (200.0 / 3)
    log = 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return torch.where(hz >= 1000.0, log, linear)


def mel_to_hz(mel: Tensor) -> Tensor:
    """The inverse of ``hz_to_mel``."""
    mel = torch.as_tensor(mel, dtype=torch.float64)
    linear = mel * (200.0 / 3)
    log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (mel - 15.0))
    return torch.where(mel >= 15.0, log, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """Triangular mel filters (n_mels, n_fft // 2 + 1), float64, each normalized to unit area (Slaney's norm), so
    a band's output is the mean power over its band; Slaney 1998, as ``librosa.filters.mel``'s defaults."""
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                     dtype=torch.float64))  # (n_mels + 2,) band edges and centres in Hz
    widths = edges.diff()  # (n_mels + 1,)
    ramps = edges[:, None] - fft_hz[None, :]  # (n_mels + 2, n_freqs)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0)  # (n_mels, n_freqs)
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


def _window(spec: MelSpec, device) -> Tensor:
    return torch.hann_window(spec.n_fft, periodic=True, dtype=torch.float32, device=device)


def stft(wave: Tensor, spec: MelSpec) -> Tensor:
    """Complex STFT (B, n_fft // 2 + 1, T // hop + 1) of waveforms (B, T), centred frames, reflect padding."""
    return torch.stft(wave.float(), spec.n_fft, spec.hop_length, window=_window(spec, wave.device), center=True,
                      pad_mode="reflect", return_complex=True)


def mel_power(wave: Tensor, spec: MelSpec) -> Tensor:
    """Mel power spectrogram (B, n_mels, T // hop + 1) of waveforms (B, T)."""
    bank = mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.f_min, spec.f_max).float()
    return torch.einsum("mf,bft->bmt", bank.to(wave.device), stft(wave, spec).abs().pow(2))


def normalize_db(power: Tensor, spec: MelSpec) -> Tensor:
    """Mel power -> [-1, 1]: 10 log10 power clipped to [max_db - top_db, max_db], mapped linearly."""
    db = 10 * torch.log10(power.clamp(min=1e-12))
    return ((db - spec.max_db) / spec.top_db * 2 + 1).clamp(-1, 1)


def denormalize_db(mel: Tensor, spec: MelSpec) -> Tensor:
    """The inverse of ``normalize_db`` (clipped values stay clipped): [-1, 1] -> mel power."""
    db = (mel.float().clamp(-1, 1) - 1) / 2 * spec.top_db + spec.max_db
    return torch.pow(10.0, db / 10)


def wave_to_mel(wave: Tensor, spec: MelSpec, frames: int | None = None) -> Tensor:
    """Waveforms (B, T) -> normalized mel spectrograms (B, 1, n_mels, frames) in [-1, 1]; ``frames`` defaults to
    T // hop (the STFT's last, half-padded frame dropped, so T = frames * hop gives exactly ``frames``)."""
    if wave.ndim != 2:
        raise ValueError(f"expected waveforms of shape (B, T), got {tuple(wave.shape)}")
    frames = wave.shape[1] // spec.hop_length if frames is None else frames
    mel = normalize_db(mel_power(wave, spec), spec)
    if mel.shape[-1] < frames:
        raise ValueError(f"{wave.shape[1]} samples make {mel.shape[-1]} frames, fewer than the {frames} asked")
    return mel[:, None, :, :frames]


def mel_to_linear(power: Tensor, spec: MelSpec) -> Tensor:
    """Mel power (B, n_mels, T) -> a non-negative linear power spectrogram (B, n_freqs, T) that the mel filter bank
    maps back onto it: least squares through the bank's pseudo-inverse, then projected-gradient steps on the
    non-negativity constraint (as librosa's NNLS inversion)."""
    bank = mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.f_min, spec.f_max).to(power.device)
    target = power.double()
    x = (torch.linalg.pinv(bank) @ target).clamp(min=0)  # (B, F, T)
    step = 1.0 / torch.linalg.matrix_norm(bank, ord=2) ** 2
    for _ in range(32):
        x = (x - step * (bank.T @ (bank @ x - target))).clamp(min=0)
    return x.float()


def griffin_lim(magnitude: Tensor, spec: MelSpec, length: int, iters: int | None = None, momentum: float = 0.99,
                seed: int = 0) -> Tensor:
    """Waveforms (B, length) whose STFT magnitude approaches ``magnitude`` (B, n_freqs, T): Griffin & Lim 1984 with
    the fast momentum update of Perraudin et al. 2013; the first phases random from ``seed``."""
    iters = spec.griffin_lim_iters if iters is None else iters
    window = _window(spec, magnitude.device)
    gen = torch.Generator("cpu").manual_seed(seed)
    phase = torch.exp(2j * math.pi * torch.rand(magnitude.shape, generator=gen)).to(magnitude.device)
    previous = torch.zeros_like(phase)

    def inverse(z: Tensor) -> Tensor:
        return torch.istft(z, spec.n_fft, spec.hop_length, window=window, center=True, length=length)

    for _ in range(iters):
        # Project onto consistent spectrograms, then take the phase, accelerated by the last projection.
        rebuilt = torch.stft(inverse(magnitude * phase), spec.n_fft, spec.hop_length, window=window, center=True,
                             pad_mode="reflect", return_complex=True)
        phase = rebuilt - (momentum / (1 + momentum)) * previous
        phase = phase / phase.abs().clamp(min=1e-16)
        previous = rebuilt
    return inverse(magnitude * phase)


def mel_to_wave(mel: Tensor, spec: MelSpec, iters: int | None = None, seed: int = 0) -> Tensor:
    """Normalized mel spectrograms (B, 1, n_mels, frames) -> waveforms (B, frames * hop) by Griffin-Lim."""
    if mel.ndim != 4 or mel.shape[1] != 1 or mel.shape[2] != spec.n_mels:
        raise ValueError(f"expected mel spectrograms of shape (B, 1, {spec.n_mels}, frames), got {tuple(mel.shape)}")
    power = denormalize_db(mel[:, 0], spec)
    power = torch.cat([power, power[..., -1:]], dim=-1)  # the STFT's last frame, which wave_to_mel drops
    magnitude = mel_to_linear(power, spec).sqrt()
    return griffin_lim(magnitude, spec, mel.shape[-1] * spec.hop_length, iters=iters, seed=seed)


def write_wav(path: str | Path, wave_: Tensor | np.ndarray, sample_rate: int, parameters: dict | None = None) -> Path:
    """Write a mono waveform (T,) in [-1, 1] as a 16-bit PCM WAV file, atomically; values outside are clipped.
    ``parameters`` go after the samples, as JSON in a ``LIST``/``INFO`` chunk's ``ICMT`` comment
    (:func:`read_wav_parameters` reads them; ``wave``, libsndfile and players skip or show it)."""
    data = _wav(_pcm16(wave_, f"the waveform for {path}"), sample_rate, parameters)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def wav_bytes(wave_: Tensor | np.ndarray, sample_rate: int, parameters: dict | None = None) -> bytes:
    """The WAV file :func:`write_wav` writes, as bytes (the server's responses)."""
    return _wav(_pcm16(wave_, "the waveform"), sample_rate, parameters)


def _pcm16(wave_: Tensor | np.ndarray, what: str) -> np.ndarray:
    samples = np.asarray(wave_.detach().cpu() if isinstance(wave_, Tensor) else wave_, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (T,), got {samples.shape}")
    if not np.isfinite(samples).all():
        raise ValueError(f"{what} has non-finite samples")
    return np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")


def _wav(pcm: np.ndarray, sample_rate: int, parameters: dict | None) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
    data = buffer.getvalue()
    if parameters is None:
        return data
    text = json.dumps(parameters, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\0"
    info = b"INFO" + _chunk(b"ICMT", text)
    data += _chunk(b"LIST", info)  # after the data chunk: every reader finds the samples where they were
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]  # the RIFF size covers the new chunk


def _chunk(tag: bytes, body: bytes) -> bytes:
    """A RIFF chunk: tag, little-endian size (the body's, unpadded), body, a pad byte to an even length."""
    return tag + struct.pack("<I", len(body)) + body + b"\0" * (len(body) % 2)


def read_wav_parameters(source) -> dict | None:
    """The generation parameters a WAV written by :func:`write_wav` carries (a path, the file's bytes, or a binary
    file), or None; ValueError for a file that is not RIFF/WAVE."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _wav_comment(io.BytesIO(source), "the WAV bytes")
    if hasattr(source, "read"):
        return _wav_comment(source, "the WAV file")
    with open(source, "rb") as f:
        return _wav_comment(f, str(source))


def _wav_comment(f, what: str) -> dict | None:
    """Walk the RIFF chunks (reading only their headers, and LIST bodies) for LIST/INFO/ICMT, parsed as JSON."""
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise ValueError(f"{what} is not a WAV file (no RIFF/WAVE header)")
    while len(header := f.read(8)) == 8:
        tag, size = header[:4], struct.unpack("<I", header[4:])[0]
        if tag != b"LIST":
            f.seek(size + size % 2, io.SEEK_CUR)
            continue
        body = f.read(size + size % 2)[:size]
        if body[:4] != b"INFO":
            continue
        at = 4
        while at + 8 <= len(body):
            sub, length = body[at:at + 4], struct.unpack("<I", body[at + 4:at + 8])[0]
            if sub == b"ICMT":
                text = body[at + 8:at + 8 + length].rstrip(b"\0").decode("utf-8", errors="replace")
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    return None  # another program's comment: no parameters of ours
            at += 8 + length + length % 2
    return None


def read_wav(path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file (a path or a binary file) -> (mono float32 waveform in [-1, 1], sample rate); channels
    are averaged."""
    with wave.open(path if hasattr(path, "read") else str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV files are read, this one has {8 * f.getsampwidth()}-bit "
                             "samples")
        channels, rate = f.getnchannels(), f.getframerate()
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float32) / 32767
    return data.reshape(-1, channels).mean(axis=1), rate
