"""Issue 15, reliability: every bad input gets a clear error before work starts, nothing is lost, nothing writes
garbage. One test per class of bad input, each a family of cases through the real command line in one subprocess
(``_cli_batch.py``, which can also make the file system answer "read-only", "disk full", "permission denied"):
exit status != 0, one ``error:`` line naming the key or the file, no traceback, nothing written or changed.
Then the crash-safety corners of checkpoints (a kill between the two renames of a re-save) and file modes."""

import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from _tiny import REPO, env, make_tiny_cache
from PIL import Image
from safetensors.torch import load_file, save_file
from test_model_index import _folder

from latentdiff.config import build_config

BATCH = REPO / "tests" / "_cli_batch.py"


def batch(calls: list[dict], scratch) -> list[dict]:
    """Run ``calls`` (argv, env, faults) in one subprocess of the real CLI; their exit codes and output."""
    path = scratch / "calls.json"
    path.write_text(json.dumps(calls))
    proc = subprocess.run([sys.executable, str(BATCH), str(path)], env=env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def tree(root) -> dict:
    """Every path under ``root`` with its size and modification time: what "nothing changed" compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def assert_refused(result: dict, *words: str) -> str:
    """A non-zero exit, exactly one ``error:`` line holding ``words``, no traceback; returns the line."""
    err = result["stderr"]
    assert result["code"] != 0, result
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def refuse_all(cases: list[tuple[dict, tuple[str, ...]]], root, scratch) -> list[str]:
    """Run every case in one subprocess; each refused as above, and nothing under ``root`` changed."""
    before = tree(root)
    results = batch([call for call, _ in cases], scratch)
    lines = [assert_refused(r, *words) for r, (_, words) in zip(results, cases)]
    assert tree(root) == before
    return lines


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random 32 px model folder (factor-2 autoencoder) and a scratch folder outside the watched tree."""
    root = tmp_path_factory.mktemp("reliable")
    return _folder(root / "model"), root, tmp_path_factory.mktemp("scratch")


def generate(model_dir, *args: str) -> list[str]:
    return ["generate", "a red circle", "--model", str(model_dir), "--steps", "2", *args]


def variant(model_dir, name: str, edit) -> str:
    """A copy of the model folder changed by ``edit(folder)``."""
    folder = model_dir.parent / name
    shutil.copytree(model_dir, folder)
    edit(folder)
    return str(folder)


def write_json(path, obj) -> None:
    path.write_text(json.dumps(obj))


def test_os_errors_and_bugs_end_as_one_line(model):
    """Class 1: read-only file system, disk full, permission denied, a path through a file, an unforeseen error."""
    model_dir, root, scratch = model
    (root / "a_file").write_text("x")
    for name in ("ro", "full", "locked"):
        (root / name).mkdir()
    fault = lambda code, marker: [{"on": "write", "errno": code, "marker": marker}]
    cases = [
        ({"argv": generate(model_dir, "-o", str(root / "a_file" / "x.png"))}, ("a_file", "is a file, not a folder")),
        ({"argv": generate(model_dir, "-o", str(root / "ro" / "x.png")), "faults": fault("EROFS", "/ro/")},
         ("Read-only file system", str(root / "ro" / "x.png"), "write somewhere else")),
        ({"argv": generate(model_dir, "-o", str(root / "full" / "x.png")), "faults": fault("ENOSPC", "/full/")},
         ("No space left on device", str(root / "full" / "x.png"), "free some space")),
        ({"argv": generate(model_dir, "-o", str(root / "locked" / "x.png")), "faults": fault("EACCES", "/locked/")},
         ("Permission denied", str(root / "locked" / "x.png"), "permissions")),
        ({"argv": ["train", "--cache", str(root / "a_file"), "--out", str(root / "a_file" / "run")]},
         ("out path", "a_file", "is a file")),
        ({"argv": ["judge", "--n", "2"], "faults": [{"on": "call", "target": "latentdiff.data.judge:validate",
                                                   "error": "KeyError"}]},
         ("unexpected KeyError", "cmd_judge", "--debug")),
    ]
    refuse_all(cases, root, scratch)
    # --debug (after the command or before it) and LATENTDIFF_DEBUG=1 show the traceback, and the line after it.
    argv = generate(model_dir, "-o", str(root / "a_file" / "x.png"))
    results = batch([{"argv": [*argv, "--debug"]}, {"argv": ["--debug", *argv]},
                     {"argv": argv, "env": {"LATENTDIFF_DEBUG": "1"}}], scratch)
    for r in results:
        assert r["code"] == 2 and "Traceback" in r["stderr"] and r["stderr"].rstrip().splitlines()[-1].startswith(
            "error: cannot write the out path")


def test_config_values_out_of_range_or_of_the_wrong_shape(model):
    """Class 2: every config value against its type and declared bounds, at every layer (--set, TOML, flags), and
    config files of every kind that are valid JSON of the wrong shape."""
    model_dir, root, scratch = model
    (root / "bad.toml").write_text('steps = 10\n[text_encoder]\ndim = "wide"\n')
    (root / "zero.toml").write_text("keep_last = 0\n")
    train = ["train", "--cache", str(root / "cache"), "--out", str(root / "run")]
    sets = {"steps=0": "steps must be >= 1", "batch_size=0": "batch_size must be >= 1", "lr=0": "lr must be > 0",
            "caption_dropout=1.5": "caption_dropout must be in [0, 1]", "label_dropout=-0.1": "label_dropout",
            "save_every=0": "save_every must be >= 1", "log_every=0": "log_every", "sample_every=-1": "sample_every",
            "sample_prompts=[1, 2]": "sample_prompts[0] = 1 is not a valid str", "lr=nan": "lr = nan",
            "posthoc_sigma_rels=[0.5]": "posthoc_sigma_rels", "precision='fp16'": "one of 'fp32', 'bf16'"}
    cases = [({"argv": [*train, "--set", s]}, ("command-line overrides", w)) for s, w in sets.items()]
    cases += [
        ({"argv": [*train, "--config", str(root / "bad.toml")]}, ("bad.toml [text_encoder]", "dim = 'wide'")),
        ({"argv": [*train, "--config", str(root / "zero.toml")]}, ("zero.toml", "keep_last must be >= 1")),
        ({"argv": ["train-vae", "--out", str(root / "v"), "--set", "image_size=4"]}, ("image_size must be in [8",)),
        ({"argv": ["cache", "--out", str(root / "c"), "--set", "shard_size=0"]}, ("shard_size must be >= 1",)),
        ({"argv": ["demo", "--out", str(root / "d"), "--set", "eval_prompts=0"]}, ("eval_prompts must be >= 1",)),
        ({"argv": ["eval", "--model", str(model_dir), "--out", str(root / "e"), "--set", "steps=[0]"]},
         ("steps must be in [1, 10000]",)),
        ({"argv": generate(model_dir, "--num-images", "0")}, ("num_images must be >= 1",)),
        ({"argv": generate(model_dir, "--width", "0")}, ("width = 0", "width must be >= 1")),
        ({"argv": generate(model_dir, "--guidance-rescale", "2")}, ("guidance_rescale must be in [0, 1]",)),
    ]
    # Files of the model folder, valid JSON of the wrong shape: each error names the file.
    shapes = {
        "index_list": ("model_index.json", []),
        "index_type": ("model_index.json", {"format": "latentdiff", "version": 1, "sample_size": "abc"}),
        "config_list": ("denoiser/config.json", {"type": "Denoiser", "config": []}),
        "config_missing": ("autoencoder/config.json", {"type": "AutoencoderKL"}),
        "config_value": ("text_encoder/config.json", {"type": "TextEncoder", "config": {"dim": "x"}}),
        "generation": ("model_index.json", {"format": "latentdiff", "version": 1, "generation": {"steps": 0}}),
    }
    for name, (rel, content) in shapes.items():
        folder = variant(model_dir, name, lambda f, rel=rel, content=content: write_json(f / rel, content))
        cases.append(({"argv": generate(folder)}, (str(root / name / rel),)))
    (root / "cache").mkdir()
    write_json(root / "cache" / "cache.json", {"buckets": 3, "num_items": 1})
    cases.append(({"argv": train}, (str(root / "cache" / "cache.json"), "expected layout")))
    refuse_all(cases, root, scratch)


def test_generation_sizes_counts_and_memory_are_checked_up_front(model):
    """Class 3: sizes and counts a machine cannot make, refused with the numbers before any sampling."""
    model_dir, root, scratch = model
    cases = [
        ({"argv": generate(model_dir, "--width", "100000", "--height", "100000")},
         ("100000x100000 need about", "GiB", "available", "fewer or smaller")),
        ({"argv": generate(model_dir, "--num-images", "10000000000")}, ("10000000000 image(s) of 32x32 need",)),
        ({"argv": generate(model_dir, "--width", "33")}, ("multiples of the autoencoder's factor 2", "try 32x32")),
        ({"argv": generate(model_dir, "--steps", "1000000000000")}, ("steps must be in [1, 10000]",)),
        ({"argv": generate(model_dir, "--guidance", "inf")}, ("guidance = inf", "finite")),
        ({"argv": generate(model_dir, "--guidance", "nan")}, ("guidance = nan is not a number",)),
    ]
    refuse_all(cases, root, scratch)


def test_large_requests_are_made_in_batches_with_the_same_images(model, monkeypatch):
    from latentdiff import pipeline

    pipe = pipeline.load(model[0])
    whole = pipe.generate(["a red circle", "a blue square"], num_images=3, steps=2, output="pt")
    working, _ = pipe.memory_estimate(32, 32)
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 2 * working)
    assert pipe.batch_size(6, 32, 32) == 2
    batched = pipe.generate(["a red circle", "a blue square"], num_images=3, steps=2, output="pt")
    assert torch.equal(whole, batched)


def test_garbage_is_refused_not_written(model):
    """Class 4: NaN weights, a broken latent scale, weights that overflow: an error naming the component, tensor or
    likely cause; never a black PNG with exit 0."""
    model_dir, root, scratch = model

    def set_weight(component: str, key: str, value: float):
        def edit(folder):
            path = folder / component / "model.safetensors"
            state = load_file(str(path))
            state[key] = torch.full_like(state[key], value)
            save_file(state, str(path))
        return edit

    def scale(value):
        def edit(folder):
            path = folder / "autoencoder" / "config.json"
            cfg = json.loads(path.read_text())
            cfg["config"]["scale_factor"] = value
            path.write_text(json.dumps(cfg))  # Python's JSON writes NaN and Infinity
        return edit

    out = str(root / "out.png")
    cases = [
        ({"argv": generate(variant(model_dir, "nan", set_weight("denoiser", "conv_out.weight", math.nan)), "-o", out)},
         ("refusing denoiser", "conv_out.weight", "NaN or inf", "denoiser/model.safetensors")),
        ({"argv": generate(variant(model_dir, "scale_nan", scale(math.nan)), "-o", out)},
         ("autoencoder/config.json", "scale_factor = nan")),
        ({"argv": generate(variant(model_dir, "scale_inf", scale(math.inf)), "-o", out)},
         ("autoencoder/config.json", "scale_factor = inf", "must be > 0")),
        ({"argv": generate(variant(model_dir, "scale_0", scale(0)), "-o", out)}, ("scale_factor = 0.0 is not allowed",)),
        ({"argv": generate(variant(model_dir, "loud", set_weight("denoiser", "conv_out.weight", 1e38)), "-o", out)},
         ("sampling gave non-finite latents", "guidance", "denoiser's weights")),
        ({"argv": generate(variant(model_dir, "loud_ae", set_weight("autoencoder", "decoder.conv_out.weight", 1e38)),
                           "-o", out)},
         ("decoding gave non-finite pixels", "scale_factor", "latent-stats")),
    ]
    refuse_all(cases, root, scratch)


def test_data_problems_are_reported_not_crashed_on(model, tmp_path):
    """Class 5: check-data reports bad metadata lines, captions of missing files, unreadable files and folders, and
    tells flat images of different colours apart; non-UTF-8 names are stored readably; autoencoder training names
    the files it skips even when quiet."""
    _, _, scratch = model
    data = tmp_path / "data"
    (data / "locked").mkdir(parents=True)
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (64, 64), colour).save(data / f"{name}.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(data / "locked" / "green.png")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(data / "secret.png")
    gradient = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    Image.fromarray(gradient).save(data / "float01.tif")  # float32 in [0, 1]: read by its range
    Image.fromarray(gradient * 400 - 50).save(data / "floatodd.tif")  # no range to tell: corrupt
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 200, 0)).save(png, format="PNG")
    with open(os.fsencode(data) + b"/caf\xe9.png", "wb") as f:  # a name that is not UTF-8
        f.write(png.getvalue())
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "red.png", "text": "red"}) + "\n{not json\n"
                                         + json.dumps({"file_name": "gone.png", "text": "lost"}) + "\n")
    report = tmp_path / "report.json"
    faults = [{"on": "read", "errno": "EACCES", "marker": "secret.png"},
              {"on": "list", "errno": "EACCES", "marker": "/locked"}]
    args = ["train-vae", "--data", str(data), "--out", str(tmp_path / "vae"), "--dry-run", "--set", "crop='random'",
            "--set", "quiet=true", "--set", "image_size=16", "--set", "batch_size=2", "--set", "dry_run_steps=2"]
    checked, trained = batch([{"argv": ["check-data", str(data), "--json", str(report)], "faults": faults},
                              {"argv": args}], scratch)
    assert checked["code"] == 1 and "Traceback" not in checked["stderr"], checked
    text = checked["stdout"]
    for word in ("unusable metadata lines: 1", "metadata.jsonl:2", "captions of missing files: 1", "gone.png",
                 "unreadable folders: 1", "locked", "secret.png: cannot be read (PermissionError",
                 "floatodd.tif: ValueError: floating-point image with values in [-50, 350]",
                 "near duplicates: 0", "caf\\xe9.png"):
        assert word in text, (word, text)
    assert "no problems found" not in text and "float01.tif" not in text.split("without a caption")[0]
    stored = json.loads(report.read_text(encoding="utf-8"))
    assert "caf\\xe9.png" in stored["missing_captions"] and stored["orphan_captions"] == ["gone.png"]
    assert stored["problems"] == 2 + 1 + 1 + 1  # corrupt (secret, floatodd), folder, metadata line, orphan caption
    assert trained["code"] == 0, trained["stderr"]
    assert "floatodd.tif" in trained["stderr"]  # skipped and named though quiet


def test_float_images_are_read_by_their_range():
    from latentdiff.data.folder import to_rgb

    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    for scale in (1.0, 255.0, 65535.0):
        rgb = np.asarray(to_rgb(Image.fromarray(ramp * scale)))
        assert rgb.shape == (4, 4, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and rgb[1, 1, 0] == 85
    with pytest.raises(ValueError, match="NaN"):
        to_rgb(Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)))


def test_a_kill_between_the_renames_of_a_checkpoint_resave_loses_nothing(tmp_path, monkeypatch):
    """Fault injection: re-saving step 6 dies between its two renames (step_0000006 -> .step_0000006.old done,
    the new folder not yet in place), so `latest` names a missing folder. Resuming finds the checkpoint (put back
    from .old; without that, the newest intact one), cleans leftovers, drops rolled-back metrics rows, and ends
    bitwise equal to the same runs without the crash: 6 steps, then resumed to 8."""
    from test_run_engine import config, train_toy

    from latentdiff.train.common import find_checkpoint

    train_toy(config(tmp_path, "ref"))
    train_toy(config(tmp_path, "ref", resume=True, steps=8))
    train_toy(config(tmp_path, "run"))  # steps 1..6, checkpoints 4 and 6
    run = tmp_path / "run"
    real_replace = os.replace

    def dies_between_renames(src, dst):
        if os.path.basename(dst) == "step_0000006" and str(src).endswith(".tmp"):  # the swap's second rename
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_between_renames)
    with pytest.raises(OSError, match="killed"):
        train_toy(config(tmp_path, "run", resume=True))  # nothing left to train: finish() re-saves step 6
    monkeypatch.setattr(os, "replace", real_replace)
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000006" and not (checkpoints / "step_0000006").exists()
    assert (checkpoints / ".step_0000006.old" / "state.json").is_file()
    assert find_checkpoint(run) == checkpoints / "step_0000004"  # without recovery: the newest intact one
    (run / ".model.0123abcd.tmp").mkdir()  # leftovers of other interrupted writes
    shutil.copytree(checkpoints / "step_0000004", checkpoints / ".step_0000004.old")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 7, "loss": 1.0}\n{"ste')

    train_toy(config(tmp_path, "run", resume=True, steps=8))
    assert_same_run_at(tmp_path / "ref", run, 8)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # rows of rolled-back steps and the torn last line are gone


def assert_same_run_at(a, b, step: int) -> None:
    for name in ("model", "ema", "optimizer", "posthoc_1"):
        rel = f"checkpoints/step_{step:07d}/{name}.safetensors"
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x), rel


def test_every_file_written_gets_the_mode_a_plain_write_gives(tmp_path):
    """Checkpoints, caches, model folders, PNGs, logs: files 0666 and folders 0777 less the umask."""
    from test_run_engine import config, train_toy

    from latentdiff.images import save_png

    old = os.umask(0o027)
    try:
        make_tiny_cache(tmp_path)  # autoencoder folder + cache
        train_toy(config(tmp_path, "run"))  # checkpoints, latest, metrics, post-hoc EMA snapshots, samples
        _folder(tmp_path / "model")  # a model folder
        save_png(Image.new("RGB", (8, 8)), tmp_path / "pngs" / "a.png", {"seed": 0})
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o750 if (tmp_path / p).is_dir() else 0o640)}
    assert not wrong, wrong
    for part in ("cache/cache.json", "run/checkpoints/latest", "run/checkpoints/step_0000006/state.json",
                 "run/metrics.jsonl", "model/denoiser/model.safetensors", "pngs/a.png", "ae/config.json"):
        assert part in modes


def test_bounds_are_declared_once_and_inherited():
    from latentdiff.config import bounds_of
    from latentdiff.train.denoiser import TrainConfig
    from latentdiff.train.run import RunConfig

    assert set(bounds_of(RunConfig)) < set(bounds_of(TrainConfig))  # a loop adds its own to the engine's
    with pytest.raises(ValueError, match=r"preset 'p': keep_last = 0 is not allowed: keep_last must be >= 1"):
        build_config(TrainConfig, {"p": {"keep_last": 0}}, "p", None, {})
    assert build_config(TrainConfig, {}, None, None, {"sample_every": 0}).sample_every == 0
