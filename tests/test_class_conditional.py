"""Class-conditional training from class folders: labels reach the network, the null class, generation by name."""

import json

import numpy as np
import pytest
import torch
from data_helpers import record_train_conds, tiny_autoencoder
from PIL import Image

from latentdiff.cli import main
from latentdiff.conditioning.labels import drop_labels, resolve_labels
from latentdiff.data.cache import LatentCache, build_cache
from latentdiff.data.folder import ImageFolder
from latentdiff.models.dit import PRESETS as DIT_PRESETS
from latentdiff.models.dit import DiT
from latentdiff.models.families import for_class_data, for_text_data
from latentdiff.pipeline import load
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser
from latentdiff.types import Cond

COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


@pytest.fixture(scope="module")
def class_cache(tmp_path_factory):
    """Three class folders of 4 flat-colour images (16 px, varied sizes), cached by a tiny autoencoder."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / "data" / name).mkdir(parents=True)
        for i in range(4):
            noise = rng.integers(-20, 20, (20 + 2 * i, 18, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "data" / name / f"{i}.png")
    ae = tiny_autoencoder(root / "ae")
    folder = ImageFolder(root / "data", 16, class_folders=True, verbose=False)
    build_cache(ae, folder, root / "cache", batch_size=8, quiet=True, image_size=16, class_names=folder.class_names,
                source={"autoencoder": str(root / "ae")})
    return root


def _cfg(root, out, **kw):
    base = {**TRAIN_PRESETS["shapes-test"], "model": "shapes-tiny", "sample_every": 0, "save_every": 100,
            "tensorboard": False, "lr": 3e-3}
    cfg = TrainConfig(out=str(root / out), cache=str(root / "cache"))
    from latentdiff.config import from_dict, to_dict

    return from_dict(TrainConfig, {**to_dict(cfg), **base, **kw}, "test")


def test_the_batch_labels_reach_the_network(class_cache, monkeypatch):
    seen = record_train_conds(monkeypatch)
    train_denoiser(_cfg(class_cache, "run0", steps=2, label_dropout=0.0))
    cache = LatentCache(class_cache / "cache")
    assert cache.class_names == ["blue", "green", "red"]
    for step, cond in enumerate(seen):
        idx = cache.batch_indices(step, 4, 0)
        assert torch.equal(cond.vector, cache.labels[idx])  # integer labels of this step's items, not pooled text
    # All dropped: every label is the null class (3).
    seen.clear()
    train_denoiser(_cfg(class_cache, "run1", steps=1, label_dropout=1.0))
    assert seen and all(torch.equal(c.vector, torch.full((4,), 3)) for c in seen)


def test_class_conditional_training_then_generation_by_name(class_cache, capsys):
    folder = train_denoiser(_cfg(class_cache, "run", steps=4))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["class_names"] == ["blue", "green", "red"]
    pipe = load(folder)
    assert pipe.class_names == ["blue", "green", "red"]
    net = pipe.denoiser.network
    assert net.config.num_classes == 4 and net.config.vector_dim is None  # 3 classes + the null class
    # A changed label changes the network's output (the same input, noise level and context).
    x, c = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((2,), 500.0)
    ctx = pipe.text_encoder(["", ""])
    with torch.no_grad():
        outs = [net(x, c, Cond(context=ctx.context, context_mask=ctx.context_mask, vector=torch.tensor([y, y])))
                for y in (0, 2, 3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    kw = dict(steps=2, sampler="euler", guidance=2.0, output="pt")  # noqa: C408
    red, blue = pipe.generate("", label="red", **kw), pipe.generate("", label=0, **kw)
    assert red.shape == (1, 3, 16, 16) and not torch.allclose(red, blue)
    assert torch.equal(pipe.generate("", label="2", **kw), red)  # an index as text is the same class
    both = pipe.generate("", label=["red", "blue"], **kw)
    assert both.shape[0] == 2 and torch.allclose(both[0], red[0], atol=1e-5)
    with pytest.raises(ValueError, match="class-conditional: pass label= .*blue, green, red"):
        pipe.generate("a prompt", **kw)
    with pytest.raises(ValueError, match="unknown class label 'purple'.*3 classes"):
        pipe.generate("", label="purple", **kw)
    # The CLI: a class name and no prompt.
    main(["generate", "--model", str(folder), "--label", "green", "--steps", "2", "-o",
          str(class_cache / "green.png")])
    assert (class_cache / "green.png").is_file() and "green.png" in capsys.readouterr().out
    # Two labels and no prompt: one image each, each PNG naming its own label.
    from latentdiff.images import read_parameters

    main(["generate", "--model", str(folder), "--label", "red", "--label", "blue", "--steps", "2", "-o",
          str(class_cache / "two.png")])
    assert [read_parameters(class_cache / f"two_{i:03d}.png")["label"] for i in range(2)] == ["red", "blue"]


def test_labels_can_be_ignored_and_text_models_refuse_labels(class_cache):
    folder = train_denoiser(_cfg(class_cache, "text", steps=1, class_labels=False))
    pipe = load(folder)
    assert pipe.class_names is None and pipe.denoiser.network.config.num_classes is None
    with pytest.raises(ValueError, match="not class-conditional"):
        pipe.generate("x", label="red", steps=1, output="pt")


def test_dit_class_config_keeps_a_null_row_and_mmdit_refuses():
    cfg = for_class_data("dit", for_text_data("dit", DIT_PRESETS["dit-tiny"], 4, 32, 8), 5)
    net = DiT(cfg)
    assert net.class_embedder.embedding_table.num_embeddings == 6 and cfg.vector_dim is None
    x = torch.randn(2, 4, 8, 8)
    out = net(x, torch.ones(2), Cond(context=torch.randn(2, 3, 32), vector=torch.tensor([0, 5])))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="no class embedding"):
        for_class_data("mmdit", None, 5)


def test_label_helpers():
    assert resolve_labels("b", ["a", "b"], 3).tolist() == [1, 1, 1]
    assert resolve_labels(["b", 0], ["a", "b"], 2).tolist() == [1, 0]
    assert resolve_labels("1", ["0", "1"], 1).tolist() == [1]
    with pytest.raises(ValueError, match="3 class labels for 2 prompts"):
        resolve_labels([0, 1, 0], ["a", "b"], 2)
    with pytest.raises(ValueError, match="index 0..1"):
        resolve_labels(2, ["a", "b"], 1)
    assert drop_labels(torch.tensor([0, 1, 2]), torch.tensor([True, False, True]), 7).tolist() == [7, 1, 7]


def test_dit_trains_on_class_labels_and_generates_by_name(class_cache):
    folder = train_denoiser(_cfg(class_cache, "dit", model="dit-tiny", steps=2))
    pipe = load(folder)
    assert pipe.denoiser.network.config.num_classes == 3 and pipe.denoiser.network.config.class_dropout
    assert pipe.generate("", label="green", steps=2, sampler="euler", output="pt").shape == (1, 3, 16, 16)


def test_eval_against_class_folders_draws_each_reference_class(class_cache, tmp_path):
    from test_eval_folders import CountingProjection

    from latentdiff.eval.run import EvalConfig, run_eval

    pipe = load(train_denoiser(_cfg(class_cache, "for_eval", steps=1)))
    asked = []
    real_generate = pipe.generate

    def spy(prompts, **kw):
        asked.extend(kw["label"])
        return real_generate(prompts, **kw)

    pipe.generate = spy
    cfg = EvalConfig(out=str(tmp_path / "report"), cache_dir=str(tmp_path / "cache"), reference=str(class_cache / "data"),
                     n_samples=9, samplers=("euler",), steps=(2,), guidance=(2.0,), base_sampler="euler", base_steps=2,
                     base_guidance=2.0, kid_subset=5, kid_subsets=2, batch_size=4, grid_images=2)
    report = run_eval(cfg, pipe=pipe, extractor=CountingProjection())
    assert asked == ["blue"] * 4 + ["green"] * 4 + ["red"]  # the reference images' classes, in file order
    assert np.isfinite(report["settings"][0]["fid"])
    flat = tmp_path / "flat"  # the same images without class folders: the model cannot be asked for a class
    flat.mkdir()
    for i, path in enumerate(sorted((class_cache / "data").rglob("*.png"))):
        (flat / f"{i}.png").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="evaluate it against a folder of class folders"):
        run_eval(EvalConfig(**{**cfg.__dict__, "reference": str(flat)}), pipe=pipe, extractor=CountingProjection())
    with pytest.raises(ValueError, match="eval_every scores shapes prompts"):
        train_denoiser(_cfg(class_cache, "bad", steps=1, eval_every=1))


def test_convert_keeps_the_class_names(class_cache, tmp_path):
    """read_our_folder -> save_latentdiff is lossless: the converted folder is still class-conditional."""
    from latentdiff.interop.convert import convert

    folder = train_denoiser(_cfg(class_cache, "to_convert", steps=1))
    convert(folder, tmp_path / "converted")
    index = json.loads((tmp_path / "converted" / "model_index.json").read_text())
    assert index["class_names"] == ["blue", "green", "red"]
    kw = dict(steps=2, sampler="euler", guidance=2.0, label="green", output="pt")  # noqa: C408
    assert torch.equal(load(tmp_path / "converted").generate("", **kw), load(folder).generate("", **kw))
