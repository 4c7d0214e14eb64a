"""`latentdiff check-data` on a folder of bad files made in the test."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from latentdiff.cli import main
from latentdiff.data.health import check_data, dhash, near_pairs


def _smooth(seed: int, size=(96, 64)) -> Image.Image:
    """A smooth random picture (an upsampled 6x6 pattern): its hash survives resizing and JPEG."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC)


@pytest.fixture
def messy(tmp_path):
    for i in range(4):
        _smooth(i).save(tmp_path / f"good_{i}.png")
    (tmp_path / "good_0.txt").write_text("a caption")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "good_1.png", "text": "another"}) + "\n")
    shutil.copy(tmp_path / "good_2.png", tmp_path / "copy_of_2.png")  # exact duplicate
    (tmp_path / "sub").mkdir()
    _smooth(3).resize((72, 48), Image.LANCZOS).save(tmp_path / "sub" / "near_3.jpg", quality=85)  # near duplicate
    _smooth(9, (20, 12)).save(tmp_path / "tiny.png")
    data = (tmp_path / "good_0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    _smooth(5, (300, 60)).save(tmp_path / "panorama.png")
    return tmp_path


def test_report_names_every_kind_of_problem(messy):
    r = check_data(messy, min_size=32)
    assert r.files == 10
    assert sorted(n for n, _ in r.corrupt) == ["empty.jpg", "truncated.png"]
    assert r.tiny == [("tiny.png", 20, 12)]
    assert r.exact_duplicates == [["copy_of_2.png", "good_2.png"]]
    assert [(a, b) for a, b, _ in r.near_duplicates] == [("good_3.png", "sub/near_3.jpg")]
    assert sorted(r.missing_captions) == ["copy_of_2.png", "good_2.png", "good_3.png", "panorama.png",
                                          "sub/near_3.jpg", "tiny.png"]
    assert sum(r.sizes.values()) == sum(r.aspects.values()) == 8  # every readable image in each histogram
    assert r.aspects["wider than 2:1"] == 1 and r.aspects["4:3 to 2:1"] == 7  # 96x64 and 20x12
    assert r.sizes == {"0-63": 3, "64-127": 5}
    assert r.problems == 2 + 1 + 1 + 1
    text = r.to_text()
    for word in ("truncated.png", "tiny.png: 20x12", "copy_of_2.png = good_2.png", "good_3.png ~ sub/near_3.jpg",
                 "5 problem file(s)"):
        assert word in text


def test_dhash_and_near_pairs():
    a, b = dhash(_smooth(1)), dhash(_smooth(1).resize((50, 40)))
    assert (a ^ b).bit_count() <= 4 and (a ^ dhash(_smooth(2))).bit_count() > 10
    rng = np.random.default_rng(0)
    hashes = {f"h{i}": int(rng.integers(0, 2**63)) for i in range(60)}
    hashes["twin"] = hashes["h7"] ^ 0b1011  # 3 bits apart
    brute = sorted((x, y, (hashes[x] ^ hashes[y]).bit_count()) for x in hashes for y in hashes
                   if x < y and (hashes[x] ^ hashes[y]).bit_count() <= 3)
    assert near_pairs(hashes, 3) == brute and ("h7", "twin", 3) in brute


def test_cli_exit_status_json_and_errors(messy, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("report") / "report.json"
    with pytest.raises(SystemExit) as e:
        main(["check-data", str(messy), "--min-size", "32", "--json", str(out), "--bucket-area", "4096",
              "--bucket-step", "16"])
    assert e.value.code == 1
    report = json.loads(out.read_text())
    assert report["problems"] == 5 and len(report["corrupt"]) == 2 and sum(report["buckets"].values()) == 8
    assert "corrupt: 2" in capsys.readouterr().out
    clean = tmp_path_factory.mktemp("clean")
    _smooth(0).save(clean / "a.png")
    main(["check-data", str(clean)])  # no problems: returns (exit status 0)
    assert "no problems found" in capsys.readouterr().out
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(SystemExit) as e:
        main(["check-data", str(empty)])
    assert e.value.code == 2 and "no image files" in capsys.readouterr().err
