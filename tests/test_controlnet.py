"""ControlNet: the network (zero-init, shapes), the controlled denoiser (scales, several nets, start/end gating),
save/load, bad input, and parity with diffusers' StableDiffusionControlNetPipeline (one and several ControlNets,
control_guidance_start/end) on a tiny random-weight SD folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.diffusion.control import Control, ControlledDenoiser, active, step_of
from latentdiff.diffusion.denoiser import Denoiser
from latentdiff.diffusion.parameterization import make_parameterization
from latentdiff.diffusion.schedules import karras_sigmas
from latentdiff.models.controlnet import (
    ControlNet,
    check_compatible,
    for_unet,
    load_controlnet,
    save_controlnet,
)
from latentdiff.models.unet import UNet, UNetConfig
from latentdiff.types import Cond

TINY = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), num_heads=2, context_dim=8, vector_dim=8, norm_groups=8)


def _randomized(net: ControlNet, seed: int = 0, std: float = 0.2) -> ControlNet:
    """A ControlNet whose zero-initialized convolutions hold random weights (a trained one, as far as tests go)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    unet = UNet(TINY).eval()
    denoiser = Denoiser(unet, make_parameterization("edm"))
    x = torch.randn(2, 4, 8, 8)
    cond = Cond(context=torch.randn(2, 3, 8), vector=torch.randn(2, 8))
    image = torch.rand(1, 3, 32, 32)
    return denoiser, x, cond, image


def test_fresh_controlnet_changes_nothing_and_residuals_have_the_skip_shapes(parts):
    denoiser, x, cond, image = parts
    net = ControlNet(for_unet(TINY, factor=4)).eval()
    sigma = torch.full((2,), 1.5)
    with torch.no_grad():
        residuals = net(x, torch.zeros(2), cond, image.expand(2, -1, -1, -1))
        assert [tuple(r.shape[1:]) for r in residuals] == [(16, 8, 8), (16, 8, 8), (16, 4, 4), (32, 4, 4),
                                                           (32, 4, 4)]
        assert all(bool((r == 0).all()) for r in residuals)
        controlled = ControlledDenoiser(denoiser, [Control(net, image)])
        assert torch.equal(controlled(x, sigma, cond), denoiser(x, sigma, cond))  # exactly, zero-init


def test_scale_zero_is_no_control_and_scales_are_linear(parts):
    denoiser, x, cond, image = parts
    net = _randomized(ControlNet(for_unet(TINY, factor=4)).eval())
    sigma = torch.full((2,), 1.5)
    with torch.no_grad():
        plain = denoiser(x, sigma, cond)
        assert torch.equal(ControlledDenoiser(denoiser, [Control(net, image, scale=0.0)])(x, sigma, cond), plain)
        one = ControlledDenoiser(denoiser, [Control(net, image, scale=1.0)])(x, sigma, cond)
        assert (one - plain).abs().max() > 1e-3
        # Two nets at 0.5 and 0.7 = one net's residuals times 1.2 (the sum of scaled residuals).
        two = ControlledDenoiser(denoiser, [Control(net, image, scale=0.5), Control(net, image, scale=0.7)])
        one2 = ControlledDenoiser(denoiser, [Control(net, image, scale=1.2)])
        torch.testing.assert_close(two(x, sigma, cond), one2(x, sigma, cond), atol=1e-5, rtol=1e-5)


def test_start_end_gating_follows_diffusers_keep():
    sigmas = karras_sigmas(10, 0.1, 10.0)
    assert [step_of(float(s), sigmas) for s in sigmas[:-1]] == list(range(10))
    assert step_of(float(sigmas[3] * 0.8 + sigmas[4] * 0.2), sigmas) == 3  # a midpoint counts as its step
    assert step_of(float("inf"), torch.cat([torch.tensor([float("inf")]), sigmas[1:]])) == 0
    c = Control(None, None, start=0.2, end=0.6)
    # diffusers: keep = 1 - (i / n < start or (i + 1) / n > end)
    assert [active(c, i, 10) for i in range(10)] == [not (i / 10 < 0.2 or (i + 1) / 10 > 0.6) for i in range(10)]
    with pytest.raises(ValueError, match="start < end"):
        Control(None, None, start=0.7, end=0.3)


def test_gated_denoiser_is_plain_outside_the_window(parts):
    denoiser, x, cond, image = parts
    net = _randomized(ControlNet(for_unet(TINY, factor=4)).eval())
    sigmas = karras_sigmas(4, 0.1, 10.0)
    controlled = ControlledDenoiser(denoiser, [Control(net, image, start=0.5, end=1.0)], sigmas)
    with torch.no_grad():
        for i, s in enumerate(sigmas[:-1]):
            sigma = torch.full((2,), float(s))
            same = torch.equal(controlled(x, sigma, cond), denoiser(x, sigma, cond))
            assert same == (i < 2), f"step {i}"


def test_save_load_round_trip_and_another_base_model(parts, tmp_path):
    _, x, cond, image = parts
    net = _randomized(ControlNet(for_unet(TINY, factor=4, control_kind="edges")).eval())
    save_controlnet(tmp_path / "cn", net)
    back, report = load_controlnet(tmp_path / "cn")
    assert report.ok and back.config == net.config and back.config.control_kind == "edges"
    with torch.no_grad():
        a = net(x, torch.zeros(2), cond, image.expand(2, -1, -1, -1))
        b = back(x, torch.zeros(2), cond, image.expand(2, -1, -1, -1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    other = UNetConfig(**{**TINY.__dict__, "model_channels": 32})
    with pytest.raises(ValueError, match="model_channels 16 vs the model's 32"):
        check_compatible(net, other)
    from latentdiff.models.dit import DiTConfig

    with pytest.raises(ValueError, match="needs a U-Net denoiser; this model's is a DiTConfig"):
        check_compatible(net, DiTConfig())
    with pytest.raises(ValueError, match="the control image has shape"):
        net(x, torch.zeros(2), cond, torch.rand(2, 3, 16, 16))


# ----------------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from _tiny import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("model") / "model")


def test_pipeline_bad_controlnets_and_control_images(tiny_pipe, tmp_path, capsys):
    pipe = latentdiff.load(tiny_pipe)
    unet = pipe.denoiser.network.config
    with pytest.raises(ValueError, match="built for another base model: model_channels 32"):
        pipe.add_controlnet(ControlNet(for_unet(UNetConfig(**{**unet.__dict__, "model_channels": 32}), 2)))
    with pytest.raises(ValueError, match="brings control images down by 4"):
        pipe.add_controlnet(ControlNet(for_unet(unet, 4)))
    with pytest.raises(FileNotFoundError, match="not a ControlNet folder"):
        pipe.add_controlnet(tmp_path / "nothing")
    assert pipe.controlnets == []
    net = _randomized(ControlNet(for_unet(unet, 2)).eval())
    pipe.add_controlnet(net, scale=1.0)
    with pytest.raises(ValueError, match="no control image given"):
        pipe.generate("a red circle", steps=2, height=16, width=16)
    with pytest.raises(ValueError, match="2 control image"):
        pipe.generate("a red circle", steps=2, height=16, width=16, control=[np.zeros((16, 16, 3), np.uint8)] * 2)
    small = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    capsys.readouterr()
    out = pipe.generate("a red circle", steps=2, height=16, width=16, control=small, output="pt", seed=1)
    assert "control image 8x8 resized to 16x16" in capsys.readouterr().err
    pipe.controlnets.clear()
    plain = pipe.generate("a red circle", steps=2, height=16, width=16, output="pt", seed=1)
    assert (out - plain).abs().max() > 1e-3  # the (randomized) ControlNet acts


# ----------------------------------------------------------------------------------------- diffusers parity

diffusers_mod = pytest.importorskip("diffusers", reason="diffusers builds the reference pipeline")


@pytest.fixture(scope="module")
def sd_with_controlnets(tmp_path_factory):
    pytest.importorskip("transformers", reason="the SD text encoders are transformers CLIP models")
    from interop_tiny import one_thread, tiny_sd_pipeline

    threads = one_thread()
    next(threads)
    root = tmp_path_factory.mktemp("sdcn")
    folder = tiny_sd_pipeline(root / "pipe")
    ref = diffusers_mod.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    nets = []
    for k in range(2):
        cn = diffusers_mod.ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(4, 8))
        torch.manual_seed(5 + k)
        with torch.no_grad():
            for name, p in cn.named_parameters():
                if name.startswith("controlnet_"):
                    p.normal_(0, 0.3)
        cn.save_pretrained(root / f"cn{k}")
        nets.append(cn)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in nets]
    yield folder, ref, nets, [root / "cn0", root / "cn1"], images
    next(threads, None)


def _images01(pt: torch.Tensor) -> np.ndarray:
    return (pt / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("case", ["one", "two", "start_end"])
def test_controlnet_matches_diffusers(sd_with_controlnets, case):
    folder, ref, nets, paths, images = sd_with_controlnets
    n = 1 if case != "two" else 2
    scales, starts, ends = [0.8, 0.6][:n], [0.0, 0.0][:n], [1.0, 1.0][:n]
    if case == "start_end":
        starts, ends = [0.25], [0.75]
    controlnet = nets[0] if n == 1 else diffusers_mod.MultiControlNetModel(nets)
    cpipe = diffusers_mod.StableDiffusionControlNetPipeline(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet, controlnet=controlnet,
        scheduler=ref.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cpipe.set_progress_bar_config(disable=True)
    one = (lambda v: v[0]) if n == 1 else (lambda v: v)
    expected = cpipe("a red circle", image=one(images[:n]), num_inference_steps=4, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(7), output_type="np",
                     controlnet_conditioning_scale=one(scales), control_guidance_start=one(starts),
                     control_guidance_end=one(ends)).images
    pipe = latentdiff.load(folder)
    for path, s, a, b in zip(paths, scales, starts, ends):
        pipe.add_controlnet(path, scale=s, start=a, end=b)
    got = pipe.generate("a red circle", steps=4, sampler="euler", schedule="leading", guidance=3.0, seed=7,
                        height=16, width=16, output="pt", control=images[:n])
    diff = np.abs(_images01(got) - expected).max()
    assert diff <= 1 / 255, f"max pixel difference {diff * 255:.2f}/255"
    pipe.controlnets.clear()
    plain = pipe.generate("a red circle", steps=4, sampler="euler", schedule="leading", guidance=3.0, seed=7,
                          height=16, width=16, output="pt")
    assert np.abs(_images01(plain) - expected).max() > 0.05  # the ControlNets matter at this size


# ----------------------------------------------------------------------------------------- condition maps


def test_condition_maps_on_a_known_scene():
    from latentdiff.data.control_maps import control_map, layout_labels, sobel_edges
    from latentdiff.data.shapes import Scene, ShapeObject, object_coverage, render, to_tensor

    scene = Scene((ShapeObject("square", "red", "large", "left"), ShapeObject("circle", "blue", "small", "right")),
                  "white")
    size, seed = 64, 3
    image = to_tensor(render(scene, size, seed))
    (_, _, square), (_, (cx, cy), circle) = object_coverage(scene, size, seed)
    inside = (torch.from_numpy(square) + torch.from_numpy(circle)) >= 0.5
    # Edges: every edge pixel lies within two pixels of an object's boundary (antialiasing, the 3x3 kernel), and
    # every pixel on the square's rim is an edge.
    edges = sobel_edges(image)
    pool = lambda m, k: torch.nn.functional.max_pool2d(m[None, None].float(), k, 1, k // 2)[0, 0] > 0
    boundary = pool(inside, 5) & pool(~inside, 5)  # within 2 pixels of both sides
    assert edges.any() and not (edges & ~boundary).any()
    square_rim = (torch.from_numpy(square) >= 0.5) & pool(~inside, 3)
    assert square_rim.sum() > 40 and edges[square_rim].all()
    # Layout: label 1 on the square, 2 on the circle, 0 elsewhere; its map paints them in the palette.
    labels = layout_labels(scene, size, seed)
    assert labels[int(cy * size), int(cx * size)] == 2 and set(np.unique(labels)) == {0, 1, 2}
    assert (labels == 1).sum() == (square >= 0.5).sum()
    rgb = control_map("layout", image, scene, seed)
    assert rgb.shape == (3, size, size) and rgb.dtype == torch.uint8
    assert tuple(rgb[:, int(cy * size), int(cx * size)].tolist()) == (255, 128, 0)
    # Depth: background 0, the large square nearer (brighter) at its centre than the small circle at its own.
    depth = control_map("depth", image, scene, seed)[0]
    assert depth[0, 0] == 0 and depth[int(cy * size), int(cx * size)] > 100
    with pytest.raises(ValueError, match="unknown control kind 'pose'"):
        control_map("pose", image, scene, seed)
    with pytest.raises(ValueError, match="drawn from a shapes scene"):
        control_map("layout", image)


def test_unplaced_captions_name_colours_and_shapes_in_the_maps_label_order():
    import dataclasses

    from latentdiff.data.shapes import Scene, ShapeObject, parse_caption, unplaced_caption
    from latentdiff.train.controlnet import unplaced_captions

    scene = Scene((ShapeObject("square", "red", "large", "left"), ShapeObject("circle", "blue", "small", "right")),
                  "white")
    # Label k of a layout map is the scene's k-th object: the caption names them in that order, without size or
    # place, and parses back to the same colours and shapes.
    text = unplaced_caption(scene)
    assert text == "a red square and a blue circle on a white background"
    parsed = parse_caption(text)
    assert parsed.background == "white"
    assert {(o.color, o.shape, o.size, o.position) for o in parsed.objects} == \
        {("red", "square", None, None), ("blue", "circle", None, None)}
    assert unplaced_caption(scene, background=False) == "a red square and a blue circle"
    # In training: only flagged, non-dropped captions of a shapes scene change; the background stays stated only
    # where the caption stated it; no scene (a folder data set) keeps the caption.
    stored = dataclasses.asdict(scene)
    captions = ["a large red square on the left and a small blue circle on the right",
                "a large red square on the left and a small blue circle on the right on a white background",
                "", "a photo", "a large red square on the left and a small blue circle on the right"]
    out, changed = unplaced_captions(captions, [stored, stored, stored, None, stored], [True, True, True, True, False])
    assert changed and out == ["a red square and a blue circle", "a red square and a blue circle on a white background",
                               "", "a photo", captions[4]]
    assert unplaced_captions(captions, [stored] * 5, [False] * 5) == (captions, False)
    # Colours only (``unshaped``): the map alone carries the shapes.
    assert unplaced_caption(scene, shapes=False) == "a red object and a blue object on a white background"
    out, _ = unplaced_captions(captions[:2], [stored] * 2, [True, True], [True, False])
    assert out == ["a red object and a blue object", "a red square and a blue circle on a white background"]


# ----------------------------------------------------------------------------------------- CLI end to end


def test_cache_train_generate_end_to_end(tiny_pipe, tmp_path, capsys):
    from latentdiff.cli import main
    from latentdiff.components import load_autoencoder
    from latentdiff.data.cache import LatentCache, build_cache
    from latentdiff.data.shapes import ShapesDataset

    ae = load_autoencoder(tiny_pipe / "autoencoder")
    cache = build_cache(ae, ShapesDataset(8, size=16, seed=0), tmp_path / "cache", quiet=True, control="layout",
                        source={"autoencoder": str(tiny_pipe / "autoencoder")})
    loaded = LatentCache(cache)
    assert loaded.control_kind == "layout" and loaded.control.shape == (8, 3, 16, 16)
    with pytest.raises(SystemExit):  # a cache of other maps than asked for
        main(["train-controlnet", "--model", str(tiny_pipe), "--cache", str(cache), "--control", "edges",
              "--out", str(tmp_path / "bad"), "--preset", "shapes-test"])
    assert "stores 'layout' maps" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    main(["train-controlnet", "--model", str(tiny_pipe), "--cache", str(cache), "--out", str(tmp_path / "run"),
          "--preset", "shapes-test"])
    folder = tmp_path / "run" / "controlnet"
    assert capsys.readouterr().out.strip() == str(folder)
    net, report = load_controlnet(folder)
    assert report.ok and net.config.control_kind == "layout"
    main(["export-checkpoint", str(tmp_path / "run" / "checkpoints" / "step_0000003"), "-o", str(tmp_path / "last")])
    exported, _ = load_controlnet(tmp_path / "last")  # the last checkpoint's EMA is what the run wrote
    assert exported.config == net.config
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), net.state_dict().values()))
    capsys.readouterr()
    control = tmp_path / "layout.png"
    Image.fromarray(loaded.control[0].permute(1, 2, 0).numpy()).save(control)
    main(["generate", "a red circle", "--model", str(tiny_pipe), "--steps", "2", "--control", str(control),
          "--controlnet", str(folder), "--control-scale", "0.5", "--control-end", "0.5", "-o", str(tmp_path / "o.png")])
    assert (tmp_path / "o.png").is_file()
    recorded = json.loads(Image.open(tmp_path / "o.png").text["parameters"])["controlnets"]
    assert recorded == [{"control": str(control.resolve()), "controlnet": str(folder.resolve()), "scale": 0.5,
                         "start": 0.0, "end": 0.5}]
    # Fine-tuning from a ControlNet (``init``) with colour-only captions: it starts from those weights; a ControlNet
    # of another map kind is refused before any training, nothing written.
    main(["train-controlnet", "--model", str(tiny_pipe), "--cache", str(cache), "--out", str(tmp_path / "tune"),
          "--preset", "shapes-test", "--set", f"init={folder}", "--set", "unshaped=0.5", "--set", "unplaced=1",
          "--set", "steps=1", "--set", "lr=1e-12"])
    tuned, _ = load_controlnet(tmp_path / "tune" / "controlnet")
    assert net.controlnet_mid_block.weight.abs().max() > 1e-5  # trained away from its zero start ...
    assert all(torch.allclose(a, b, rtol=0, atol=1e-9)  # ... and the fine-tune starts there, not from zero
               for a, b in zip(tuned.state_dict().values(), net.state_dict().values()))
    capsys.readouterr()
    other = build_cache(ae, ShapesDataset(4, size=16, seed=1), tmp_path / "edges", quiet=True, control="edges",
                        source={"autoencoder": str(tiny_pipe / "autoencoder")})
    with pytest.raises(SystemExit):
        main(["train-controlnet", "--model", str(tiny_pipe), "--cache", str(other), "--out", str(tmp_path / "bad2"),
              "--preset", "shapes-test", "--set", f"init={folder}"])
    assert "is a ControlNet for another model or map" in capsys.readouterr().err
    assert not (tmp_path / "bad2" / "controlnet").exists()
    with pytest.raises(SystemExit):  # unpaired flags are refused before the model loads
        main(["generate", "a red circle", "--model", str(tiny_pipe), "--control", str(control),
              "-o", str(tmp_path / "p.png")])
    assert "give them in pairs" in capsys.readouterr().err and not (tmp_path / "p.png").exists()


def test_original_single_file_controlnet_matches_diffusers_converter(sd_with_controlnets, tmp_path):
    """Our table for lllyasviel's layout (cldm.py names) against diffusers' own converter (convert_from_ckpt): a
    diffusers ControlNetModel written in the original layout by our table converts back, by diffusers, to the same
    tensors, and loads into our ControlNet (built for the base model it is added to) with the same tensors."""
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint

    from latentdiff.interop.controlnet import controlnet_config_from_diffusers, open_controlnet
    from latentdiff.interop.keymaps import KeyMap, controlnet_rules
    from latentdiff.io import write_safetensors

    folder, ref, _, _, _ = sd_with_controlnets
    cn = diffusers_mod.ControlNetModel.from_unet(ref.unet)  # diffusers' default (16, 32, 96, 256) embedding
    torch.manual_seed(3)
    with torch.no_grad():
        for p in cn.parameters():
            p.normal_(0, 0.1)
    expected = cn.state_dict()
    table = KeyMap(controlnet_rules(controlnet_config_from_diffusers(dict(cn.config)), 6),
                   original_prefix="control_model.")
    original, absent = table.to_original(expected)
    assert not absent
    back = convert_ldm_unet_checkpoint(dict(original), dict(cn.config), controlnet=True)
    assert back.keys() == expected.keys() and all(torch.equal(back[k], expected[k]) for k in expected)
    write_safetensors(tmp_path / "control_tiny.safetensors", original)
    pipe = latentdiff.load(folder)
    net, report = open_controlnet(tmp_path / "control_tiny.safetensors", pipe.denoiser.network.config)
    assert report.ok and net.config.conditioning_embedding_channels == (16, 32, 96, 256)
    assert all(torch.equal(net.state_dict()[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="brings control images down by 8"):  # this VAE's factor is 2
        pipe.add_controlnet(tmp_path / "control_tiny.safetensors")
    with pytest.raises(ValueError, match="no config"):
        open_controlnet(tmp_path / "control_tiny.safetensors")
