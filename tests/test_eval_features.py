"""Feature extractors: the FID Inception's layout and weight loading, DINOv2 and the shapes net, the cache."""

import json

import numpy as np
import pytest
import torch

from latentdiff.eval import features as feats
from latentdiff.eval.inception import WEIGHTS_ENV, WEIGHTS_FILE, FIDInceptionV3, load_fid_inception

# The FID graph in torchvision's Inception3 naming (pytorch-fid's fid_inception_v3: num_classes=1008, no aux
# head), written out here independently of the module: block -> its BasicConv2d names.
_A = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool"]
_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
      "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"]
_D = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
_LAYOUT = {"Conv2d_1a_3x3": None, "Conv2d_2a_3x3": None, "Conv2d_2b_3x3": None, "Conv2d_3b_1x1": None,
           "Conv2d_4a_3x3": None, "Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B, "Mixed_6b": _C,
           "Mixed_6c": _C, "Mixed_6d": _C, "Mixed_6e": _C, "Mixed_7a": _D, "Mixed_7b": _E, "Mixed_7c": _E}


def _standard_keys():
    convs = [name if branches is None else f"{name}.{b}" for name, branches in _LAYOUT.items()
             for b in (branches or [None])]
    suffixes = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    return {f"{c}.{s}" for c in convs for s in suffixes} | {"fc.weight", "fc.bias"}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialized FID Inception saved the way the standard .pth is: a plain state dict."""
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    for m in model.modules():  # non-trivial batch-norm statistics, so a wrong mapping would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(state, path)
    return path, model


def test_inception_keys_and_size_match_the_standard_fid_weights():
    model = FIDInceptionV3()
    keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert keys == _standard_keys()
    # torchvision's inception_v3 has 27,161,264 parameters with the aux head (3,326,696) and 1000 classes;
    # the FID graph drops the aux head and has 1008 classes (+8 x 2049).
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


def test_inception_loads_the_file_strictly_and_gives_2048_features(inception_file):
    path, reference = inception_file
    extractor = feats.InceptionFeatures(path)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = extractor(images)
    assert out.shape == (2, 2048) and extractor.name.startswith("inception-fid-")
    with torch.no_grad():
        assert torch.allclose(out, reference(images), atol=1e-5)
    assert (out >= 0).all()  # average of ReLU outputs


def test_inception_missing_or_partial_weights_are_clear(tmp_path, monkeypatch, inception_file):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError) as err:
        load_fid_inception()
    message = str(err.value)
    assert "nowhere.pth" in message and WEIGHTS_FILE in message and WEIGHTS_ENV in message
    assert str(tmp_path / ".cache" / "latentdiff" / WEIGHTS_FILE) in message
    state = torch.load(inception_file[0], weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(ValueError, match="missing 1.*Mixed_7c.branch_pool.conv.weight"):
        load_fid_inception(partial)
    monkeypatch.setenv(WEIGHTS_ENV, str(inception_file[0]))  # the env var is honoured
    assert isinstance(load_fid_inception(), FIDInceptionV3)


def test_dinov2_features_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=28)
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).eval()
    model.save_pretrained(tmp_path / "dino")
    extractor = feats.DinoV2Features(tmp_path / "dino", image_size=28)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = extractor(images)
    assert out.shape == (3, 32) and extractor.dim == 32
    # Independent path: resize + ImageNet normalization by hand, CLS token of the final layer norm.
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(28, 28), mode="bicubic", antialias=True)
    x = (x - torch.tensor(feats.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(feats.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no DINOv2 model at"):
        feats.DinoV2Features(tmp_path / "missing")


def test_shapes_net_train_load_and_cached_reference(tmp_path):
    from latentdiff.eval.shapes_net import (
        ShapesNet,
        ShapesNetConfig,
        label_accuracy,
        load_shapes_net,
        train_shapes_net,
    )

    cfg = ShapesNetConfig(steps=30, num_images=96, batch_size=16, feature_dim=16, width=8)
    folder = train_shapes_net(tmp_path / "net", cfg, quiet=True)
    net, digest = load_shapes_net(folder)
    # The loaded net is the one trained: its accuracy on the validation renders is the one it recorded,
    # and 30 steps already put it well above the same net untrained.
    recorded = json.loads((folder / "config.json").read_text())["validation_accuracy"]["per_group_mean"]
    assert label_accuracy(net, n=600, seed=cfg.seed + 1000) == pytest.approx(recorded, abs=1e-4)
    torch.manual_seed(cfg.seed)
    assert label_accuracy(net, n=60) > label_accuracy(ShapesNet(cfg).eval(), n=60) + 0.1  # 0.52 vs 0.32
    extractor = feats.make_extractor("shapes", str(folder))
    assert extractor.dim == 16 and extractor.name == f"shapes-net-{digest}"
    x32, x64 = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 64, 64) * 2 - 1
    assert extractor(x32).shape == (4, 16) and extractor(x64).shape == (4, 16)  # any size, resized
    from latentdiff.eval.run import shapes_images

    with torch.no_grad():
        rms = float(extractor(shapes_images(60, 32, seed=5)).pow(2).mean().sqrt())
    assert rms == pytest.approx(1.0, abs=0.25)  # scaled to unit RMS on rendered images

    calls = []

    def make_images():
        calls.append(1)
        return x32

    a = feats.cached_features(extractor, "test-n4", make_images, tmp_path / "cache", batch_size=3)
    b = feats.cached_features(extractor, "test-n4", make_images, tmp_path / "cache")
    assert len(calls) == 1 and np.array_equal(a, b) and a.shape == (4, 16)
    assert (tmp_path / "cache" / f"{extractor.name}--test-n4.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="latentdiff train-features --out"):
        load_shapes_net(tmp_path / "none")


def test_image_checks():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        feats.check_images(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="differ in size"):
        feats.check_same_size(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 64, 64))
