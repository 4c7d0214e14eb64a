"""The built-in `tones` clips: one instrument playing one named pitch one to four times, with captions, held-out
(pitch, instrument) pairs, and a judge that reads pitch, note count and instrument back from a waveform.

"a piano note C5 played three times". Instruments are simple additive timbres: "flute" (a sine with a trace of
its octave), "organ" (odd harmonics, square-ish, sustained), "piano" (every harmonic, decaying). A clip's truth is a
``Tone``; ``judge_tone`` reads the pitch from the spectral peak, the note count from the energy envelope's
segments and the instrument from the harmonic profile (2nd and 3rd harmonic against the fundamental).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from latentdiff.audio import MelSpec, wave_to_mel

from .buckets import batch_indices

PITCHES: dict[str, float] = {"C4": 261.63, "G4": 392.00, "C5": 523.25, "G5": 783.99, "C6": 1046.50}  # Hz
TIMBRES = ("flute", "organ", "piano")
COUNTS: dict[int, str] = {1: "once", 2: "twice", 3: "three times", 4: "four times"}
# (pitch, instrument) pairs only in the held-out split: each instrument once, each pitch at most once, so every
# pitch and every instrument is still heard in training, never together in these pairs.
HELDOUT_PAIRS = frozenset({("G4", "piano"), ("C5", "organ"), ("G5", "flute")})
SPLITS = ("train", "heldout")
# Partial amplitudes (fundamental first) of each instrument.
HARMONICS: dict[str, tuple[float, ...]] = {
    "flute": (1.0, 0.04),
    "organ": (1.0, 0.0, 1 / 3, 0.0, 1 / 5, 0.0, 1 / 7),
    "piano": (1.0, 0.5, 1 / 3, 1 / 4, 1 / 5, 1 / 6),
}
PIANO_DECAY = 0.2  # seconds: the piano fundamental's exponential decay; partial k decays (1 + (k - 1) / 2) times faster
ATTACK, RELEASE = 0.01, 0.04  # seconds of linear fade in and out of every note
# Judge thresholds: the envelope's segments (hysteresis on the peak-normalized frame RMS), the harmonic ratios.
ONSET_HIGH, ONSET_LOW, MIN_NOTE = 0.5, 0.2, 0.04  # a note starts above 0.5, ends below 0.2, lasts >= 40 ms
PIANO_R2, ORGAN_R3 = 0.2, 0.15  # 2nd harmonic / fundamental above 0.2: piano; else 3rd above 0.15: organ
_CAPTION_RE = re.compile(r"\b(flute|organ|piano)\b.*?\b([a-g][0-9])\b.*?\b(once|twice|three times|four times)\b")


@dataclass(frozen=True)
class Tone:
    """What a clip plays: an instrument, a pitch, and how many times."""

    pitch: str  # a key of PITCHES
    timbre: str  # one of TIMBRES
    count: int  # notes, a key of COUNTS

    def __post_init__(self):
        if self.pitch not in PITCHES:
            raise ValueError(f"unknown pitch {self.pitch!r}: expected one of {', '.join(PITCHES)}")
        if self.timbre not in TIMBRES:
            raise ValueError(f"unknown instrument {self.timbre!r}: expected one of {', '.join(TIMBRES)}")
        if self.count not in COUNTS:
            raise ValueError(f"note count must be 1 to 4, got {self.count!r}")


def pairs(split: str) -> list[tuple[str, str]]:
    """The (pitch, instrument) pairs of a split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    every = [(p, t) for p in PITCHES for t in TIMBRES]
    return [pt for pt in every if (pt in HELDOUT_PAIRS) == (split == "heldout")]


def sample_tone(rng: np.random.Generator, split: str = "train") -> Tone:
    """A random tone of the split: a pair of the split, one to four notes."""
    options = pairs(split)
    pitch, timbre = options[int(rng.integers(len(options)))]
    return Tone(pitch, timbre, int(rng.integers(1, 5)))


def tone_caption(tone: Tone) -> str:
    """The clip's caption: "a piano note C5 played three times"."""
    return f"a {tone.timbre} note {tone.pitch} played {COUNTS[tone.count]}"


def parse_tone_caption(text: str) -> Tone | None:
    """Read a caption (or a prompt in the same words) back into a Tone; None if it names no instrument, pitch and
    count in that order."""
    m = _CAPTION_RE.search(text.lower())
    if m is None or m.group(2).upper() not in PITCHES:
        return None
    count = next(k for k, v in COUNTS.items() if v == m.group(3))
    return Tone(m.group(2).upper(), m.group(1), count)


def render_tone(tone: Tone, samples: int, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """The clip's waveform (samples,) float32: ``tone.count`` evenly spaced notes, each a sum of the instrument's
    partials with a linear attack and release (the piano's decaying), random loudness, start and note length."""
    rng = np.random.default_rng(seed)
    seconds = samples / sample_rate
    loudness, start, fill = rng.uniform(0.3, 0.6), rng.uniform(0.01, 0.05), rng.uniform(0.5, 0.75)
    slot = (seconds - start) / tone.count  # each note's share of the clip; it sounds for ``fill`` of it
    t = np.arange(samples) / sample_rate
    wave = np.zeros(samples)
    f0 = PITCHES[tone.pitch]
    for k in range(tone.count):
        onset, length = start + k * slot, fill * slot
        local = t - onset
        inside = (local >= 0) & (local < length)
        env = np.clip(np.minimum(local / ATTACK, (length - local) / RELEASE), 0, 1) * inside
        for h, amp in enumerate(HARMONICS[tone.timbre], start=1):
            if amp == 0 or h * f0 > 0.45 * sample_rate:
                continue
            decay = np.exp(-np.clip(local, 0, None) * (1 + (h - 1) / 2) / PIANO_DECAY) if tone.timbre == "piano" else 1.0
            phase = rng.uniform(0, 2 * math.pi)
            wave += amp * env * decay * np.sin(2 * math.pi * h * f0 * local + phase)
    return (wave * loudness / max(np.abs(wave).max(), 1e-9)).astype(np.float32)


@dataclass
class ToneReading:
    """What the judge reads from a clip."""

    pitch: str | None  # the nearest key of PITCHES to the spectral peak (None: silence)
    timbre: str | None  # one of TIMBRES (None: silence)
    count: int  # notes: segments of the energy envelope (0: silence)
    f0: float  # the spectral peak in Hz
    ratios: tuple[float, float]  # 2nd and 3rd harmonic amplitude over the fundamental's


def note_segments(wave: np.ndarray, sample_rate: int) -> list[tuple[int, int]]:
    """The notes of a waveform as (first, last) frames of 8 ms: where the peak-normalized RMS envelope (smoothed
    over 3 frames) rises above ONSET_HIGH until it falls below ONSET_LOW, kept if at least MIN_NOTE long."""
    hop = max(1, sample_rate // 125)
    frames = len(wave) // hop
    rms = np.sqrt(np.mean(np.asarray(wave[:frames * hop], dtype=np.float64).reshape(frames, hop) ** 2, axis=1))
    env = np.convolve(rms, np.ones(3) / 3, mode="same")
    if env.max() <= 1e-4:  # silence (below -80 dB of full scale)
        return []
    env = env / env.max()
    segments, begin = [], None
    for i, v in enumerate(env):
        if begin is None and v > ONSET_HIGH:
            begin = i
        elif begin is not None and v < ONSET_LOW:
            segments.append((begin, i - 1))
            begin = None
    if begin is not None:
        segments.append((begin, frames - 1))
    return [(a, b) for a, b in segments if (b - a + 1) * hop >= MIN_NOTE * sample_rate]


def judge_tone(wave, sample_rate: int = 16000) -> ToneReading:
    """Read a clip (a waveform: array or tensor (T,)): pitch, instrument and note count."""
    wave = np.asarray(wave.detach().cpu() if isinstance(wave, torch.Tensor) else wave, dtype=np.float64).reshape(-1)
    count = len(note_segments(wave, sample_rate))
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    hz_per_bin = sample_rate / len(wave)
    width = max(1, round(20 / hz_per_bin))  # smoothed over 20 Hz: a smeared (Griffin-Lim) peak still has one top
    smooth = np.convolve(spectrum, np.ones(width) / width, mode="same")
    lo, hi = round(150 / hz_per_bin), round(1500 / hz_per_bin)
    if count == 0 or smooth[lo:hi].max() <= 0:
        return ToneReading(None, None, count, 0.0, (0.0, 0.0))
    peak = lo + int(np.argmax(smooth[lo:hi]))
    f0 = peak * hz_per_bin
    pitch = min(PITCHES, key=lambda p: abs(math.log(f0 / PITCHES[p])))

    def partial(k: int) -> float:
        """The largest smoothed amplitude within 4% of the k-th harmonic of f0."""
        a, b = round(k * peak * 0.96), round(k * peak * 1.04) + 1
        return float(smooth[a:b].max()) if a < len(smooth) else 0.0

    r2, r3 = partial(2) / smooth[peak], partial(3) / smooth[peak]
    timbre = "piano" if r2 > PIANO_R2 else "organ" if r3 > ORGAN_R3 else "flute"
    return ToneReading(pitch, timbre, count, f0, (r2, r3))


def standard_error(p: float, n: int) -> float:
    """One standard error of a proportion p measured on n trials."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def score_tones(waves, tones: list[Tone], sample_rate: int = 16000) -> dict:
    """Judge clips against their truth: the share with the right pitch, note count, instrument, pitch and count
    (the issue's goal), all three; each with its standard error (``*_se``), and n."""
    waves, tones = list(waves), list(tones)
    if len(waves) != len(tones):
        raise ValueError(f"got {len(waves)} clips but {len(tones)} truths")
    if not tones:
        raise ValueError("score_tones needs at least one clip")
    hits = {"pitch": 0, "count": 0, "timbre": 0, "pitch_and_count": 0, "all": 0}
    for wave, truth in zip(waves, tones):
        r = judge_tone(wave, sample_rate)
        right = {"pitch": r.pitch == truth.pitch, "count": r.count == truth.count, "timbre": r.timbre == truth.timbre}
        right["pitch_and_count"] = right["pitch"] and right["count"]
        right["all"] = right["pitch_and_count"] and right["timbre"]
        for k, v in right.items():
            hits[k] += v
    n = len(tones)
    return {**{f"{k}_accuracy": v / n for k, v in hits.items()},
            **{f"{k}_se": standard_error(v / n, n) for k, v in hits.items()}, "n": n}


class ToneSet(torch.utils.data.Dataset):
    """n tone clips as mel spectrograms, ``images`` to the autoencoder: item i depends only on (seed, split, i).
    ``frames`` mel frames make a clip of frames * hop samples; ``train-vae --set data=tones`` takes
    ``image_size`` mel bands by ``image_size`` frames (``make_image_dataset``)."""

    def __init__(self, n: int, spec: MelSpec | None = None, frames: int = 64, seed: int = 0, split: str = "train"):
        if n < 1:
            raise ValueError(f"the tone set needs at least one clip, got {n}")
        pairs(split)  # validates split
        self.n, self.spec, self.frames, self.seed, self.split = n, spec or MelSpec(), frames, seed, split

    def __len__(self) -> int:
        return self.n

    def clip(self, index: int) -> tuple[Tone, np.ndarray]:
        """Item ``index``'s truth and waveform."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} clips")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        tone = sample_tone(rng, self.split)
        samples = self.frames * self.spec.hop_length
        return tone, render_tone(tone, samples, self.spec.sample_rate, seed=int(rng.integers(2**31)))

    def __getitem__(self, index: int) -> dict:
        """dict(image=(1, n_mels, frames) float in [-1, 1], caption=str, tone=Tone)."""
        tone, wave = self.clip(index)
        mel = wave_to_mel(torch.from_numpy(wave)[None], self.spec, self.frames)[0]
        return {"image": mel, "caption": tone_caption(tone), "tone": tone}


def validate_tones(n: int = 120, seed: int = 0, split: str = "train", spec: MelSpec | None = None,
                   frames: int = 64, griffin_lim: bool = False) -> dict:
    """The judge's accuracy on rendered clips (``griffin_lim``: after a mel -> Griffin-Lim round trip, the ceiling
    of an audio model that makes perfect mel spectrograms)."""
    from latentdiff.audio import mel_to_wave

    data = ToneSet(n, spec, frames, seed, split)
    tones, waves = zip(*(data.clip(i) for i in range(n)))
    if griffin_lim:
        mels = torch.stack([data[i]["image"] for i in range(n)])
        waves = list(mel_to_wave(mels, data.spec).numpy())
    return score_tones(waves, list(tones), data.spec.sample_rate)


class ToneLatents:
    """``n`` tone clips' mel spectrograms encoded with an autoencoder (posterior mode), held in memory: ``latents``
    (n, C, h, w) normalized, ``captions``, ``tones``; the data order is ``batch_indices``'s."""

    bucketed = False  # the run engine's batch split: one global batch of equal items

    def __init__(self, autoencoder, n: int, spec: MelSpec, frames: int, seed: int = 0, batch: int = 64):
        data = ToneSet(n, spec, frames, seed, "train")
        items = [data[i] for i in range(n)]
        self.tones = [it["tone"] for it in items]
        self.captions = [it["caption"] for it in items]
        mels = torch.stack([it["image"] for it in items])  # (n, 1, n_mels, frames)
        param = next(autoencoder.parameters())
        with torch.no_grad():
            self.latents = torch.cat([autoencoder.encode(mels[i:i + batch].to(param.device, param.dtype)).float().cpu()
                                      for i in range(0, n, batch)])  # (n, C, h, w)

    def __len__(self) -> int:
        return len(self.tones)

    def batch_indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        return batch_indices(step, batch_size, len(self), seed)
