"""ImageFolder on a folder of awkward real-world files: mixed formats, modes, sizes, damage, captions."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data.folder import ImageFolder, to_rgb

SIZE = 16
GOOD = {
    "a_red.png",
    "b_photo.jpg",
    "cmyk.jpg",
    "gray.png",
    "gray16.png",
    "gray16_dark.png",
    "palette.png",
    "rgba.png",
    "sub/c_wide.png",
    "sub/deeper/d_tall.jpg",
}
BAD = {  # file -> words the skip reason must contain
    "truncated.jpg": "truncated",
    "empty.png": "UnidentifiedImageError",
    "notes.jpg": "UnidentifiedImageError",
    "tiny.png": "too small",
}


def _noise(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _halves(mode: str, size: tuple[int, int], left, right) -> Image.Image:
    """An image whose left half is ``left`` and right half is ``right``."""
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def build_folder(root):
    """Write every kind of file the loader must cope with into ``root``."""
    (root / "sub" / "deeper").mkdir(parents=True)
    # Normal RGB images of different sizes, aspect ratios and formats, some nested.
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "a_red.png")
    _noise(48, 64, 0).save(root / "b_photo.jpg", quality=90)
    _noise(200, 3000, 1).save(root / "sub" / "c_wide.png")  # 3000x200
    _noise(120, 50, 2).save(root / "sub" / "deeper" / "d_tall.jpg")
    # Unusual modes.
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)  # pure red in CMYK
    Image.fromarray(np.full((24, 24), 65535, np.uint16)).save(root / "gray16.png")  # I;16 at full scale
    Image.fromarray(np.full((24, 24), 64 * 257, np.uint16)).save(root / "gray16_dark.png")  # 16-bit 64/255
    Image.new("L", (20, 36), 100).save(root / "gray.png")
    _halves("RGBA", (32, 32), (0, 0, 0, 0), (0, 255, 0, 255)).save(root / "rgba.png")
    palette = _halves("P", (32, 32), 0, 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), 1 blue
    palette.save(root / "palette.png", transparency=0)
    # Bad files.
    buf = io.BytesIO()
    _noise(128, 128, 3).save(buf, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image at all\n")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(root / "tiny.png")
    (root / "folder.png").mkdir()  # a directory with an image suffix: neither an image nor a bad file
    # Captions: root metadata.jsonl (with malformed lines), a nested one, and .txt files.
    rows = [
        json.dumps({"file_name": "a_red.png", "text": "a red square"}),
        "{this is not json",
        "[1, 2]",  # valid JSON, not an object
        json.dumps({"file_name": "b_photo.jpg", "text": "photo from metadata"}),
        json.dumps({"file_name": "sub/c_wide.png", "text": "a wide strip"}),
        "",
    ]
    (root / "metadata.jsonl").write_text("\n".join(rows), encoding="utf-8")
    (root / "b_photo.txt").write_text("photo from txt (metadata wins)", encoding="utf-8")
    (root / "gray.txt").write_text("  grå café ☕\n", encoding="utf-8")
    (root / "sub" / "deeper" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "d_tall.jpg", "text": "tall, from nested metadata"}) + "\n", encoding="utf-8"
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    build_folder(root)
    return root


@pytest.fixture(scope="module")
def dataset(folder):
    return ImageFolder(folder, SIZE)


def _item(ds: ImageFolder, rel: str) -> dict:
    return ds[[p.relative_to(ds.root).as_posix() for p in ds.files].index(rel)]


def test_lists_exactly_the_usable_files_and_names_the_bad_ones(folder, capsys):
    ds = ImageFolder(folder, SIZE)
    assert {p.relative_to(folder).as_posix() for p in ds.files} == GOOD
    assert len(ds) == len(GOOD) == len(ds.captions)
    skipped = {name: why for name, why in ds.skipped}
    assert set(skipped) == {str(folder / name) for name in BAD}
    for name, word in BAD.items():
        assert word.lower() in skipped[str(folder / name)].lower(), skipped[str(folder / name)]
    err = capsys.readouterr().err
    assert f"skipped {len(BAD)}" in err
    assert all(name in err for name in BAD)
    assert "metadata.jsonl:2: ignored" in err and "metadata.jsonl:3: ignored" in err  # malformed lines


def test_quiet_when_not_verbose(folder, capsys):
    ImageFolder(folder, SIZE, verbose=False)
    assert capsys.readouterr().err == ""


def test_every_item_is_a_square_tensor_in_range(dataset):
    for i in range(len(dataset)):
        item = dataset[i]
        x = item["image"]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0
        assert isinstance(item["caption"], str) and item["scene"] is None


def _mean_rgb(x: torch.Tensor, cols=slice(None)) -> torch.Tensor:
    return x[:, :, cols].mean(dim=(1, 2))


def test_colour_conversion(dataset):
    eight_bit = 1 / 127.5
    red = _mean_rgb(_item(dataset, "a_red.png")["image"])
    torch.testing.assert_close(red, torch.tensor([1.0, -1.0, -1.0]), atol=eight_bit, rtol=0)
    cmyk = _mean_rgb(_item(dataset, "cmyk.jpg")["image"])
    assert cmyk[0] > 0.8 and cmyk[1] < -0.6 and cmyk[2] < -0.6, cmyk  # CMYK pure red stays red
    # 16-bit: 65535 -> 255 -> 1.0, and a fixed scale (a dark image is not stretched to white).
    assert torch.equal(_item(dataset, "gray16.png")["image"], torch.ones(3, SIZE, SIZE))
    dark = _item(dataset, "gray16_dark.png")["image"]
    torch.testing.assert_close(dark, torch.full_like(dark, 64 / 127.5 - 1), atol=eight_bit, rtol=0)
    gray = _item(dataset, "gray.png")["image"]
    torch.testing.assert_close(gray, torch.full_like(gray, 100 / 127.5 - 1), atol=eight_bit, rtol=0)
    # Transparent pixels composite onto white; opaque ones keep their colour (away from the seam).
    rgba = _item(dataset, "rgba.png")["image"]
    torch.testing.assert_close(_mean_rgb(rgba, slice(0, 5)), torch.ones(3), atol=eight_bit, rtol=0)
    torch.testing.assert_close(_mean_rgb(rgba, slice(11, 16)), torch.tensor([-1.0, 1, -1]), atol=0.02, rtol=0)
    pal = _item(dataset, "palette.png")["image"]
    torch.testing.assert_close(_mean_rgb(pal, slice(0, 5)), torch.ones(3), atol=eight_bit, rtol=0)
    torch.testing.assert_close(_mean_rgb(pal, slice(11, 16)), torch.tensor([-1.0, -1, 1]), atol=0.02, rtol=0)


def test_captions_come_from_the_right_source(dataset):
    captions = {p.relative_to(dataset.root).as_posix(): c for p, c in zip(dataset.files, dataset.captions)}
    assert captions == {
        "a_red.png": "a red square",  # root metadata.jsonl
        "b_photo.jpg": "photo from metadata",  # metadata wins over b_photo.txt
        "sub/c_wide.png": "a wide strip",  # root metadata, nested path
        "sub/deeper/d_tall.jpg": "tall, from nested metadata",  # metadata.jsonl in the subfolder
        "gray.png": "grå café ☕",  # UTF-8 .txt, stripped
        "cmyk.jpg": "",
        "gray16.png": "",
        "gray16_dark.png": "",
        "palette.png": "",
        "rgba.png": "",
    }
    assert _item(dataset, "a_red.png")["caption"] == "a red square"


def test_empty_bad_and_missing_folders(tmp_path):
    with pytest.raises(ValueError, match="no usable images .* no image files"):
        ImageFolder(tmp_path, SIZE)
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match="found 2 image file.*none usable"):
        ImageFolder(tmp_path, SIZE, verbose=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", SIZE)
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "empty.png", SIZE)  # a file, not a folder
    with pytest.raises(ValueError, match="image size"):
        Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
        ImageFolder(tmp_path, 0)


def test_file_broken_after_the_scan_serves_the_next_good_item(folder, tmp_path, capsys):
    for name in ("a_red.png", "b_photo.jpg", "gray.png", "gray.txt"):
        shutil.copy(folder / name, tmp_path / name)
    ds = ImageFolder(tmp_path, SIZE)
    before = [ds[i]["image"] for i in range(3)]
    capsys.readouterr()
    (tmp_path / "a_red.png").unlink()  # deleted after the scan
    (tmp_path / "b_photo.jpg").write_bytes((tmp_path / "b_photo.jpg").read_bytes()[:200])  # damaged
    epoch = [ds[i] for i in range(len(ds))]  # no exception
    for item in epoch:  # indices 0 and 1 both fall through to index 2, deterministically
        assert torch.equal(item["image"], before[2]) and item["caption"] == "grå café ☕"
    assert len(ds) == 3 and [ds[i]["caption"] for i in range(3)] == ["grå café ☕"] * 3
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2 and "a_red.png" in lines[0] and "b_photo.jpg" in lines[1]  # reported once each
    assert {name for name, _ in ds.skipped} == {str(tmp_path / "a_red.png"), str(tmp_path / "b_photo.jpg")}
    assert all("failed after the scan" in why for _, why in ds.skipped)
    assert len(list(ds)) == 3  # the sequence protocol still ends with IndexError
    with pytest.raises(IndexError):
        ds[3]
    (tmp_path / "gray.png").unlink()
    with pytest.raises(RuntimeError, match="none of the 3 images"):
        ds[0]


def test_wraps_to_the_start_when_the_last_file_breaks(folder, tmp_path):
    for name in ("a_red.png", "gray.png"):
        shutil.copy(folder / name, tmp_path / name)
    ds = ImageFolder(tmp_path, SIZE)
    first = ds[0]["image"]
    (tmp_path / "gray.png").write_bytes(b"garbage")
    assert torch.equal(ds[1]["image"], first) and torch.equal(ds[-1]["image"], first)


@pytest.mark.parametrize("mode, colour", [("RGB", (10, 20, 30)), ("L", 7)])
def test_colour_key_transparency_composites_onto_white(mode, colour):
    buf = io.BytesIO()
    Image.new(mode, (8, 8), colour).save(buf, "PNG", transparency=colour)  # tRNS chunk, no alpha channel
    assert to_rgb(Image.open(buf)).getpixel((3, 3)) == (255, 255, 255)
