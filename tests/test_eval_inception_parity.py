"""Our FID Inception against torch-fidelity's ``FeatureExtractorInceptionV3`` (what torchmetrics' FID runs).

The real FID weights are not available offline, so both networks get the same random weights: ours is
built, given realistic batch-norm statistics, saved, and loaded into torch-fidelity through its
``feature_extractor_weights_path``. Then the 2048-d pool features are compared on the same images, at
299x299 (no resize) and at 64x64 (each resize convention).

Where torch-fidelity comes from. Its dependencies include torchvision, which this project does not install,
and once torch-fidelity is installed as a package without torchvision, torchmetrics (which imports
``torch_fidelity`` whenever its metadata is present) fails to import ``torchmetrics.image.fid``. So CI installs
it out of the way: ``pip install --no-deps --target <venv>/torch-fidelity torch-fidelity==0.4.0`` (the README's
test command). A regular install is used when there is one. Either way ``torch_fidelity/__init__.py`` (which
imports torchvision) is not run: a bare package module pointing at the folder is placed in ``sys.modules`` just
while ``feature_extractor_inceptionv3`` and ``interpolate_compat_tensorflow`` are imported (they need only
torch and two small helper modules), then ``sys.modules`` is restored.
"""

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from latentdiff.eval.features import make_extractor
from latentdiff.eval.inception import (
    TORCH_FIDELITY_WEIGHTS_FILE,
    WEIGHTS_ENV,
    FIDInceptionV3,
    resize_bilinear_tf1,
)

TOLERANCE = 1e-4  # max |ours - theirs| / max |theirs| over all 2048 features of all images


def _torch_fidelity_folder() -> Path | None:
    """The folder of the ``torch_fidelity`` package: the private CI install, else a regular one, else None."""
    private = Path(sys.prefix) / "torch-fidelity" / "torch_fidelity"
    if (private / "feature_extractor_inceptionv3.py").is_file():
        return private
    spec = importlib.util.find_spec("torch_fidelity")  # finds the package without running its __init__
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _import_torch_fidelity(folder: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """torch-fidelity's Inception and TF-resize modules, without its package __init__ (torchvision)."""
    def ours():
        return {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}

    saved = ours()
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(folder)]
    sys.modules["torch_fidelity"] = package
    try:
        inception = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        resize = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
    finally:
        for name in ours():
            del sys.modules[name]
        sys.modules.update(saved)
    return inception, resize


@pytest.fixture(scope="module")
def tf_modules():
    folder = _torch_fidelity_folder()
    if folder is None:
        pytest.skip("torch-fidelity is not installed; the README's test command installs it: "
                    "pip install --no-deps --target \"$VIRTUAL_ENV/torch-fidelity\" torch-fidelity==0.4.0")
    return _import_torch_fidelity(folder)


def _uint8_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields plus noise, uint8 (B, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 5, generator=g)
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = smooth * 200 + torch.rand(n, 3, size, size, generator=g) * 55
    return x.clamp(0, 255).to(torch.uint8)


def _as_torch_fidelity_input(u: torch.Tensor) -> torch.Tensor:
    """uint8 -> our [-1, 1] input, the way torch-fidelity normalizes: (u - 128) / 128."""
    return (u.float() - 128) / 128


@pytest.fixture(scope="module")
def networks(tf_modules, tmp_path_factory):
    """Ours with random weights and calibrated batch-norm statistics, and torch-fidelity's loaded from its file."""
    torch.manual_seed(0)
    ours = FIDInceptionV3()
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one training-mode pass sets the statistics of that batch
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    ours.train()
    with torch.no_grad():  # non-trivial running statistics that keep the activations of every block alive
        ours(_as_torch_fidelity_input(_uint8_images(2, 299, seed=1)))
    ours.eval()
    path = tmp_path_factory.mktemp("tf") / TORCH_FIDELITY_WEIGHTS_FILE
    torch.save(ours.state_dict(), path)
    theirs = tf_modules[0].FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                       feature_extractor_weights_path=str(path))
    return ours, theirs


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_alive(features: torch.Tensor) -> None:
    """The features carry signal (so agreement is not agreement of zeros)."""
    assert (features > 0).float().mean() > 0.3
    assert float((features[0] - features[1]).abs().max()) > 1e-3 * float(features.abs().max())


def test_state_dict_layouts_are_the_same(networks):
    ours, theirs = networks
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}  # no key table needed


def test_pool_features_match_at_299(networks):
    ours, theirs = networks
    u = _uint8_images(2, 299, seed=2)
    with torch.no_grad():
        reference = theirs(u)[0]
        mine = ours(_as_torch_fidelity_input(u))
    _check_alive(reference)
    rel = _relative_difference(mine, reference)
    print(f"\n299x299: max relative difference {rel:.2e}")
    assert rel < TOLERANCE
    # pytorch-fid's normalization of the same uint8 images (u / 127.5 - 1) is a different input: not the same numbers.
    with torch.no_grad():
        rel_pytorch_fid_input = _relative_difference(ours(u.float() / 127.5 - 1), reference)
    print(f"299x299, input u / 127.5 - 1 instead of (u - 128) / 128: {rel_pytorch_fid_input:.2e}")
    assert rel_pytorch_fid_input > 10 * rel


def test_features_at_64_follow_the_chosen_resize(networks):
    ours, theirs = networks
    u = _uint8_images(2, 64, seed=3)
    x = _as_torch_fidelity_input(u)
    with torch.no_grad():
        reference = theirs(u)[0]
        ours.resize = "tf1"
        tf1 = ours(x)
        ours.resize = "bilinear"
        bilinear = ours(x)
    _check_alive(reference)
    rel_tf1, rel_bilinear = _relative_difference(tf1, reference), _relative_difference(bilinear, reference)
    print(f"64x64: resize tf1 {rel_tf1:.2e}, resize bilinear (pytorch-fid's) {rel_bilinear:.2e}")
    assert rel_tf1 < TOLERANCE
    assert rel_bilinear > 100 * TOLERANCE  # the default follows pytorch-fid, not torch-fidelity


@pytest.mark.parametrize("shape", [(32, 32), (64, 48), (299, 299), (512, 400)])
def test_tf1_resize_matches_torch_fidelity(tf_modules, shape):
    torch.manual_seed(1)
    x = torch.rand(2, 3, *shape) * 255
    expected = tf_modules[1].interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    got = resize_bilinear_tf1(x, (299, 299))
    assert got.shape == expected.shape == (2, 3, 299, 299)
    assert float((got - expected).abs().max()) < 1e-4
    if shape == (299, 299):
        assert torch.equal(got, x)
    else:  # the two conventions really differ (F.interpolate samples at half-pixel centres)
        pytorch_fid = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        assert float((pytorch_fid - expected).abs().max()) > 1.0


def test_torch_fidelity_weight_file_is_found_and_loads(networks, tmp_path, monkeypatch):
    """A user with torch-fidelity's (or torchmetrics') downloaded weights needs no second file."""
    _, theirs = networks
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(theirs.state_dict(), checkpoints / TORCH_FIDELITY_WEIGHTS_FILE)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    extractor = make_extractor("inception-tf1")  # found in torch hub's checkpoint folder, TF-like resize
    assert extractor.model.resize == "tf1" and extractor.name.endswith("-tf1")  # cached features never mix
    for key, value in theirs.state_dict().items():
        assert torch.equal(extractor.model.state_dict()[key], value), key


def test_unknown_resize_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown resize 'nearest'; choose one of bilinear, tf1"):
        FIDInceptionV3(resize="nearest")
