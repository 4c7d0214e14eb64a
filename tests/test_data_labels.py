"""Class folders -> integer labels and class names; captions missing for some files; empty folders."""

from __future__ import annotations

import pytest
from PIL import Image

from latentdiff.data.folder import ImageFolder, caption_from_filename


def _img(path, size=(20, 16), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def classes(tmp_path):
    """cat/ (2 images, one captioned), dog/ (1 image), empty/ (nothing usable), a stray root image."""
    _img(tmp_path / "dog" / "rex_01.png")
    _img(tmp_path / "cat" / "tom-the_cat.png")
    _img(tmp_path / "cat" / "b.jpg")
    (tmp_path / "cat" / "b.txt").write_text("a sleepy cat\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "broken.png").write_bytes(b"not an image")
    _img(tmp_path / "stray.png")
    return tmp_path


def test_class_folders_give_sorted_names_and_labels(classes, capsys):
    ds = ImageFolder(classes, 8, class_folders=True)
    assert ds.class_names == ["cat", "dog"]  # "empty" holds no usable image
    by_key = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    assert sorted(by_key) == ["cat/b.jpg", "cat/tom-the_cat.png", "dog/rex_01.png"]
    assert [by_key[k]["label"] for k in sorted(by_key)] == [0, 0, 1]
    err = capsys.readouterr().err
    assert "stray.png: not inside a class folder" in err
    assert "hold no usable image and get no label: empty" in err
    assert "2 of 3 image(s)" in err and "no caption" in err


@pytest.mark.parametrize("policy, expected", [
    ("empty", {"cat/b.jpg": "a sleepy cat", "cat/tom-the_cat.png": "", "dog/rex_01.png": ""}),
    ("filename", {"cat/b.jpg": "a sleepy cat", "cat/tom-the_cat.png": "tom the cat", "dog/rex_01.png": "rex 01"}),
    ("class", {"cat/b.jpg": "a sleepy cat", "cat/tom-the_cat.png": "cat", "dog/rex_01.png": "dog"}),
])
def test_missing_caption_policy(classes, policy, expected):
    ds = ImageFolder(classes, 8, class_folders=True, missing_caption=policy, verbose=False)
    assert {ds[i]["key"]: ds[i]["caption"] for i in range(len(ds))} == expected
    assert ds.missing_captions == 2


def test_without_class_folders_there_are_no_labels(classes):
    ds = ImageFolder(classes, 8, verbose=False)
    assert ds.labels is None and ds.class_names is None and len(ds) == 4
    assert all(ds[i]["label"] is None for i in range(len(ds)))


def test_bad_choices_and_empty_folders_are_clear_errors(tmp_path):
    _img(tmp_path / "a.png")
    with pytest.raises(ValueError, match="missing_caption must be one of"):
        ImageFolder(tmp_path, 8, missing_caption="guess")
    with pytest.raises(ValueError, match="needs class_folders"):
        ImageFolder(tmp_path, 8, missing_caption="class")
    with pytest.raises(ValueError, match="no usable images .*1 image file.*none usable"):
        ImageFolder(tmp_path, 8, class_folders=True, verbose=False)  # only a stray image, no class folder
    (tmp_path / "a.png").unlink()
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no usable images .* no image files"):
        ImageFolder(tmp_path, 8, class_folders=True)


def test_caption_from_filename():
    assert caption_from_filename("dir/red_circle--02.png") == "red circle 02"
    assert caption_from_filename("plain.jpg") == "plain"
