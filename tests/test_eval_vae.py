"""``latentdiff eval-vae``: held-out PSNR / SSIM / rFID of a tiny autoencoder on shapes, skimage and a folder."""

import json

import numpy as np
import pytest
import torch
from _tiny import one_thread  # noqa: F401 (autouse)
from PIL import Image

from latentdiff import cli
from latentdiff.components import save_autoencoder
from latentdiff.data.shapes import ShapesDataset
from latentdiff.eval.features import make_extractor
from latentdiff.eval.metrics import fid
from latentdiff.eval.reconstruction import psnr, reconstruct, ssim
from latentdiff.eval.vae import HELDOUT_SEED
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A random factor-2 autoencoder and a random 16-d shapes feature net, saved as training would save them
    (training it takes long here; any fixed feature map serves to check the pairing)."""
    import dataclasses

    from latentdiff.eval.shapes_net import ShapesNet, ShapesNetConfig
    from latentdiff.io import save_component

    root = tmp_path_factory.mktemp("evalvae")
    torch.manual_seed(0)
    save_autoencoder(root / "ae", AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=(1, 2),
                                                                  num_res_blocks=1, norm_groups=8)))
    config = ShapesNetConfig(feature_dim=16, width=8)
    save_component(root / "net", ShapesNet(config), {"type": "ShapesNet", "config": dataclasses.asdict(config)})
    return root / "ae", root / "net"


def run(args, capsys) -> dict:
    cli.main(["eval-vae", *args])
    return json.loads(capsys.readouterr().out)


def test_shapes_report_matches_the_measures_computed_by_hand(parts, tmp_path, capsys):
    ae_dir, net = parts
    out = tmp_path / "shapes"
    printed = run(["--model", str(ae_dir), "--data", "shapes", "--out", str(out), "--feature-path", str(net),
                   "--set", "num_images=24", "--set", "image_size=32", "--set", "batch_size=10"], capsys)
    report = json.loads((out / "report.json").read_text())
    assert printed["psnr"] == report["psnr"] and report["images"] == 24

    # The same numbers from eval.reconstruction / eval.metrics on the held-out renders (a seed training never uses).
    from latentdiff.components import load_autoencoder

    ae = load_autoencoder(ae_dir)
    images = torch.stack([ShapesDataset(24, size=32, seed=HELDOUT_SEED)[i]["image"] for i in range(24)])
    recon = reconstruct(ae, images)
    assert report["psnr"] == pytest.approx(float(psnr(recon, images).mean()), rel=1e-6)
    assert report["ssim"] == pytest.approx(float(ssim(recon, images).mean()), rel=1e-6)
    extractor = make_extractor("shapes", str(net))
    with torch.no_grad():
        expected = fid(extractor(images), extractor(recon))
    assert report["rfid"] == pytest.approx(expected, rel=1e-6) and report["rfid"] > 0
    assert report["rfid_images"] == 24 and report["rfid_feature_dim"] == 16 and not report["rfid_biased"]
    grid = Image.open(out / "grid.png")
    assert grid.size == (8 * 34 + 2, 2 * 34 + 2)  # 8 originals over their reconstructions, 2 px padding


def test_skimage_and_folder_sources(parts, tmp_path, capsys, monkeypatch):
    pytest.importorskip("skimage")
    ae_dir, net = parts
    report = run(["--model", str(ae_dir), "--data", "skimage", "--out", str(tmp_path / "sk"), "--extractor", "none",
                  "--set", "max_side=64", "--set", "num_images=4", "--set", "image_size=32"], capsys)
    assert report["images"] == 3 and "rfid" not in report  # the three held-out photographs, whole
    assert (tmp_path / "sk" / "grid.png").is_file()

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # mixed sizes and modes: the folder loader resizes and converts
        size = (40 + 8 * i, 36 + 4 * i)
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(
            "L" if i % 2 else "RGB").save(folder / f"{i}.png")
    report = run(["--model", str(ae_dir), "--data", str(folder), "--out", str(tmp_path / "f"), "--extractor",
                  "shapes", "--feature-path", str(net), "--set", "image_size=32"], capsys)
    assert report["images"] == 6 and np.isfinite(report["rfid"])
    assert json.loads((tmp_path / "f" / "report.json").read_text())["rfid_biased"]  # 6 images, 16 dimensions

    # Inception without its weight file: the evaluation module's message, exit status 2, nothing written.
    monkeypatch.delenv("LATENTDIFF_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit) as e:
        cli.main(["eval-vae", "--model", str(ae_dir), "--data", str(folder), "--out", str(tmp_path / "inc")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "FID Inception weights were not found" in err and "--extractor none" in err
    assert not (tmp_path / "inc").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["eval-vae", "--model", str(tmp_path), "--data", "shapes", "--extractor", "none"])
    assert e.value.code == 2 and "no autoencoder at" in capsys.readouterr().err
