"""The built-in `tones` clips and their judge (latentdiff/data/tones.py)."""

import numpy as np
import pytest
import torch

from latentdiff.audio import MelSpec
from latentdiff.data.tones import (
    HELDOUT_PAIRS,
    PITCHES,
    TIMBRES,
    Tone,
    ToneSet,
    judge_tone,
    pairs,
    parse_tone_caption,
    render_tone,
    score_tones,
    tone_caption,
    validate_tones,
)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_judge_reads_rendered_clips(split):
    report = validate_tones(80, seed=1, split=split)
    assert report["pitch_accuracy"] >= 0.95 and report["count_accuracy"] >= 0.95
    assert report["timbre_accuracy"] >= 0.95 and report["all_accuracy"] >= 0.95


def test_judge_reads_griffin_lim_round_trips():
    # The ceiling of an audio model: a perfect mel spectrogram, decoded by Griffin-Lim.
    report = validate_tones(12, seed=2, griffin_lim=True)
    assert report["pitch_and_count_accuracy"] >= 0.9 and report["all_accuracy"] >= 0.9


def test_judge_on_chosen_tones_and_silence():
    for pitch in PITCHES:
        for timbre in TIMBRES:
            for count in (1, 4):
                tone = Tone(pitch, timbre, count)
                r = judge_tone(render_tone(tone, 16384, seed=3))
                assert (r.pitch, r.timbre, r.count) == (pitch, timbre, count), (tone, r)
    silent = judge_tone(np.zeros(16384))
    assert silent.count == 0 and silent.pitch is None
    # A wrong reading scores as wrong.
    wave = render_tone(Tone("C5", "organ", 2), 16384)
    report = score_tones([wave, wave], [Tone("C5", "organ", 2), Tone("G4", "organ", 3)])
    assert report["pitch_accuracy"] == 0.5 and report["count_accuracy"] == 0.5 and report["n"] == 2
    assert report["pitch_se"] == pytest.approx(0.5 / 2**0.5) and report["timbre_se"] == 0.0  # sqrt(p (1 - p) / n)


def test_captions_round_trip_and_splits():
    for split in ("train", "heldout"):
        for pitch, timbre in pairs(split):
            assert ((pitch, timbre) in HELDOUT_PAIRS) == (split == "heldout")
            tone = Tone(pitch, timbre, 3)
            assert parse_tone_caption(tone_caption(tone)) == tone
    assert tone_caption(Tone("C5", "piano", 3)) == "a piano note C5 played three times"
    assert parse_tone_caption("a red circle") is None
    assert len(pairs("train")) + len(pairs("heldout")) == len(PITCHES) * len(TIMBRES)
    with pytest.raises(ValueError, match="note count"):
        Tone("C5", "piano", 5)
    with pytest.raises(ValueError, match="split"):
        pairs("test")


def test_tone_set_items():
    data = ToneSet(6, MelSpec(), frames=32, seed=4, split="heldout")
    item = data[2]
    assert item["image"].shape == (1, 64, 32) and -1 <= item["image"].min() and item["image"].max() <= 1
    assert (item["tone"].pitch, item["tone"].timbre) in HELDOUT_PAIRS
    assert parse_tone_caption(item["caption"]) == item["tone"]
    torch.testing.assert_close(ToneSet(6, MelSpec(), 32, 4, "heldout")[2]["image"], item["image"])  # deterministic
    with pytest.raises(IndexError):
        data.clip(6)
