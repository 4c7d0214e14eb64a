"""LoRA (models/lora.py, interop/lora.py, Pipeline.load_lora): exact merge / unmerge, several LoRAs with their
weights, our file format, and diffusers parity.

The proofs: a PEFT LoRA made with peft on a tiny random-weight diffusers SD pipeline, saved with diffusers'
``save_lora_weights``, loaded by diffusers (``load_lora_weights``) and by ``Pipeline.load_lora`` generates the same
image to 1/255; the same adapters renamed to kohya's keys (with ``.alpha``) and to the older diffusers layouts give
the same image again; LoRA files for another model are refused, naming the keys, before anything changes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import latentdiff
from latentdiff.interop.lora import lora_for_model
from latentdiff.models.dit import PRESETS as DIT_PRESETS
from latentdiff.models.dit import DiT
from latentdiff.models.lora import LoRA, LoRAConv2d, LoRALinear, read_lora_metadata, save_lora
from latentdiff.models.mmdit import PRESETS as MMDIT_PRESETS
from latentdiff.models.mmdit import MMDiT
from latentdiff.models.unet import PRESETS as UNET_PRESETS
from latentdiff.models.unet import UNet
from latentdiff.types import Cond


def _randomize(lora: LoRA, seed: int = 0, std: float = 0.1) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers:
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * std)
    return lora


def _unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNET_PRESETS["shapes-tiny"]).eval()


def _inputs(net, size=8):
    cfg = net.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, size, size, generator=g)
    ctx = torch.randn(2, 5, cfg.context_dim, generator=g) if cfg.context_dim else None
    vec = torch.randn(2, cfg.vector_dim, generator=g) if getattr(cfg, "vector_dim", None) else None
    return x, torch.tensor([10.0, 500.0]), Cond(context=ctx, vector=vec)


def _state(net) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("kind", ["unet", "dit", "mmdit"])
def test_merge_unmerge_exact_on_every_family(kind):
    torch.manual_seed(0)
    net = {"unet": lambda: UNet(UNET_PRESETS["shapes-tiny"]),
           "dit": lambda: DiT(DIT_PRESETS["dit-tiny"]),
           "mmdit": lambda: MMDiT(MMDIT_PRESETS["mmdit-tiny"])}[kind]().eval()
    with torch.no_grad():  # the transformers' zero-initialized outputs would hide every change
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, sigma, cond = _inputs(net)
    before, y0 = _state(net), net(x, sigma, cond)
    targets = ("attention", "conv") if kind == "unet" else ("attention",)
    lora = LoRA.create(net, rank=4, alpha=2, targets=targets)
    lora.attach(net)
    assert torch.equal(net(x, sigma, cond), y0)  # up = 0 at the start: the identity
    _randomize(lora)
    assert list(net.state_dict()) == list(before)  # the model's own state is unchanged by an attached LoRA
    y1 = net(x, sigma, cond)
    assert (y1 - y0).abs().max() > 1e-2
    lora.merge()
    assert any(not torch.equal(net.state_dict()[k], before[k]) for k in before)
    torch.testing.assert_close(net(x, sigma, cond), y1, atol=1e-5, rtol=1e-5)  # merged = unmerged forward
    lora.unmerge()
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)  # bit for bit
    lora.detach()
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in net.modules())
    assert torch.equal(net(x, sigma, cond), y0)


def test_attached_lora_holds_only_its_adapters():
    """Attached, a LoRA's state_dict and parameters are still its adapters alone (checkpoints, optimizer, EMA)."""
    net = _unet()
    lora = LoRA.create(net, rank=2)
    keys, n = set(lora.state_dict()), sum(p.numel() for p in lora.parameters())
    lora.attach(net)
    assert set(lora.state_dict()) == keys and sum(p.numel() for p in lora.parameters()) == n
    assert all(k.startswith("layers.") for k in keys)


def test_several_loras_weights_and_switches():
    net = _unet()
    x, sigma, cond = _inputs(net)
    before, y0 = _state(net), net(x, sigma, cond)
    a = _randomize(LoRA.create(net, rank=4, targets=("attention", "conv"), name="a"), seed=1).attach(net)
    b = _randomize(LoRA.create(net, rank=2, alpha=4, targets=("to_k", "to_v"), name="b"), seed=2).attach(net)
    a.weight, b.weight = 0.5, -1.5
    both = net(x, sigma, cond)
    # The same sum merged into a copy's weights by hand: W + 0.5 * (alpha/r) dA + (-1.5) * (4/2) dB.
    for lora in (a, b):
        lora.detach()
    ref = copy.deepcopy(net)
    with torch.no_grad():
        mods = dict(ref.named_modules())
        for lora, w in ((a, 0.5), (b, -1.5)):
            for n, layer in zip(lora.names, lora.layers):
                mods[n].weight += layer.delta() * layer.ratio * w
    for lora in (a, b):
        lora.attach(net)
    torch.testing.assert_close(both, ref(x, sigma, cond), atol=1e-5, rtol=1e-5)
    b.enabled = False
    a_only = net(x, sigma, cond)
    b.merge()  # merged while disabled: no change
    assert torch.equal(net(x, sigma, cond), a_only)
    b.enabled = True  # re-merged from the kept original
    torch.testing.assert_close(net(x, sigma, cond), both, atol=1e-5, rtol=1e-5)
    a.merge()
    a.weight = 0.0  # a merged LoRA's weight change re-merges: only b's part is left
    b.unmerge()
    b.enabled = False
    torch.testing.assert_close(net(x, sigma, cond), y0, atol=1e-5, rtol=1e-5)
    a.unmerge()
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)
    a.detach(), b.detach()
    assert torch.equal(net(x, sigma, cond), y0)


def test_own_format_round_trip_and_family_check(tmp_path):
    net = _unet()
    x, sigma, cond = _inputs(net)
    lora = _randomize(LoRA.create(net, rank=4, alpha=8, targets=("attention", "conv"), family="unet"))
    lora.layers[0].alpha = 3.0  # a layer of its own alpha is kept too
    lora.attach(net)
    y = net(x, sigma, cond)
    lora.detach()
    path = save_lora(tmp_path / "mine.safetensors", lora, {"base_model": "shapes-tiny"})
    meta = read_lora_metadata(path)
    assert meta["rank"] == 4 and meta["alpha"] == 8 and meta["family"] == "unet" and "to_q" in meta["targets"]
    assert meta["base_model"] == "shapes-tiny"
    loaded = lora_for_model(path, net).attach()
    assert loaded.format == "latentdiff"
    torch.testing.assert_close(net(x, sigma, cond), y, atol=0, rtol=0)
    loaded.detach()
    torch.manual_seed(0)
    dit = DiT(DIT_PRESETS["dit-tiny"])
    with pytest.raises(ValueError, match="LoRA for a unet denoiser; this model's denoiser is a dit"):
        lora_for_model(path, dit)


def test_refusals_name_the_keys_and_change_nothing(tmp_path):
    net = _unet()
    before = _state(net)
    lora = _randomize(LoRA.create(net, rank=4))
    state = lora.to_state("unet.")
    state["unet.down_blocks.7.attentions.0.to_q.lora_A.weight"] = torch.zeros(4, 8)
    state["unet.down_blocks.7.attentions.0.to_q.lora_B.weight"] = torch.zeros(8, 4)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"1 LoRA layers match no layer.*down_blocks\.7\.attentions\.0\.to_q"):
        lora_for_model(tmp_path / "extra.safetensors", net)
    # Another architecture: the same names, other widths.
    wide = {k: torch.cat([v, v], dim=1) if k.endswith("lora_A.weight") else v for k, v in lora.to_state("unet.").items()}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="made for another architecture"):
        lora_for_model(tmp_path / "wide.safetensors", net)
    kohya_te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)}
    save_file(kohya_te, tmp_path / "te.safetensors")
    from latentdiff.conditioning.text import HashedTextEncoder, TextEncoderConfig

    with pytest.raises(ValueError, match="HashedTextEncoder, not a CLIP text encoder"):
        lora_for_model(tmp_path / "te.safetensors", net, HashedTextEncoder(TextEncoderConfig(dim=32, num_layers=1)))
    lyco = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}
    save_file(lyco, tmp_path / "loha.safetensors")
    with pytest.raises(ValueError, match="LoHa"):
        lora_for_model(tmp_path / "loha.safetensors", net)
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)
    assert not any(isinstance(m, (LoRALinear, LoRAConv2d)) for m in net.modules())


def test_kohya_sdxl_names_in_the_original_layout(tmp_path):
    """SDXL kohya files name U-Net layers in the original layout (``lora_unet_input_blocks_4_1_...``): mapped through
    the key-map table onto the same layers as the diffusers-named file."""
    from latentdiff.interop.keymaps import unet_rules
    from latentdiff.models.unet import UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                          head_dim=8, context_dim=32, norm_groups=8, transformer_depth=(1, 2))).eval()
    x, sigma, cond = _inputs(net)
    lora = _randomize(LoRA.create(net, rank=2, targets=("attention", "conv"))).attach(net)
    expected = net(x, sigma, cond)
    lora.detach()
    original = {r.ours[0].removesuffix(".weight"): r.original.removesuffix(".weight") for r in unet_rules(net.config)}
    kohya = {}
    for n, layer in zip(lora.names, lora.layers):
        name = "lora_unet_" + original[n].replace(".", "_")
        kohya.update({f"{name}.lora_down.weight": layer.down.detach(), f"{name}.lora_up.weight": layer.up.detach(),
                      f"{name}.alpha": torch.tensor(2.0)})
    assert any("input_blocks" in k for k in kohya) and any("output_blocks" in k for k in kohya)
    save_file(kohya, tmp_path / "sdxl_kohya.safetensors")
    loaded = lora_for_model(tmp_path / "sdxl_kohya.safetensors", net).attach()
    assert sorted(loaded.loras[0].names) == sorted(lora.names)
    torch.testing.assert_close(net(x, sigma, cond), expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------- parity with diffusers

KW = {"num_inference_steps": 4, "guidance_scale": 3.0, "height": 16, "width": 16}
OURS = {"steps": 4, "sampler": "euler", "schedule": "leading", "guidance": 3.0, "seed": 7, "height": 16, "width": 16,
        "output": "pt"}
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny diffusers SD pipeline, a PEFT LoRA for its U-Net (r 4, alpha 8: a scale of 2; random B) saved by
    diffusers, and the image diffusers makes with it and without it."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers builds the reference pipeline")
    pytest.importorskip("peft", reason="peft makes the reference LoRA")
    from interop_tiny import sd_with_peft_lora

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    folder, path, unet_state = sd_with_peft_lora(root, ["to_q", "to_k", "to_v", "to_out.0"])
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    base = ref(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", **KW).images
    ref.load_lora_weights(str(path))
    expected = ref(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", **KW).images
    assert np.abs(expected - base).max() > 0.1  # the LoRA changes the image a lot
    yield {"folder": folder, "root": root, "peft": path, "state": {f"unet.{k}": v for k, v in unet_state.items()},
           "base": base, "expected": expected, "diffusers": diffusers}
    torch.set_num_threads(n)


def _images01(pt: torch.Tensor) -> np.ndarray:
    return (pt / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _ours(sd, path, weight=1.0):
    pipe = latentdiff.load(sd["folder"])
    lora = pipe.load_lora(path, weight)
    return pipe, lora, _images01(pipe.generate(PROMPT, **OURS))


def _within_1_255(got, expected):
    diff = np.abs(got - expected).max()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"


def test_peft_lora_matches_diffusers(sd):
    pipe, lora, got = _ours(sd, sd["peft"])
    assert lora.format == "diffusers" and sum(len(x.names) for x in lora.loras) == 32
    _within_1_255(got, sd["expected"])
    lora.merge()  # merged into the weights: the same image
    _within_1_255(_images01(pipe.generate(PROMPT, **OURS)), sd["expected"])
    pipe.unload_loras()  # detached: the model's own image again
    _within_1_255(_images01(pipe.generate(PROMPT, **OURS)), sd["base"])


def test_kohya_lora_matches_diffusers(sd, tmp_path):
    """The same adapters under kohya's sd-scripts names (``lora_unet_<path with _>``, ``lora_down`` / ``lora_up``,
    ``.alpha`` = 8), loaded by diffusers (its kohya conversion) and by us."""
    kohya = {}
    for k, v in sd["state"].items():
        layer, ab = k.removeprefix("unet.").rsplit(".lora_", 1)
        name = "lora_unet_" + layer.replace(".", "_")
        kohya[f"{name}.{'lora_down' if ab.startswith('A') else 'lora_up'}.weight"] = v.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, path)
    ref = sd["diffusers"].StableDiffusionPipeline.from_pretrained(sd["folder"], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    expected = ref(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", **KW).images
    _within_1_255(expected, sd["expected"])  # diffusers reads it as the same LoRA
    _, lora, got = _ours(sd, path)
    assert lora.format == "kohya"
    _within_1_255(got, expected)


@pytest.mark.parametrize("layout", ["lora.down", "processor"])
def test_older_diffusers_layouts(sd, tmp_path, layout):
    """diffusers' older LoRA files (``...to_q.lora.down.weight``; ``...attn1.processor.to_q_lora.down.weight``)
    with the alphas as keys: the same LoRA."""
    old = {}
    for k, v in sd["state"].items():
        layer, ab = k.rsplit(".lora_", 1)
        du = "down" if ab.startswith("A") else "up"
        if layout == "lora.down":
            old[f"{layer}.lora.{du}.weight"] = v
            old[f"{layer}.alpha"] = torch.tensor(8.0)
        else:
            parent, proj = layer.rsplit(".to_", 1)
            proj = "out" if proj == "out.0" else proj
            old[f"{parent}.processor.to_{proj}_lora.{du}.weight"] = v
    path = tmp_path / "old.safetensors"
    save_file(old, path)
    pipe = latentdiff.load(sd["folder"])
    pipe.load_lora(path, weight=2.0 if layout == "processor" else 1.0)  # no alpha: scale 1, so weight 2
    _within_1_255(_images01(pipe.generate(PROMPT, **OURS)), sd["expected"])


def test_text_encoder_lora_matches_peft(sd, tmp_path):
    """Text-encoder layers (diffusers' ``text_encoder.`` keys, and kohya's ``lora_te_``) load onto our CLIP
    encoder: its conditioning equals the PEFT-adapted transformers model's."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    text = CLIPTextModel.from_pretrained(sd["folder"] / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(sd["folder"] / "tokenizer")
    ids = tok([PROMPT], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    torch.manual_seed(3)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "out_proj"],
                                                 init_lora_weights=False), text)
    with torch.no_grad():
        expected = text(ids).last_hidden_state
    state = get_peft_model_state_dict(text)
    diffusers_keys = {f"text_encoder.{k}": v for k, v in state.items()}
    diffusers_keys.update({f"text_encoder.{k.rsplit('.lora_', 1)[0]}.alpha": torch.tensor(4.0) for k in state})
    kohya = {}
    for k, v in state.items():
        layer, ab = k.rsplit(".lora_", 1)
        name = "lora_te_" + ("text_model." + layer.removeprefix("text_model.")).replace(".", "_")
        kohya[f"{name}.{'lora_down' if ab.startswith('A') else 'lora_up'}.weight"] = v
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    for name, tensors in (("diffusers", diffusers_keys), ("kohya", kohya)):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        pipe = latentdiff.load(sd["folder"])
        lora = pipe.load_lora(tmp_path / f"{name}.safetensors")
        assert [x.name.split(":")[1] for x in lora.loras] == ["text_encoder"]
        with torch.no_grad():
            got = pipe.text_encoder([PROMPT]).context
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_lora_for_another_model_refused_before_any_change(sd, tmp_path):
    """A LoRA of other widths (another architecture) and one naming layers this model lacks: refused, named,
    and the pipeline still makes its own image."""
    wide = {k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in sd["state"].items()}
    save_file(wide, tmp_path / "wide.safetensors")
    pipe = latentdiff.load(sd["folder"])
    with pytest.raises(ValueError, match="another architecture"):
        pipe.load_lora(tmp_path / "wide.safetensors")
    sdxl_only = dict(sd["state"])
    sdxl_only["unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(4, 16)
    sdxl_only["unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"] = torch.zeros(16, 4)
    save_file(sdxl_only, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"match no layer.*down_blocks\.2\.attentions\.0"):
        pipe.load_lora(tmp_path / "other.safetensors")
    assert not pipe.loras
    _within_1_255(_images01(pipe.generate(PROMPT, **OURS)), sd["base"])


# ------------------------------------------------------------------------------- training and the command line


def test_train_lora_on_the_default_model_and_generate_with_it(tmp_path, capsys):
    """train-lora on the bundled model (3 steps on a tiny cache of its own autoencoder) writes a LoRA file whose
    adapters are the run's, which generate --lora FILE:WEIGHT attaches; the model's own weights stay as they were."""
    from latentdiff.cli import main
    from latentdiff.default import verify
    from latentdiff.images import read_parameters

    model = verify()
    main(["cache", "--autoencoder", str(model / "autoencoder"), "--out", str(tmp_path / "cache"),
          "--set", "num_images=8", "--set", "image_size=32"])
    main(["train-lora", "--preset", "shapes-test", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
          "--set", "lr=0.05"])
    path = tmp_path / "run" / "lora.safetensors"
    assert str(path) in capsys.readouterr().out
    meta = read_lora_metadata(path)
    assert meta["rank"] == 2 and meta["family"] == "unet" and meta["base_model"] == "default"
    pipe = latentdiff.load()
    before = _state(pipe.denoiser.network)
    plain = pipe.generate("a large red circle on the left", steps=4, seed=1, output="np")
    lora = pipe.load_lora(path)
    assert all(layer.up.abs().max() > 0 for x in lora.loras for layer in x.layers)  # trained away from 0
    tuned = pipe.generate("a large red circle on the left", steps=4, seed=1, output="np")
    assert not np.array_equal(plain, tuned)
    pipe.unload_loras()
    assert all(torch.equal(pipe.denoiser.network.state_dict()[k], before[k]) for k in before)
    out = tmp_path / "img.png"
    main(["generate", "a large red circle on the left", "--steps", "4", "--seed", "1", "--lora", f"{path}:0.5",
          "-o", str(out)])
    assert read_parameters(out)["loras"] == [f"{path.resolve()}:0.5"]
    with pytest.raises(SystemExit):  # a missing file: one error line before the model loads
        main(["generate", "x", "--lora", str(tmp_path / "nope.safetensors:0.5"), "-o", str(tmp_path / "x.png")])
    assert "no file" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
