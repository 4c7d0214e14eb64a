"""The evaluation runner, report, training hook and CLI, with stand-in generators (no training needed)."""

import dataclasses
import json

import pytest
import torch

from latentdiff.cli import main
from latentdiff.data.shapes import parse_caption, render, to_tensor
from latentdiff.eval.run import EvalConfig, make_eval_hook, read_hook_log, run_eval, shapes_images


class Projection:
    """A fixed random projection of 8x8 thumbnails: a cheap stand-in feature space."""

    name, dim = "test-projection", 12

    def __init__(self):
        self.matrix = torch.randn(3 * 64, self.dim, generator=torch.Generator().manual_seed(0)) / 192**0.5

    def __call__(self, images):
        return torch.nn.functional.interpolate(images, size=(8, 8), mode="area").flatten(1) @ self.matrix


class StandIn:
    """A 'pipeline' that draws each caption's scene (perfect), noise, or copies of the training images."""

    default_size = 32

    def __init__(self, mode):
        self.mode, self.calls = mode, 0

    def generate(self, prompts, *, steps, sampler, guidance, seed, output):
        assert output == "pt"
        self.calls += 1
        if self.mode == "noise":
            return torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        if self.mode == "copy":
            return shapes_images(seed + len(prompts), 32, seed=0)[seed:]  # the training set, in order
        scenes = [parse_caption(p) for p in prompts]  # captions may leave the background unstated: draw each
        backgrounds = ("black", "gray", "white")  # in turn, as the data set draws them uniformly
        scenes = [s if s.background else dataclasses.replace(s, background=backgrounds[(seed + i) % 3])
                  for i, s in enumerate(scenes)]
        return torch.stack([to_tensor(render(s, 32, seed=seed + i)) for i, s in enumerate(scenes)])


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "report"), n_samples=40, n_reference=60, n_judge=6, samplers=("euler", "heun"),  # noqa: C408
                steps=(1, 3), guidance=(1.0, 3.0), base_sampler="euler", base_steps=3, base_guidance=3.0,
                kid_subset=20, kid_subsets=5, train_images=80, cache_dir=str(tmp_path / "cache"), grid_images=4,
                batch_size=16)
    return EvalConfig(**{**base, **kw})


def test_run_eval_writes_json_and_html_and_ranks_generators(tmp_path):
    hook_log = tmp_path / "hook.jsonl"  # what make_eval_hook writes during training
    hook_log.write_text("".join(json.dumps({"step": s, "fid": f, "kid": {"mean": f / 10}}) + "\n"
                                for s, f in ((100, 9.0), (200, 4.0))))
    perfect = run_eval(_cfg(tmp_path, train_log=str(hook_log)), pipe=StandIn("perfect"), extractor=Projection())
    noise = run_eval(_cfg(tmp_path, out=str(tmp_path / "noise"), memorization=False), pipe=StandIn("noise"),
                     extractor=Projection())
    # Settings: 2 samplers x 2 steps at guidance 3, plus guidance 1 (guidance 3 at euler/3 already there).
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in perfect["settings"]] == [
        ("euler", 1, 3.0), ("euler", 3, 3.0), ("heun", 1, 3.0), ("heun", 3, 3.0), ("euler", 3, 1.0)]
    p, n = perfect["settings"][0], noise["settings"][0]
    assert p["fid"] < n["fid"] / 2 and p["kid"]["mean"] < n["kid"]["mean"]
    # Noise's 8x8 thumbnails average to mid-grey, which this crude projection places among the grey-background
    # scenes: its precision says little here. Recall does: noise covers none of the data's variety.
    assert p["precision"] > 0.5 and p["recall"] > n["recall"] + 0.3, (p["precision"], p["recall"], n["recall"])
    assert p["judge_heldout"]["all_correct"] > 0.8 and n["judge_heldout"]["all_correct"] < 0.2
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["settings"][0]["fid"] == pytest.approx(p["fid"])
    assert on_disk["memorization"]["pixels"]["n"] == 40
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("<svg") >= 10 and "vs sampler steps" in page and "vs guidance" in page
    assert "FID vs training step" in page and perfect["training"][1]["step"] == 200
    assert page.count("data:image/png;base64,") == 5


def test_memorization_flags_a_copying_generator(tmp_path):
    report = run_eval(_cfg(tmp_path, samplers=("euler",), steps=(3,), guidance=(3.0,)), pipe=StandIn("copy"),
                      extractor=Projection())
    for space in ("pixels", "features"):
        assert report["memorization"][space]["near_copy_rate"] == 1.0


def test_eval_hook_logs_every_n_steps_with_fixed_budget(tmp_path):
    log = tmp_path / "hook.jsonl"
    hook = make_eval_hook(2, 40, log_path=log, extractor=Projection(), n_reference=60, n_judge=4, steps=2,
                          sampler="euler", cache_dir=str(tmp_path / "cache"), batch_size=20)
    pipe = StandIn("perfect")
    results = [hook(step, pipe) for step in range(5)]
    assert [r is None for r in results] == [False, True, False, True, False]
    rows = read_hook_log(log)
    assert [r["step"] for r in rows] == [0, 2, 4] and all(r["n"] == 40 for r in rows)
    assert rows[0]["fid"] == pytest.approx(rows[2]["fid"])  # same prompts, seeds and reference every time
    with pytest.raises(ValueError, match="positive"):
        make_eval_hook(0, 40)


def test_eval_refuses_too_few_samples_and_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="needs at least 13 generated and reference images"):
        run_eval(_cfg(tmp_path, n_samples=10), pipe=StandIn("perfect"), extractor=Projection())
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tmp_path / "missing")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    main(["duplicates", "--n", "30", "--threshold", "0.0001"])
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 30 and out["threshold"] == 0.0001 and out["groups"] == []
