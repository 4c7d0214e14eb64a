"""IP-Adapter (Ye et al. 2023): decoupled cross-attention against its formula, the layer order against diffusers',
the keys and values in Cond, bad inputs; files, the image encoder, the pipeline and parity with diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentdiff.models.ip_adapter import IPAdapter
from latentdiff.models.layers import Attention
from latentdiff.models.unet import StepCache, UNet, UNetConfig
from latentdiff.types import Cond

TINY = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(0, 1), num_heads=2, context_dim=8, transformer_depth=(1, 2), norm_groups=8)


def _randomized(adapter: IPAdapter, seed: int = 0) -> IPAdapter:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)
    return adapter


@pytest.fixture(scope="module")
def unet_and_adapter():
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    return unet, _randomized(IPAdapter.for_unet(unet, image_embed_dim=6, tokens=3))


def _inputs(B: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0][:B]),
            Cond(context=torch.randn(B, 5, 8, generator=g)), torch.randn(B, 6, generator=g))


def test_decoupled_attention_is_the_formula():
    """attn(x, c) + softmax(q k_ip^T / sqrt(d)) v_ip per head, before to_out (IP-Adapter's eq. 5)."""
    torch.manual_seed(0)
    attn = Attention(12, 7, heads=3, head_dim=4).eval()
    x, c = torch.randn(2, 5, 12), torch.randn(2, 6, 7)
    k_ip, v_ip = torch.randn(2, 4, 12), torch.randn(2, 4, 12)
    got = attn(x, c, image_kv=(k_ip, v_ip))

    def heads(t):  # (B, L, 12) -> (B, 3, L, 4)
        return t.reshape(t.shape[0], t.shape[1], 3, 4).transpose(1, 2)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(c)), heads(attn.to_v(c))
    text = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), -1) @ v
    image = torch.softmax(q @ heads(k_ip).transpose(-1, -2) / math.sqrt(4), -1) @ heads(v_ip)
    want = attn.to_out[0]((text + image).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cross_attention_order_is_diffusers_attn_processors_order():
    """Down path, up path, then the middle: how diffusers (and IP-Adapter files) number the layers."""
    diffusers = pytest.importorskip("diffusers")
    from latentdiff.interop.diffusers_folder import unet_config_from_diffusers

    ref = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
        transformer_layers_per_block=(1, 2))
    ours = UNet(unet_config_from_diffusers(dict(ref.config)))
    want = [n.removesuffix(".processor") for n in ref.attn_processors if "attn2" in n]
    assert [name for name, _ in ours.cross_attentions()] == want
    assert want[-1].startswith("mid_block") and any(n.startswith("up_blocks") for n in want[:-1])


def test_scale_zero_is_the_plain_unet_and_the_values_carry_the_scale(unet_and_adapter):
    unet, adapter = unet_and_adapter
    x, c_noise, cond, embeds = _inputs()
    plain = unet(x, c_noise, cond)
    kv0 = adapter(embeds, 0.0)
    assert torch.equal(unet(x, c_noise, Cond(context=cond.context, image_kv=kv0)), plain)
    kv1, kv_half = adapter(embeds, 1.0), adapter(embeds, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(kv1[0::2], kv_half[0::2]))  # keys do not depend on the scale
    assert all(torch.allclose(0.5 * a, b) for a, b in zip(kv1[1::2], kv_half[1::2]))
    with_image = unet(x, c_noise, Cond(context=cond.context, image_kv=kv1))
    assert (with_image - plain).abs().max() > 1e-3
    # one scale per row: row 0 at 0 is the plain row
    per_row = unet(x, c_noise, Cond(context=cond.context, image_kv=adapter(embeds, torch.tensor([0.0, 1.0]))))
    assert torch.equal(per_row[0], plain[0]) and torch.allclose(per_row[1], with_image[1], atol=1e-6)


def test_image_kv_in_cond_batches_and_reaches_every_path(unet_and_adapter):
    """Cond.cat / map / repeat carry the keys and values; DeepCache's and gradient checkpointing's paths use them."""
    unet, adapter = unet_and_adapter
    x, c_noise, cond, embeds = _inputs()
    a = Cond(context=cond.context, image_kv=adapter(embeds))
    both = a.cat(Cond(context=cond.context, image_kv=adapter(torch.zeros_like(embeds))))
    assert len(both.image_kv) == len(a.image_kv) and both.image_kv[0].shape[0] == 4
    assert a.repeat(3).image_kv[1].shape[0] == 6
    with pytest.raises(ValueError, match="image_kv"):
        a.cat(Cond(context=cond.context))
    full = unet(x, c_noise, a)
    cached = StepCache(unet, 1)(x, c_noise, a)
    assert torch.allclose(cached, full, atol=1e-6)
    ckpt = UNet(TINY)
    ckpt.load_state_dict(unet.state_dict())
    ckpt.gradient_checkpointing = True
    ckpt.train()
    adapter.zero_grad()
    out = ckpt(x, c_noise, Cond(context=cond.context, image_kv=adapter(embeds)))
    assert torch.allclose(out, full, atol=1e-5)
    out.square().mean().backward()  # the adapter trains through the frozen U-Net
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_keys_and_values_and_adapters_are_refused(unet_and_adapter):
    unet, adapter = unet_and_adapter
    x, c_noise, cond, embeds = _inputs()
    kv = adapter(embeds)
    with pytest.raises(ValueError, match="needs a key and a value for each of its 11 cross-attention"):
        unet(x, c_noise, Cond(context=cond.context, image_kv=kv[:-2]))
    bad = list(kv)
    bad[3] = bad[3][..., :5]
    with pytest.raises(ValueError, match=r"image_kv\[3\] has shape \(2, 3, 5\).*attn2 needs \(2, N, 32\)"):
        unet(x, c_noise, Cond(context=cond.context, image_kv=bad))
    with pytest.raises(ValueError, match="image embeddings have shape"):
        adapter(torch.zeros(2, 7))
    other = UNet(UNetConfig(**{**TINY.__dict__, "transformer_depth": 1}))
    with pytest.raises(ValueError, match="has 11 layers, this U-Net 7 cross-attention layers"):
        adapter.check_unet(other)
    with pytest.raises(ValueError, match="no cross-attention"):
        IPAdapter.for_unet(UNet(UNetConfig(**{**TINY.__dict__, "context_dim": None})), 6)


# ----------------------------------------------------------------------------------------- files, encoder, pipeline


def _ip_state(unet, image_embed_dim: int, tokens: int = 4, seed: int = 3, plus: bool = False) -> dict:
    """A random IP-Adapter state dict of the tencent-ailab layout for a diffusers U-Net (odd keys over attn2); with
    ``plus`` a Resampler (64-wide queries: one head, four blocks) reading hidden states of width ``image_embed_dim``."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    D = unet.config.cross_attention_dim
    proj = {"proj.weight": rnd(tokens * D, image_embed_dim), "proj.bias": rnd(tokens * D),
            "norm.weight": 1 + rnd(D), "norm.bias": rnd(D)}
    if plus:
        C = 64
        proj = {"latents": rnd(1, tokens, C), "proj_in.weight": rnd(C, image_embed_dim), "proj_in.bias": rnd(C),
                "proj_out.weight": rnd(D, C), "proj_out.bias": rnd(D), "norm_out.weight": 1 + rnd(D),
                "norm_out.bias": rnd(D)}
        for i in range(4):  # diffusers builds 4 blocks whatever the file holds
            proj.update({f"layers.{i}.0.norm1.weight": 1 + rnd(C), f"layers.{i}.0.norm1.bias": rnd(C),
                         f"layers.{i}.0.norm2.weight": 1 + rnd(C), f"layers.{i}.0.norm2.bias": rnd(C),
                         f"layers.{i}.0.to_q.weight": rnd(C, C), f"layers.{i}.0.to_kv.weight": rnd(2 * C, C),
                         f"layers.{i}.0.to_out.weight": rnd(C, C), f"layers.{i}.1.0.weight": 1 + rnd(C),
                         f"layers.{i}.1.0.bias": rnd(C), f"layers.{i}.1.1.weight": rnd(4 * C, C),
                         f"layers.{i}.1.3.weight": rnd(C, 4 * C)})
    ip, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            width = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            ip[f"{key}.to_k_ip.weight"], ip[f"{key}.to_v_ip.weight"] = rnd(width, D), rnd(width, D)
            key += 2
    return {"image_proj": proj, "ip_adapter": ip}


@pytest.fixture(scope="module")
def sd_with_ip_adapter(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers", reason="diffusers builds the reference pipeline")
    pytest.importorskip("transformers", reason="the image encoder is a transformers CLIP vision model")
    from interop_tiny import one_thread, tiny_sd_pipeline
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    threads = one_thread()
    next(threads)
    root = tmp_path_factory.mktemp("sdip")
    folder = tiny_sd_pipeline(root / "pipe")
    torch.manual_seed(4)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        projection_dim=16)).eval()
    encoder.save_pretrained(root / "encoder")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, image_encoder=encoder)
    state = _ip_state(ref.unet, 16)
    torch.save(state, root / "ip-adapter.bin")
    save_file({f"{part}.{k}": v for part, d in state.items() for k, v in d.items()}, root / "ip-adapter.safetensors")
    ref.load_ip_adapter(str(root), subfolder="", weight_name="ip-adapter.bin", image_encoder_folder=None)
    ref.set_progress_bar_config(disable=True)
    torch.save(_ip_state(ref.unet, 32, seed=5, plus=True), root / "ip-adapter-plus.bin")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    yield folder, ref, root, image
    next(threads, None)


def test_clip_preprocessing_equals_transformers(sd_with_ip_adapter):
    from transformers import CLIPImageProcessor

    from latentdiff.conditioning.image_encoder import clip_preprocess

    *_, image = sd_with_ip_adapter
    for size in (32, 24):
        want = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})(
            image, return_tensors="pt").pixel_values
        got = clip_preprocess(image, size)
        assert got.shape == want.shape == (1, 3, size, size)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _images01(pt: torch.Tensor) -> np.ndarray:
    return (pt / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


SETTINGS = {"steps": 4, "sampler": "euler", "schedule": "leading", "guidance": 3.0, "seed": 7, "height": 16,
            "width": 16, "output": "pt"}


def _diffusers_image(ref, image, scale: float) -> np.ndarray:
    """diffusers' image for SETTINGS, the image prompt through our CLIP preprocessing."""
    from latentdiff.conditioning.image_encoder import clip_preprocess

    ref.set_ip_adapter_scale(scale)
    return ref("a red circle", ip_adapter_image=clip_preprocess(image, 32), num_inference_steps=4,
               guidance_scale=3.0, generator=torch.Generator().manual_seed(7), output_type="np").images


def _check_parity(pipe, expected: np.ndarray, image, scale: float, what: str) -> torch.Tensor:
    """Ours within 1/255 of diffusers' image, and visibly apart from ours without the image prompt (returned)."""
    got = pipe.generate("a red circle", ip_image=image, ip_scale=scale, **SETTINGS)
    diff = np.abs(_images01(got) - expected).max()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"
    print(f"max pixel difference to diffusers ({what}): {diff * 255:.4f}/255")
    plain = pipe.generate("a red circle", **SETTINGS)
    assert np.abs(_images01(plain) - expected).max() > 0.02  # the image prompt matters at this size
    return plain


@pytest.mark.parametrize("weights", ["ip-adapter.safetensors", "ip-adapter.bin"])
def test_ip_adapter_matches_diffusers(sd_with_ip_adapter, weights):
    """Same seed, sampler, prompt and image prompt as diffusers' StableDiffusionPipeline with load_ip_adapter: the
    images agree to 1/255 (the image goes through our CLIP preprocessing for both)."""
    import latentdiff

    folder, ref, root, image = sd_with_ip_adapter
    expected = _diffusers_image(ref, image, 0.6)
    pipe = latentdiff.load(folder)
    pipe.load_ip_adapter(root / weights, image_encoder=root / "encoder")
    plain = _check_parity(pipe, expected, image, 0.6, weights)
    zero = pipe.generate("a red circle", ip_image=image, ip_scale=0.0, **SETTINGS)
    assert torch.equal(zero, plain)  # scale 0 adds exactly nothing


def test_ip_adapter_plus_matches_diffusers(sd_with_ip_adapter):
    """IP-Adapter plus (a Resampler on the CLIP encoder's penultimate hidden states; the uncond branch: those of a
    zero image) against diffusers' own loading of the same file, to 1/255."""
    import diffusers

    import latentdiff

    folder, ref, root, image = sd_with_ip_adapter
    plus = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             image_encoder=ref.image_encoder)
    plus.load_ip_adapter(str(root), subfolder="", weight_name="ip-adapter-plus.bin", image_encoder_folder=None,
                         low_cpu_mem_usage=False)
    plus.set_progress_bar_config(disable=True)
    expected = _diffusers_image(plus, image, 0.8)
    pipe = latentdiff.load(folder)
    adapter = pipe.load_ip_adapter(root / "ip-adapter-plus.bin", image_encoder=root / "encoder")
    assert adapter.takes_hidden_states and adapter.config.tokens == 4 and adapter.config.depth == 4
    _check_parity(pipe, expected, image, 0.8, "plus")


def test_ip_adapter_bad_input(sd_with_ip_adapter, tmp_path):
    import latentdiff
    from latentdiff.interop.ip_adapter import ip_adapter_for_unet, save_ip_adapter

    folder, _, root, image = sd_with_ip_adapter
    pipe = latentdiff.load(folder)
    with pytest.raises(ValueError, match="needs the image encoder"):
        pipe.load_ip_adapter(root / "ip-adapter.safetensors")
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        pipe.generate("a", ip_image=image, steps=1, height=16, width=16)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pipe.load_ip_adapter(root / "ip-adapter.safetensors", image_encoder=tmp_path)
    state = torch.load(root / "ip-adapter.bin", weights_only=True)
    state["ip_adapter"]["3.to_v_ip.weight"] = state["ip_adapter"]["3.to_v_ip.weight"][:, :8]
    torch.save(state, tmp_path / "narrow.bin")
    with pytest.raises(ValueError, match=r"ip_adapter key 3.to_v_ip.weight has shape \(16, 8\), but up_blocks.1"
                                         r".attentions.0.transformer_blocks.0.attn2 needs \(16, 32\)"):
        pipe.load_ip_adapter(tmp_path / "narrow.bin", image_encoder=root / "encoder")
    del state["ip_adapter"]["5.to_k_ip.weight"]
    torch.save(state, tmp_path / "short.bin")
    with pytest.raises(ValueError, match=r"missing \['5.to_k_ip.weight'\]"):
        pipe.load_ip_adapter(tmp_path / "short.bin", image_encoder=root / "encoder")
    torch.save({"image_proj": {"latents": torch.zeros(1, 16, 32)}, "ip_adapter": state["ip_adapter"]},
               tmp_path / "plus.bin")
    with pytest.raises(ValueError, match=r"plus Resampler needs image_proj \['proj_in.weight'"):
        pipe.load_ip_adapter(tmp_path / "plus.bin", image_encoder=root / "encoder")
    adapter = ip_adapter_for_unet(root / "ip-adapter.bin", pipe.denoiser.network)
    assert pipe.ip_adapter is None  # nothing was loaded by the refused calls
    wide = IPAdapter.for_unet(pipe.denoiser.network, 20)
    with pytest.raises(ValueError, match="the image encoder makes 16-wide embeddings, the IP-Adapter takes 20"):
        pipe.load_ip_adapter(wide, image_encoder=root / "encoder")
    # our files round-trip: save -> strict load -> the same tensors
    save_ip_adapter(adapter, tmp_path / "ours.safetensors")
    again = ip_adapter_for_unet(tmp_path / "ours.safetensors", pipe.denoiser.network)
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), again.state_dict().values()))


def test_cli_generate_with_an_image_prompt(sd_with_ip_adapter, tmp_path, capsys):
    from latentdiff.cli import main

    folder, _, root, image = sd_with_ip_adapter
    image.save(tmp_path / "ref.png")
    base = ["generate", "a red circle", "--model", str(folder), "--steps", "2", "--height", "16", "--width", "16"]
    with pytest.raises(SystemExit):
        main([*base, "--ip-image", str(tmp_path / "ref.png"), "-o", str(tmp_path / "x.png")])
    assert "missing --ip-adapter" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    main([*base, "--ip-image", str(tmp_path / "ref.png"), "--ip-scale", "0.6", "--ip-adapter",
          str(root / "ip-adapter.safetensors"), "--image-encoder", str(root / "encoder"), "-o", str(tmp_path / "o.png")])
    from latentdiff.images import read_parameters

    params = read_parameters(tmp_path / "o.png")
    assert params["ip_scale"] == 0.6 and params["ip_image"].endswith("ref.png")


# ----------------------------------------------------------------------------------------- training on our model


def test_train_ip_adapter_on_the_default_model_and_generate_with_it(tmp_path, capsys):
    """train-ip-adapter on the bundled model (3 steps on a tiny cache of its own autoencoder) writes one file with
    the adapter and its built-in image encoder, which generate --ip-image / --ip-adapter loads without an encoder
    folder; the model's own weights are not touched."""
    import latentdiff
    from latentdiff.cli import main
    from latentdiff.default import verify
    from latentdiff.images import read_parameters
    from latentdiff.interop.ip_adapter import builtin_image_encoder

    model = verify()
    main(["cache", "--autoencoder", str(model / "autoencoder"), "--out", str(tmp_path / "cache"),
          "--set", "num_images=8", "--set", "image_size=32"])
    main(["train-ip-adapter", "--preset", "shapes-test", "--cache", str(tmp_path / "cache"), "--out",
          str(tmp_path / "run"), "--set", "lr=0.05"])
    path = tmp_path / "run" / "ip_adapter.safetensors"
    assert str(path) in capsys.readouterr().out
    encoder = builtin_image_encoder(path)
    assert encoder.embed_dim == 16 and encoder.config.channels == (8, 8)
    pipe = latentdiff.load()
    before = {k: v.clone() for k, v in pipe.denoiser.network.state_dict().items()}
    ref = np.zeros((32, 32, 3), np.uint8)
    ref[8:24, 8:24] = (220, 30, 30)
    plain = pipe.generate("", steps=4, seed=1, output="np")
    adapter = pipe.load_ip_adapter(path)
    assert adapter.config.tokens == 2 and pipe.image_encoder.embed_dim == 16
    prompted = pipe.generate("", steps=4, seed=1, output="np", ip_image=ref)
    assert not np.array_equal(plain, prompted)
    assert np.array_equal(plain, pipe.generate("", steps=4, seed=1, output="np", ip_image=ref, ip_scale=0.0))
    other = np.zeros_like(ref)
    other[4:12, 20:28] = (30, 30, 220)
    two = pipe.generate(["", ""], steps=4, seed=1, output="np", ip_image=[ref, other])  # one image prompt per prompt
    assert np.abs(two[0].astype(int) - prompted[0]).max() <= 1 and not np.array_equal(two[0], two[1])
    with pytest.raises(ValueError, match="3 image prompts for 2 prompts"):
        pipe.generate(["", ""], steps=4, ip_image=[ref, ref, ref])
    assert all(torch.equal(pipe.denoiser.network.state_dict()[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="IP-Adapters run in torch only"):
        pipe.to_backend("openvino")
    from PIL import Image

    Image.fromarray(ref).save(tmp_path / "ref.png")
    out = tmp_path / "img.png"
    main(["generate", "", "--steps", "4", "--ip-image", str(tmp_path / "ref.png"), "--ip-adapter", str(path),
          "--ip-scale", "0.5", "-o", str(out)])
    assert read_parameters(out)["ip_scale"] == 0.5
    with pytest.raises(SystemExit):  # sample grids need reference images: refused before any work
        main(["train-ip-adapter", "--preset", "shapes-test", "--cache", str(tmp_path / "cache"), "--out",
              str(tmp_path / "run2"), "--set", "sample_every=5"])
    assert "sample_every" in capsys.readouterr().err and not (tmp_path / "run2").exists()
