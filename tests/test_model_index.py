"""The model index: one versioned reader and writer, old folders, recommended generation settings (Python and
CLI), the grid each parameterization samples on, and guidance interval / dynamic thresholding from the outside."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import one_thread  # noqa: F401 (autouse)
from PIL import Image

from latentdiff import cli
from latentdiff.components import DenoiserSpec, ModelFolder, build_denoiser, write_model_folder
from latentdiff.conditioning.text import TextEncoderConfig, build_text_encoder
from latentdiff.images import read_parameters
from latentdiff.model_index import VERSION, GenerationSettings, ModelIndex, SamplerHint, SizeConditioning
from latentdiff.models.autoencoder import AutoencoderConfig, AutoencoderKL
from latentdiff.models.unet import UNetConfig
from latentdiff.pipeline import load

PROMPT = "a red circle"
GEN = {"steps": 2, "seed": 1, "output": "np"}


def _folder(path: Path, parameterization: str = "eps", index: ModelIndex | None = None) -> Path:
    """A random model folder: factor-2 autoencoder, 2-level U-Net, hashed text encoder, 32 px."""
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8))
    spec = DenoiserSpec(parameterization=parameterization, unet=UNetConfig(
        model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
        context_dim=16, vector_dim=16, norm_groups=8))
    text = build_text_encoder(TextEncoderConfig(dim=16, vocab_size=64, num_layers=1, num_heads=2))
    index = index if index is not None else ModelIndex(sample_size=32)
    return write_model_folder(path, ModelFolder(index, ae, build_denoiser(spec), spec, text))


@pytest.fixture(scope="module")
def eps_model(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("index") / "eps")


def test_the_index_round_trips_at_the_current_version(tmp_path):
    index = ModelIndex(sample_size=48, family="sd1", class_names=["a", "b"], size_conditioning=SizeConditioning(8),
                       scheduler=SamplerHint("plms", "leading", steps_offset=1, vp_init=True),
                       generation=GenerationSettings("euler", 4, 1.0, "trailing"))
    index.write(tmp_path)
    data = json.loads((tmp_path / "model_index.json").read_text())
    assert data["version"] == VERSION and data["format"] == "latentdiff" and data["generation"]["steps"] == 4
    assert ModelIndex.read(tmp_path) == index


def test_version_0_indexes_still_load(eps_model, tmp_path):
    """Folders written before the index had a version: our training's and convert's layouts."""
    trained = {"format": "latentdiff", "components": ["autoencoder", "denoiser", "text_encoder"], "sample_size": 32,
               "size_conditioning": {"embed_dim": 8}}
    converted = {"format": "latentdiff", "components": ["autoencoder", "denoiser", "text_encoder"], "sample_size": 32,
                 "family": "sd1", "sampler": {"sampler": "plms", "schedule": "leading", "steps_offset": 1,
                                              "vp_init": True, "final_sigma": 0.0292, "note": "", "flow_shift": 1.0}}
    (tmp_path / "model_index.json").write_text(json.dumps(trained))
    assert ModelIndex.read(tmp_path) == ModelIndex(sample_size=32, size_conditioning=SizeConditioning(8))
    (tmp_path / "model_index.json").write_text(json.dumps(converted))
    index = ModelIndex.read(tmp_path)
    assert index.family == "sd1" and index.scheduler == SamplerHint("plms", "leading", 1, True, 0.0292)
    # A whole old folder: load() opens it and samples as before (the scheduler hint's grid details apply).
    old = tmp_path / "old"
    old.mkdir()
    for part in ("autoencoder", "denoiser", "text_encoder"):
        (old / part).symlink_to(eps_model / part)
    (old / "model_index.json").write_text(json.dumps(converted))
    pipe = load(old)
    assert pipe.index.scheduler.steps_offset == 1 and pipe.default_size == 32
    kw = {**GEN, "sampler": "ddim", "schedule": "leading"}
    assert not np.array_equal(pipe.generate(PROMPT, **kw), load(eps_model).generate(PROMPT, **kw))  # offset, VP start


def test_unreadable_indexes_say_why(tmp_path):
    ModelIndex(version=VERSION + 1).write(tmp_path)  # write() always writes the current version
    data = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**data, "version": VERSION + 1}))
    with pytest.raises(ValueError, match=f"version {VERSION + 1}; this latentdiff reads versions 0 to {VERSION}.*upgrade"):
        ModelIndex.read(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({**data, "sample_size": "big"}))
    with pytest.raises(ValueError, match="sample_size = 'big' is not a valid int"):
        ModelIndex.read(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="not a latentdiff model index"):
        ModelIndex.read(tmp_path)


def test_settings_come_from_the_call_then_the_model_then_the_defaults(eps_model, tmp_path):
    pipe = load(eps_model)
    # Nothing recommended: dpmpp_2m, 20 steps, guidance 5, on DPM++ 2M's own (Karras) grid for this eps model.
    assert pipe.settings() == GenerationSettings("dpmpp_2m", 20, 5.0, "karras", "cfg", 0.0)
    assert pipe.settings(sampler="euler").schedule == "trailing"  # euler's grid: the model's default grid
    assert pipe.settings(schedule="default").schedule == "trailing"  # named, so PNGs say which grid
    # A model that recommends settings (a distilled student, the bundled default) gets them unasked.
    student = _folder(tmp_path / "student", index=ModelIndex(
        sample_size=32, generation=GenerationSettings(sampler="euler", steps=3, guidance=1.0, schedule="karras")))
    pipe = load(student)
    assert pipe.settings() == GenerationSettings("euler", 3, 1.0, "karras", "cfg", 0.0)
    assert pipe.settings(steps=5, sampler="heun") == GenerationSettings("heun", 5, 1.0, "karras", "cfg", 0.0)
    explicit = pipe.generate(PROMPT, sampler="euler", steps=3, guidance=1.0, schedule="karras", seed=1, output="np")
    assert np.array_equal(pipe.generate(PROMPT, seed=1, output="np"), explicit)
    # The CLI uses them as well, and writes what it used into the PNG.
    cli.main(["generate", PROMPT, "--model", str(student), "--seed", "1", "-o", str(tmp_path / "a.png")])
    params = read_parameters(tmp_path / "a.png")
    assert (params["sampler"], params["steps"], params["guidance"], params["schedule"]) == ("euler", 3, 1.0, "karras")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), explicit[0])
    cli.main(["generate", PROMPT, "--model", str(student), "--steps", "2", "-o", str(tmp_path / "b.png")])
    assert read_parameters(tmp_path / "b.png")["steps"] == 2


@pytest.mark.parametrize("parameterization, default, euler, dpmpp", [
    ("eps", "trailing", "trailing", "karras"),
    ("flow", "flow", "flow", "flow"),  # a Karras ramp in t (DPM++ 2M's grid) draws worse scenes than the flow grid
    ("edm", "karras", "karras", "karras"),
])
def test_each_parameterization_names_its_own_grid(tmp_path, parameterization, default, euler, dpmpp):
    pipe = load(_folder(tmp_path / parameterization, parameterization))
    assert pipe.settings(schedule="default").schedule == default
    assert pipe.settings(sampler="euler").schedule == euler
    assert pipe.settings().schedule == dpmpp
    assert pipe.settings(schedule="exponential").schedule == "exponential"  # asked for: kept
    assert pipe.generate(PROMPT, **GEN).shape == (1, 32, 32, 3)


def test_guidance_interval_and_dynamic_threshold_reach_generate(eps_model, tmp_path):
    pipe = load(eps_model)
    unguided = pipe.generate(PROMPT, guidance=1.0, **GEN)
    guided = pipe.generate(PROMPT, guidance=4.0, **GEN)
    assert not np.array_equal(guided, unguided)
    # An interval no sigma of the grid falls in: no guidance anywhere; one that holds them all: guidance everywhere.
    assert np.array_equal(pipe.generate(PROMPT, guidance=4.0, guidance_interval=(100.0, 200.0), **GEN), unguided)
    assert np.array_equal(pipe.generate(PROMPT, guidance=4.0, guidance_interval=(0.0, 1e9), **GEN), guided)
    assert not np.array_equal(pipe.generate(PROMPT, guidance=4.0, dynamic_threshold=0.6, **GEN), guided)
    with pytest.raises(ValueError, match="guidance interval"):
        pipe.generate(PROMPT, guidance_interval=(2.0, 1.0), **GEN)
    out = tmp_path / "interval.png"
    cli.main(["generate", PROMPT, "--model", str(eps_model), "--steps", "2", "--seed", "1", "--guidance", "4",
              "--guidance-interval", "100", "200", "--dynamic-threshold", "0.995", "-o", str(out)])
    params = read_parameters(out)
    assert params["guidance_interval"] == [100.0, 200.0] and params["dynamic_threshold"] == 0.995
    want = pipe.generate(PROMPT, guidance=4.0, guidance_interval=(100.0, 200.0), dynamic_threshold=0.995, **GEN)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), want[0])


def test_nothing_outside_the_parameterizations_branches_on_the_prediction_type():
    root = Path(__file__).resolve().parents[1] / "latentdiff"
    branch = re.compile(r"param(eterization)?(\.name)?\s*(==|!=|in|not in)\s*[(\"']")
    found = [f"{path.relative_to(root)}:{i}: {line.strip()}"
             for path in root.rglob("*.py") if path.name != "parameterization.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert not found, found
