"""`latentdiff eval --reference DIR` / `--samples DIR`: folder references (cached), folder samples, clear errors."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import main
from latentdiff.data.folder import image_to_tensor, resize_center_crop
from latentdiff.eval import metrics
from latentdiff.eval.run import EvalConfig, evaluate_samples, run_eval
from latentdiff.eval.shapes_net import ShapesNet, ShapesNetConfig
from latentdiff.io import save_component


class CountingProjection:
    """A fixed random projection of 8x8 thumbnails that counts the images it sees: a tiny extractor."""

    name, dim = "test-projection", 6

    def __init__(self):
        self.matrix = torch.randn(3 * 64, self.dim, generator=torch.Generator().manual_seed(0)) / 192**0.5
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        return torch.nn.functional.interpolate(images, size=(8, 8), mode="area").flatten(1) @ self.matrix


def _write_images(folder, n, sizes, seed, caption=None):
    """n random-blob RGB PNGs, cycling through ``sizes`` (w, h); optional .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # smooth-ish content: 4x4 upscaled
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"img_{i:03d}.png")
        if caption:
            (folder / f"img_{i:03d}.txt").write_text(f"{caption} {i}")
    return folder


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "report"), cache_dir=str(tmp_path / "cache"), kid_subset=10, kid_subsets=5,  # noqa: C408
                batch_size=8, grid_images=4, reference=str(tmp_path / "ref"), samples=str(tmp_path / "gen"))
    return EvalConfig(**{**base, **kw})


def test_samples_against_a_folder_reference_match_the_metrics_on_resized_references(tmp_path):
    _write_images(tmp_path / "ref", 24, [(40, 30), (24, 48), (32, 32)], seed=1)
    _write_images(tmp_path / "gen", 20, [(32, 32)], seed=2)
    ex = CountingProjection()
    report = evaluate_samples(_cfg(tmp_path), extractor=ex, log=lambda m: None)
    # The oracle: the stated policy (reference resized to cover 32x32 and centre-cropped; samples as they are).
    ref = torch.stack([image_to_tensor(resize_center_crop(Image.open(p).convert("RGB"), 32))
                       for p in sorted((tmp_path / "ref").glob("*.png"))])
    gen = torch.stack([image_to_tensor(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "gen").glob("*.png"))])
    real, fake = ex(ref).double().numpy(), ex(gen).double().numpy()
    assert report["fid"] == pytest.approx(metrics.fid(real, fake), rel=1e-9)
    pr = metrics.precision_recall(real, fake, k=3)
    assert (report["precision"], report["recall"]) == (pr["precision"], pr["recall"])
    assert report["kid"]["mean"] == pytest.approx(metrics.kid(real, fake, 10, 5, seed=0)["mean"], rel=1e-9)
    assert report["image_size"] == 32 and report["n_samples"] == 20 and report["reference"]["n"] == 24
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["fid"] == pytest.approx(report["fid"])
    assert "<img src=\"data:image/png;base64," in (tmp_path / "report" / "report.html").read_text()


def test_reference_statistics_are_cached_reused_and_invalidated(tmp_path):
    _write_images(tmp_path / "ref", 16, [(32, 32), (48, 32)], seed=1)
    _write_images(tmp_path / "gen", 12, [(32, 32)], seed=2)
    ex = CountingProjection()
    first = evaluate_samples(_cfg(tmp_path), extractor=ex, log=lambda m: None)
    assert ex.seen == 16 + 12 and first["reference"]["cache_hit"] is False
    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1 and cached[0].name.startswith("test-projection--folder-")
    ex.seen = 0
    second = evaluate_samples(_cfg(tmp_path), extractor=ex, log=lambda m: None)
    assert ex.seen == 12 and second["reference"]["cache_hit"] is True and second["fid"] == first["fid"]
    # Another evaluation size is another entry; the first stays.
    _write_images(tmp_path / "gen16", 12, [(16, 16)], seed=3)
    evaluate_samples(_cfg(tmp_path, samples=str(tmp_path / "gen16")), extractor=ex, log=lambda m: None)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    # A changed file invalidates the entry: recomputed, and the stale one of this folder and size removed.
    target = tmp_path / "ref" / "img_000.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(target)
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse file systems
    ex.seen = 0
    third = evaluate_samples(_cfg(tmp_path), extractor=ex, log=lambda m: None)
    assert ex.seen == 16 + 12 and third["reference"]["cache_hit"] is False and third["fid"] != first["fid"]
    assert len(list((tmp_path / "cache").glob("*-s32.safetensors"))) == 1


def test_too_few_images_say_how_many_each_metric_needs(tmp_path):
    _write_images(tmp_path / "ref", 20, [(32, 32)], seed=1)
    _write_images(tmp_path / "gen", 5, [(32, 32)], seed=2)
    with pytest.raises(ValueError, match=r"FID with 6-d test-projection features needs at least 7 generated images, "
                                         r"got 5.*only \['kid', 'pr'\] can be computed"):
        evaluate_samples(_cfg(tmp_path), extractor=CountingProjection(), log=lambda m: None)
    report = evaluate_samples(_cfg(tmp_path, metrics=("kid", "pr")), extractor=CountingProjection(), log=lambda m: None)
    assert "fid" not in report and report["kid"]["subset_size"] == 5
    with pytest.raises(ValueError, match="metrics must be a non-empty subset"):
        evaluate_samples(_cfg(tmp_path, metrics=("is",)), extractor=CountingProjection(), log=lambda m: None)


def test_generated_images_of_mixed_or_wrong_sizes_are_refused(tmp_path):
    _write_images(tmp_path / "ref", 20, [(32, 32)], seed=1)
    _write_images(tmp_path / "gen", 10, [(32, 32), (32, 32), (64, 32)], seed=2)
    with pytest.raises(ValueError, match=r"never resized.*7 at 32x32.*3 at 64x32 \(img_002.png"):
        evaluate_samples(_cfg(tmp_path), extractor=CountingProjection(), log=lambda m: None)
    _write_images(tmp_path / "gen2", 10, [(32, 32)], seed=2)
    with pytest.raises(ValueError, match="must all be 64x64"):
        evaluate_samples(_cfg(tmp_path, samples=str(tmp_path / "gen2"), image_size=64), extractor=CountingProjection(),
                         log=lambda m: None)


def test_model_sweep_against_a_folder_reference_uses_its_captions(tmp_path):
    _write_images(tmp_path / "ref", 20, [(32, 32), (40, 40)], seed=1, caption="a photo")
    prompts_seen = []

    class NoisePipe:
        default_size = 32

        def generate(self, prompts, *, steps, sampler, guidance, seed, output):
            prompts_seen.extend(prompts)
            return torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    cfg = _cfg(tmp_path, samples="", n_samples=10, samplers=("euler",), steps=(2,), guidance=(3.0,),
               base_sampler="euler", base_steps=2, base_guidance=3.0)
    report = run_eval(cfg, pipe=NoisePipe(), extractor=CountingProjection())
    (row,) = report["settings"]
    assert np.isfinite(row["fid"]) and "judge_train_captions" not in row and "judge_heldout" not in row
    assert "memorization" not in report and report["reference"]["n"] == 20
    assert prompts_seen == [f"a photo {i}" for i in range(10)]


def test_cli_evaluates_a_samples_folder_and_names_missing_weights(tmp_path, capsys):
    _write_images(tmp_path / "ref", 12, [(24, 24), (32, 16)], seed=1)
    _write_images(tmp_path / "gen", 12, [(16, 16)], seed=2)
    net_cfg = ShapesNetConfig(input_size=8, width=4, feature_dim=4)
    torch.manual_seed(0)
    save_component(tmp_path / "net", ShapesNet(net_cfg), {"type": "ShapesNet", "config": dataclasses.asdict(net_cfg)})
    common = ["eval", "--samples", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"), "--out",
              str(tmp_path / "out"), "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "kid_subset=6"]
    main([*common, "--extractor", "shapes", "--feature-path", str(tmp_path / "net")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_samples"] == 12 and printed["n_reference"] == 12 and np.isfinite(printed["fid"])
    assert (tmp_path / "out" / "report.html").is_file()
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(SystemExit) as e:
        main([*common, "--extractor", "inception", "--feature-path", str(missing)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"looked in: {missing}" in err and "--feature-path PATH" in err and "pt_inception-2015-12-05" in err


def test_samples_against_the_shapes_reference(tmp_path):
    from latentdiff.eval.run import shapes_images
    from latentdiff.images import to_pil

    (tmp_path / "gen").mkdir()
    for i, im in enumerate(to_pil(shapes_images(10, 32, seed=5))):
        im.save(tmp_path / "gen" / f"{i}.png")
    report = evaluate_samples(_cfg(tmp_path, reference="", n_reference=12), extractor=CountingProjection(),
                              log=lambda m: None)
    assert report["reference"]["n"] == 12 and "shapes" in report["reference"] and np.isfinite(report["fid"])
