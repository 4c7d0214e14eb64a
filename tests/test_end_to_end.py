"""The whole path on tiny settings: train-vae -> cache -> train -> load -> generate, resume, CLI errors."""

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentdiff import load
from latentdiff.cli import main
from latentdiff.config import build_config
from latentdiff.data.cache import CACHE_PRESETS, CacheConfig, LatentCache, cache_dataset
from latentdiff.images import read_parameters
from latentdiff.train import common
from latentdiff.train.denoiser import TRAIN_PRESETS, TrainConfig, train_denoiser
from latentdiff.train.vae import VAE_PRESETS, VAETrainConfig, train_vae


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    ae = train_vae(build_config(VAETrainConfig, VAE_PRESETS, "shapes-test", None, {"out": str(root / "vae")}))
    cache = cache_dataset(build_config(CacheConfig, CACHE_PRESETS, "shapes-test", None,
                                       {"autoencoder": str(ae), "out": str(root / "cache")}), quiet=True)
    model = train_denoiser(build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None,
                                        {"cache": str(cache), "out": str(root / "run")}))
    return {"root": root, "autoencoder": ae, "cache": cache, "model": model}


def test_stages_write_what_they_promise(stages):
    ae_cfg = json.loads((stages["autoencoder"] / "config.json").read_text())["config"]
    assert ae_cfg["scale_factor"] > 0 and ae_cfg["scale_factor"] != 1.0  # computed from data
    cache = LatentCache(stages["cache"])
    assert len(cache) == 64 and len(cache.info["shards"]) == 2  # shard_size 40 -> 40 + 24
    assert cache.mean.shape[1:] == (4, 16, 16)
    assert all(isinstance(c, str) and c for c in cache.captions)
    run = stages["root"] / "run"
    assert (run / "metrics.jsonl").read_text().count("\n") == 3
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png"]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003"


def test_same_seed_same_image_and_strict_round_trip(stages):
    pipe = load(stages["model"])
    a = pipe.generate("a large red circle on the left", steps=3, seed=7, output="np")
    b = load(stages["model"]).generate("a large red circle on the left", steps=3, seed=7, output="np")
    c = pipe.generate("a large red circle on the left", steps=3, seed=8, output="np")
    assert a.shape == (1, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # The saved weights are the EMA weights of the final training checkpoint, tensor for tensor.
    ema = load_file(str(stages["root"] / "run" / "checkpoints" / "step_0000003" / "ema.safetensors"))
    saved = pipe.denoiser.network.state_dict()
    assert all(torch.equal(saved[k], ema[f"network.{k}"]) for k in saved)


def test_resume_after_interrupt_matches_uninterrupted_run(stages, tmp_path, monkeypatch):
    overrides = {"cache": str(stages["cache"]), "steps": 4, "save_every": 2, "sample_every": 0}
    straight = train_denoiser(build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None,
                                           {**overrides, "out": str(tmp_path / "a")}))
    original_log = common.MetricsLog.log

    def interrupt_at_third_step(self, step, **values):
        if step == 2:
            raise KeyboardInterrupt
        original_log(self, step, **values)

    monkeypatch.setattr(common.MetricsLog, "log", interrupt_at_third_step)
    cfg = build_config(TrainConfig, TRAIN_PRESETS, "shapes-test", None, {**overrides, "out": str(tmp_path / "b")})
    with pytest.raises(SystemExit, match="interrupted at step 3.*step_0000002 is intact"):
        train_denoiser(cfg)
    monkeypatch.setattr(common.MetricsLog, "log", original_log)
    cfg.resume = True
    resumed = train_denoiser(cfg)
    a = load_file(str(Path(straight) / "denoiser" / "model.safetensors"))
    b = load_file(str(Path(resumed) / "denoiser" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_cli_writes_png_with_parameters(stages, tmp_path, capsys):
    out = tmp_path / "out.png"
    main(["generate", "a large red circle on the left", "--model", str(stages["model"]), "--steps", "2",
          "--sampler", "dpmpp_2m", "--guidance", "5", "--seed", "0", "-o", str(out)])
    params = read_parameters(out)
    assert params["prompt"] == "a large red circle on the left"
    assert (params["steps"], params["sampler"], params["guidance"], params["seed"]) == (2, "dpmpp_2m", 5.0, 0)
    assert params["schedule"] == "karras"  # the grid it sampled on, named: DPM++ 2M's own for this eps model
    assert (params["width"], params["height"]) == (64, 64)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # what a plain write gives, as the API's files
    main(["generate", "a", "b", "--model", str(stages["model"]), "--steps", "2", "--num-images", "2",
          "--grid", "-o", str(tmp_path / "grid.png")])
    assert read_parameters(tmp_path / "grid.png")["prompt"] == ["a", "a", "b", "b"]
    # Several prompts, one file each: every PNG carries its own prompt, and the settings reproduce it.
    main(["generate", "a red circle", "a blue square", "--model", str(stages["model"]), "--steps", "2",
          "--seed", "3", "-o", str(tmp_path / "each.png")])
    files = sorted(tmp_path.glob("each_*.png"))
    assert [read_parameters(f)["prompt"] for f in files] == ["a red circle", "a blue square"]
    assert [read_parameters(f)["index"] for f in files] == [0, 1]
    want = load(stages["model"]).generate(["a red circle", "a blue square"], steps=2, seed=3, output="np")
    assert all(np.array_equal(np.asarray(Image.open(f).convert("RGB")), w) for f, w in zip(files, want))


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "dpmpp_2n"], "Did you mean .dpmpp_2m"),
    (["--height", "66"], "multiples of the autoencoder's factor"),
    (["--set", "stepz=3"], "unknown key.*stepz"),
])
def test_generate_cli_bad_input(stages, tmp_path, capsys, argv, message):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as e:
        main(["generate", "a red circle", "--model", str(stages["model"]), "--steps", "2", "-o", str(out), *argv])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_cli_errors_for_missing_things(tmp_path, capsys):
    cases = [
        (["generate", "a red circle", "--model", str(tmp_path / "nope")], "does not exist"),
        (["generate", "", "--model", str(tmp_path)], "no prompt given"),
        (["generate", "a red circle", "--model", str(tmp_path)], "no model_index.json"),
        (["train", "--resume", "--out", str(tmp_path), "--cache", str(tmp_path)], "no latent cache|no training checkpoint"),
        (["train-vae", "--resume", "--out", str(tmp_path / "run")], "no training checkpoint"),
        (["train-vae", "--preset", "nope"], "unknown preset 'nope'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)


def test_every_command_has_help(capsys):
    for command in ["demo", "train-vae", "cache", "train", "generate", "judge", "latent-stats", "distill-preview",
                    "eval-vae", "sds"]:
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: latentdiff " + command in out
        assert "()" not in out.split("config keys")[0]  # no empty preset list


def test_generate_help_says_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--steps N sampler steps (default: the model's recommendation, else 20)" in out
    assert "--seed SEED noise seed (default: 0)" in out
    assert "--guidance SCALE classifier-free guidance scale, 1 = off (default: the model's recommendation, else 5.0)" \
        in out
    assert "{default,exponential,flow,flow_match,karras,lcm,leading,linspace,trailing}" in out
    assert "(default: default)" in out and "the bundled default model" in out


def test_demo_presets_name_presets_that_exist():
    """The README's `latentdiff demo --preset shapes-demo-dit` (and -mmdit) use train's backbone variants."""
    from latentdiff.cli import DEMO_PRESETS, DemoConfig

    for name in DEMO_PRESETS:
        cfg = build_config(DemoConfig, DEMO_PRESETS, name, None, {})
        assert cfg.vae_preset in VAE_PRESETS and cfg.cache_preset in CACHE_PRESETS, name
        assert cfg.train_preset in TRAIN_PRESETS, name
    assert build_config(DemoConfig, DEMO_PRESETS, "shapes-demo-dit", None, {}).train_preset == "shapes-demo-dit"
    assert "shapes-demo-mmdit" in DEMO_PRESETS


def test_demo_runs_every_stage_and_reports(tmp_path, capsys):
    main(["demo", "--preset", "shapes-test", "--out", str(tmp_path / "demo")])
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert summary == report["summary"]
    assert (tmp_path / "demo" / "heldout_grid.png").exists()
    assert report["judge_heldout_prompts"]["n"] == 4
    assert report["judge_autoencoder_round_trip"]["n"] == 4
    # The scores are the judge's verdict on what the saved model draws with the reported settings.
    from latentdiff.data.shapes import heldout_prompts
    from latentdiff.demo import score_prompts

    settings = report["settings"]
    again, _ = score_prompts(load(report["model"]), heldout_prompts(4, seed=settings["seed"]), **settings)
    assert json.loads(json.dumps(again)) == report["judge_heldout_prompts"]
    assert summary["heldout"] == {k: round(v, 3) for k, v in again.items() if isinstance(v, float)}
