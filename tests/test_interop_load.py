"""Loading pretrained SD-family checkpoints: diffusers folders, single files, our folders, bad input.

The proofs: a tiny diffusers pipeline saved with ``save_pretrained`` and loaded by ``latentdiff.load``
generates diffusers' own image (same seed, steps and sampler) to 1/255; a single original-layout file
written with our inverse tables loads back into identical parameters; bad files fail with errors that
name the problem.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.interop import open_model
from latentdiff.interop.common import save_latentdiff
from latentdiff.interop.files import read_state_file
from latentdiff.interop.single_file import UnsupportedCheckpoint, read_single_file, to_original_state
from latentdiff.io import write_safetensors

diffusers = pytest.importorskip("diffusers", reason="diffusers builds the reference pipelines")
pytest.importorskip("transformers", reason="the SD text encoders are transformers CLIP models")

from interop_tiny import one_thread, tiny_sd_pipeline, tiny_sdxl_pipeline

# What the shapes of a tiny file cannot tell (real SD files get these from the family).
SD1_OVERRIDES = {"unet": {"num_heads": 2, "norm_groups": 8}, "vae": {"norm_groups": 4}, "text_encoder_0": {"num_attention_heads": 4}}
SDXL_OVERRIDES = {"unet": {"head_dim": None, "num_heads": 4, "norm_groups": 8}, "vae": {"norm_groups": 4},
                  "text_encoder_0": {"num_attention_heads": 4}, "text_encoder_1": {"num_attention_heads": 4}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


def _images01(pt: torch.Tensor) -> np.ndarray:
    return (pt / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _params(model) -> dict:
    """Every tensor of an SDModel's components, under one namespace."""
    out = {f"unet.{k}": v for k, v in model.denoiser.network.state_dict().items()}
    out.update({f"vae.{k}": v for k, v in model.autoencoder.state_dict().items()})
    out.update({f"text.{k}": v for k, v in model.text_encoder.canonical_state_dict().items()})
    return out


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    bad = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


# ------------------------------------------------------------------------------- end to end vs diffusers


def test_diffusers_folder_generates_diffusers_image(sd_folder, capsys):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    pipe = latentdiff.load(sd_folder)
    printed = capsys.readouterr().out
    assert "unet: 208 tensors matched" in printed and "euler" in printed and "steps_offset 1" in printed
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 16, "width": 16}
    expected = ref("a red circle", generator=torch.Generator().manual_seed(7), output_type="np", **kw).images
    got = pipe.generate("a red circle", steps=4, sampler="euler", schedule="leading", guidance=3.0, seed=7,
                        height=16, width=16, output="pt")
    diff = np.abs(_images01(got) - expected).max()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"
    assert expected.std() > 0.01  # a real image, not a constant one


def test_img2img_matches_diffusers_img2img(sd_folder, tmp_path):
    """img2img at strength 0.6 against StableDiffusionImg2ImgPipeline with the same scheduler, seed and steps.

    One difference is deliberate: diffusers encodes the image to a sample of the VAE posterior, drawn first from
    the generator; latentdiff encodes to its mode (the same image always gives the same latent, as ComfyUI does).
    So the copy's posterior is made near-certain (logvar -30, std 3e-7) and latentdiff is given the noise that
    diffusers draws second: everything else (encoding, t_start, noising, the truncated grid) is compared."""
    folder = tmp_path / "pipe"
    shutil.copytree(sd_folder, folder)
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref.vae.quant_conv.weight[4:] = 0
        ref.vae.quant_conv.bias[4:] = -30
    ref.vae.save_pretrained(folder / "vae")
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.repeat(np.repeat(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), 4, 0), 4, 1))
    expected = ref("a red circle", image=image, strength=0.6, num_inference_steps=5, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(7), output_type="np").images
    g = torch.Generator().manual_seed(7)
    torch.randn(1, 4, 8, 8, generator=g)  # diffusers' posterior sample
    noise = torch.randn(1, 4, 8, 8, generator=g)
    pipe = latentdiff.load(folder)
    got = pipe.generate("a red circle", image=image, strength=0.6, steps=5, sampler="euler", schedule="leading",
                        guidance=3.0, latents=noise, output="pt")
    diff = np.abs(_images01(got) - expected).max()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"
    far = ref("a red circle", image=image, strength=1.0, num_inference_steps=5, guidance_scale=3.0,
              generator=torch.Generator().manual_seed(7), output_type="np").images
    assert np.abs(far - expected).max() > 0.05  # the strength matters at this size


def test_ddim_v_prediction_folder_generates_diffusers_image(tmp_path):
    """A VP scheduler (DDIM, eta 0) starts from unit noise in VP space: the loader's vp_init."""
    folder = tiny_sd_pipeline(tmp_path / "ddim", scheduler="ddim", prediction="v_prediction")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    pipe = latentdiff.load(folder)
    assert pipe.index.scheduler.vp_init and pipe.denoiser.parameterization.name == "v"
    expected = ref("a green star", num_inference_steps=4, guidance_scale=4.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(5), output_type="np").images
    got = pipe.generate("a green star", steps=4, sampler="ddim", schedule="leading", guidance=4.0, seed=5,
                        height=16, width=16, output="pt")
    diff = np.abs(_images01(got) - expected).max()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"


def test_sdxl_folder_generates_diffusers_image(sdxl_folder, capsys):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref.set_progress_bar_config(disable=True)
    pipe = latentdiff.load(sdxl_folder)
    assert "detected sdxl" in capsys.readouterr().out
    expected = ref("a blue square", num_inference_steps=3, guidance_scale=2.0, height=24, width=16,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
    configured = pipe.text_encoder.config.image_size
    got = pipe.generate("a blue square", steps=3, sampler="euler", schedule="leading", guidance=2.0, seed=3,
                        height=24, width=16, output="pt")
    diff = np.abs(_images01(got) - expected).max()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"  # the size ids follow the request
    assert pipe.text_encoder.config.image_size == configured  # ... passed along, not stored in the shared encoder


# ------------------------------------------------------------------------------- single files


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_single_file_round_trip_identical_parameters(which, sd_folder, sdxl_folder, tmp_path, capsys):
    folder, overrides = (sd_folder, SD1_OVERRIDES) if which == "sd1" else (sdxl_folder, SDXL_OVERRIDES)
    model = open_model(folder)
    path = tmp_path / "model.safetensors"
    write_safetensors(path, to_original_state(model))
    back = read_single_file(path, tokenizer=folder, overrides=overrides)
    assert back.family == which
    assert back.spec.unet == model.spec.unet and back.autoencoder.config.channel_mult == model.autoencoder.config.channel_mult
    _assert_same_params(model, back)
    # latentdiff.load routes a file and reports what it detected.
    pipe = latentdiff.load(path, tokenizer=folder, overrides=overrides)
    assert f"detected {which}" in capsys.readouterr().out
    assert pipe.index.scheduler.steps_offset == 1


def test_sd2_single_file_drops_last_openclip_layer_and_takes_prediction(tmp_path, capsys):
    """SD 2.x files carry all 24 OpenCLIP layers; the model conditions on the penultimate one."""
    from latentdiff.interop.keymaps import KeyMap, openclip_rules, unet_rules, vae_rules

    folder = tiny_sd_pipeline(tmp_path / "sd2", prediction="v_prediction", kind="sd2")
    model = open_model(folder)
    assert model.family == "sd2" and model.spec.parameterization == "v"
    layers = model.text_encoder.config.encoders[0].hf_config["num_hidden_layers"]
    state = KeyMap(unet_rules(model.spec.unet), "model.diffusion_model.").to_original(
        model.denoiser.network.state_dict())[0]
    state.update(KeyMap(vae_rules(model.autoencoder.config), "first_stage_model.").to_original(
        model.autoencoder.state_dict())[0])
    text = model.text_encoder.canonical_state_dict()
    last = f"encoders.0.text_model.encoder.layers.{layers}."  # an extra, unused last layer
    text.update({last + k.split(f"layers.{layers - 1}.")[1]: torch.randn_like(v)
                 for k, v in text.items() if f"layers.{layers - 1}." in k})
    state.update(KeyMap(openclip_rules(layers + 1, projection=False), "cond_stage_model.model.",
                        "encoders.0.").to_original(text)[0])
    path = tmp_path / "sd2.safetensors"
    write_safetensors(path, state)
    overrides = {"unet": {"head_dim": 8, "norm_groups": 8}, "vae": {"norm_groups": 4},
                 "text_encoder_0": {"num_attention_heads": 4}}
    back = read_single_file(path, tokenizer=folder, overrides=overrides)
    assert back.family == "sd2" and back.spec.parameterization == "v"
    assert any(f"dropped OpenCLIP layer {layers}" in n for n in back.notes)
    assert "assumed v-prediction" in back.summary()
    _assert_same_params(model, back)
    eps = read_single_file(path, tokenizer=folder, overrides=overrides, prediction="eps")
    assert eps.spec.parameterization == "eps"


def test_single_file_ckpt_loads_without_pickle_code(sd_folder, tmp_path):
    model = open_model(sd_folder)
    state = to_original_state(model)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 5}, path)  # plain tensors + an int: weights_only accepts it
    back = read_single_file(path, tokenizer=sd_folder, overrides=SD1_OVERRIDES)
    _assert_same_params(model, back)


def test_our_folder_round_trip_same_image(sd_folder, tmp_path):
    model = open_model(sd_folder)
    save_latentdiff(model, tmp_path / "ours")
    a = latentdiff.pipeline.Pipeline  # noqa: F841 (import check)
    ours = latentdiff.load(tmp_path / "ours")
    direct = latentdiff.load(sd_folder)
    kw = {"steps": 2, "sampler": "euler", "schedule": "leading", "guidance": 2.0, "seed": 1, "output": "pt"}
    assert torch.equal(ours.generate("a cat", **kw), direct.generate("a cat", **kw))


# ------------------------------------------------------------------------------- bad input


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "notes.ckpt"
    junk.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        read_state_file(junk)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_state_file(fake)
    with pytest.raises(ValueError, match="unknown weights format"):
        read_state_file(junk.rename(tmp_path / "notes.txt"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        latentdiff.load(tmp_path / "nope.safetensors")


def test_truncated_safetensors(sd_folder, tmp_path):
    src = sd_folder / "unet" / "diffusion_pytorch_model.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        latentdiff.load(cut, tokenizer=sd_folder)


class Payload:  # a pickle that would construct an arbitrary object
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_needing_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, path)
    with pytest.raises(ValueError, match=r"executing pickled code.*\.safetensors"):
        read_state_file(path)
    assert "pickle code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("keys, detected", [
    (["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"], "SD 3 .*no autoencoder"),
    (["double_blocks.0.img_attn.qkv.weight"], "Flux"),
    (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.positional_embedding"],
     "SDXL refiner"),
    (["lora_unet_down_blocks_0.alpha"], "not an original SD-family checkpoint"),
])
def test_unsupported_family_names_what_was_detected(tmp_path, keys, detected):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {k: torch.zeros(1) for k in keys})
    with pytest.raises(UnsupportedCheckpoint, match=detected):
        read_single_file(path, tokenizer=tmp_path)


def test_upscale_file_names_its_channels(sd_folder, tmp_path):
    """7 input channels (the x4 upscaler's latents + low-res RGB) are refused by name; 9 (inpainting) load
    (tests/test_inpaint_model.py)."""
    state = to_original_state(open_model(sd_folder))
    w = state["model.diffusion_model.input_blocks.0.0.weight"]
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 7, *w.shape[2:])
    path = tmp_path / "upscale.safetensors"
    write_safetensors(path, state)
    with pytest.raises(UnsupportedCheckpoint, match="sd1: 7 input channels and 4 output channels"):
        read_single_file(path, tokenizer=sd_folder)


def test_single_file_missing_and_unknown_tensors_refused(sd_folder, tmp_path):
    state = to_original_state(open_model(sd_folder))
    gone = "model.diffusion_model.out.2.bias"
    del state[gone]
    state["model.diffusion_model.mystery.weight"] = torch.zeros(2)
    path = tmp_path / "partial.safetensors"
    write_safetensors(path, state)
    with pytest.raises(ValueError, match=r"refusing a partial load.*missing 1 \[model.diffusion_model.out.2.bias\]"
                                         r".*unused 1 \[model.diffusion_model.mystery.weight\]"):
        read_single_file(path, tokenizer=sd_folder, overrides=SD1_OVERRIDES)


def test_single_file_needs_a_tokenizer(sd_folder, tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, to_original_state(open_model(sd_folder)))
    with pytest.raises(ValueError, match="no tokenizer vocabulary: pass the folder with --tokenizer DIR"):
        read_single_file(path)


def test_config_weights_shape_mismatch_names_tensor_and_shapes(sd_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sd_folder, bad)
    cfg_path = bad / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 48  # the weights were made for 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"wrong shape .*attn2\.to_k\.weight: checkpoint \(32, 32\) vs model \(32, 48\)"):
        latentdiff.load(bad)


def test_unsupported_diffusers_settings_are_named(sd_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sd_folder, bad)
    cfg_path = bad / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["resnet_time_scale_shift"] = "scale_shift"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="resnet_time_scale_shift = 'scale_shift' is not supported"):
        latentdiff.load(bad)


def test_a_weight_left_on_the_meta_device_is_refused():
    from latentdiff.interop.common import check_materialized

    with torch.device("meta"):
        layer = torch.nn.Linear(2, 2)
    layer.weight = torch.nn.Parameter(torch.zeros(2, 2))  # the bias stays unset
    with pytest.raises(ValueError, match=r"1 tensors were left unset by the load, e.g. \['bias'\]"):
        check_materialized(layer, "layer")


def test_single_file_without_tokenizer_names_the_flag_and_folder(sd_folder, sdxl_folder, tmp_path, capsys):
    from latentdiff.cli import main

    path = tmp_path / "m.safetensors"
    write_safetensors(path, to_original_state(open_model(sd_folder)))
    for argv in (["generate", "a red circle", "--model", str(path)], ["convert", str(path), str(tmp_path / "out")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--tokenizer DIR" in err and "tokenizer=DIR" in err and "sd1 single file" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer in .*--tokenizer DIR"):
        read_single_file(path, tokenizer=tmp_path)  # a folder, but no vocabulary in it
    with pytest.raises(FileNotFoundError, match="does not exist"):
        latentdiff.load(path, tokenizer=tmp_path / "nowhere")

    # SDXL: two tokenizers (the second pads with '!'); a folder with only tokenizer/ is refused by name.
    xl = tmp_path / "xl.safetensors"
    write_safetensors(xl, to_original_state(open_model(sdxl_folder)))
    half = tmp_path / "half"
    shutil.copytree(sdxl_folder / "tokenizer", half / "tokenizer")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer_2/"):
        latentdiff.load(xl, tokenizer=half, overrides=SDXL_OVERRIDES)
    shutil.copytree(sdxl_folder / "tokenizer_2", half / "tokenizer_2")
    pipe = latentdiff.load(xl, tokenizer=half, overrides=SDXL_OVERRIDES)
    assert [t.pad_token for t in pipe.text_encoder.tokenizers] == ["<|endoftext|>", "!"]
