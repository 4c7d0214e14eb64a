"""WAV files carry their generation parameters (``write_wav`` / ``wav_bytes`` ``parameters``): JSON in a RIFF
``LIST``/``INFO`` chunk's ``ICMT`` after the samples, read back by ``read_wav_parameters``; the samples every reader
sees are unchanged."""

import io
import struct
import wave

import numpy as np
import pytest

from latentdiff.audio import read_wav, read_wav_parameters, wav_bytes, write_wav

WAVE = np.sin(np.linspace(0, 60, 999)) * 0.8  # an odd number of samples: the data chunk is still even (16-bit)


def chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(tag, size, offset of the body) of every top-level chunk, checking the RIFF size and the even padding."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8 and len(data) % 2 == 0
    out, at = [], 12
    while at < len(data):
        tag, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        out.append((tag, size, at + 8))
        at += 8 + size + size % 2
    assert at == len(data)
    return out


def samples(data: bytes) -> tuple[bytes, tuple]:
    with wave.open(io.BytesIO(data), "rb") as f:
        return f.readframes(f.getnframes()), (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes())


@pytest.mark.parametrize("params", [
    {"prompt": "une note de piano, do5 ♪ — 音", "seed": 7, "guidance": 1.5},  # non-ASCII, written as UTF-8
    {"a": "b"},  # 10 bytes of JSON + NUL: an odd-length comment, padded
    {"a": "bc"},  # 11 + NUL: even, no pad
])
def test_parameters_round_trip_and_leave_the_samples_alone(params, tmp_path):
    plain = wav_bytes(WAVE, 16000)
    data = wav_bytes(WAVE, 16000, params)
    assert read_wav_parameters(data) == params
    path = write_wav(tmp_path / "a.wav", WAVE, 16000, params)
    assert path.read_bytes() == data and read_wav_parameters(path) == params
    with open(path, "rb") as f:
        assert read_wav_parameters(f) == params
    assert samples(data) == samples(plain)  # stdlib wave: the same samples and format, bit for bit
    tags = chunks(data)
    assert [t for t, _, _ in tags] == [b"fmt ", b"data", b"LIST"] and data.startswith(plain[:4])
    assert data[len(plain):len(plain) + 4] == b"LIST" and data[12:len(plain)] == plain[12:]  # appended after data
    _, size, at = tags[-1]
    text = data[at + 12:at + 12 + struct.unpack("<I", data[at + 8:at + 12])[0]]  # ICMT's body, unpadded
    assert data[at:at + 8] == b"INFOICMT" and text.endswith(b"\0") and text.count(b"\0") == 1
    assert text[:-1].decode("utf-8").startswith("{") and size == 4 + 8 + len(text) + len(text) % 2
    back, rate = read_wav(io.BytesIO(data))
    assert rate == 16000 and np.array_equal(back, read_wav(io.BytesIO(plain))[0])


def test_other_readers_see_the_same_samples_and_the_comment():
    sf = pytest.importorskip("soundfile")
    params = {"prompt": "é ♪", "seed": 1}
    data = wav_bytes(WAVE, 22050, params)
    got, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 22050 and np.array_equal(got, np.frombuffer(samples(data)[0], dtype="<i2"))
    with sf.SoundFile(io.BytesIO(data)) as f:
        assert f.comment == '{"prompt": "é ♪", "seed": 1}'  # libsndfile reads ICMT as the comment


def test_no_parameters_reads_none_and_other_comments_are_not_ours(tmp_path):
    assert read_wav_parameters(write_wav(tmp_path / "a.wav", WAVE, 8000)) is None
    data = wav_bytes(WAVE, 8000)
    text = b"recorded on a phone\0"
    info = b"LIST" + struct.pack("<I", 4 + 8 + len(text)) + b"INFOICMT" + struct.pack("<I", len(text)) + text
    other = data[:4] + struct.pack("<I", len(data) - 8 + len(info)) + data[8:] + info
    assert read_wav_parameters(other) is None  # a comment that is not our JSON


def test_a_file_that_is_not_a_wav_is_refused(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(ValueError, match="x.png is not a WAV file"):
        read_wav_parameters(png)
    with pytest.raises(ValueError, match="not a WAV file"):
        read_wav_parameters(b"RIFF\x04\x00\x00\x00AVI ")
    with pytest.raises(ValueError, match="not a WAV file"):
        read_wav_parameters(b"")
